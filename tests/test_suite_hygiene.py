"""The suite's own hygiene (tests/conftest.py): a failed test leaves nothing running."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil

pytest_plugins = ["pytester"]


def test_a_failed_test_leaves_no_process_running_not_even_an_orphan(pytester):
    """A test that starts a process whose parent exits at once (as a benchmark script killed
    by subprocess.run's timeout leaves its `vllm serve`) and then fails: after it, the orphan
    is killed and named."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pid_file = pytester.path / "orphan.pid"
    pytester.makepyfile(f"""
        import subprocess

        def test_leaves_an_orphan_and_fails():
            subprocess.run(["sh", "-c", "sleep 300 & echo $! > {pid_file}"], check=True)
            assert False
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    pid = int(pid_file.read_text())
    try:
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([f"*killed processes the failed test left running: {pid} (sleep 300)*"])
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if psutil.pid_exists(pid):
            psutil.Process(pid).send_signal(signal.SIGKILL)
