"""A killed driver script stops the servers it started (fake server: no vLLM needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Stands in for `vllm serve`: answers /health with `status` and records its PID.
FAKE_SERVER = textwrap.dedent("""
    import http.server, os, sys
    port, status, pid_file = int(sys.argv[sys.argv.index("--port") + 1]), int(sys.argv[1]), sys.argv[2]
    open(pid_file, "w").write(str(os.getpid()))
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status); self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")

# A benchmark's shape: start a server, work in a try block, stop it in `finally`.
DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from selfjudge_vllm.testing.load import Server, exit_cleanly_on_sigterm, free_port
    exit_cleanly_on_sigterm()
    fake, status, pid_file, state = sys.argv[1:5]
    command = [sys.executable, fake, status, pid_file, "--host", "127.0.0.1", "--port", str(free_port())]
    Path(state).write_text("starting")
    server = Server(command, Path(state).with_suffix(".log"), startup_timeout=120)
    try:
        Path(state).write_text("serving")
        time.sleep(120)
    finally:
        server.stop()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(condition, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("health_status, phase", [(200, "serving"), (503, "starting")])
def test_sigterm_to_the_driver_stops_its_server(tmp_path: Path, health_status, phase):
    """Whether the server is up or still starting, `kill DRIVER` leaves no server behind."""
    fake, driver = tmp_path / "fake_server.py", tmp_path / "driver.py"
    fake.write_text(FAKE_SERVER)
    driver.write_text(DRIVER)
    pid_file, state = tmp_path / "server.pid", tmp_path / "state.txt"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, driver, fake, str(health_status), pid_file, state],
                            cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        assert _wait_for(lambda: pid_file.is_file() and pid_file.read_text() and state.is_file()
                         and state.read_text() == phase)
        server_pid = int(pid_file.read_text())
        time.sleep(0.5)  # the driver is now inside the phase (its health polling or its work)
        assert _alive(server_pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert _wait_for(lambda: not _alive(server_pid), timeout=10), "the server outlived its driver"
    finally:
        if proc.poll() is None:
            proc.kill()
