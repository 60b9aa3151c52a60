"""The suite's own hygiene (tests/conftest.py): a failed test leaves nothing running."""

from __future__ import annotations

import signal
from pathlib import Path

import psutil

pytest_plugins = ["pytester"]


def test_a_failed_test_leaves_no_process_running_not_even_an_orphan(pytester):
    """A test that starts a process whose parent then exits (as subprocess.run's timeout kills
    a benchmark script and leaves its `vllm serve`) and then fails, and a fixture that starts
    one and then fails its setup: after each, the orphan is killed and named; a passing test's
    process is left alone."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pids = {name: pytester.path / f"{name}.pid" for name in ("call", "setup", "passing")}
    spawn = "sleep 300 & echo $! > {}; sleep 2"  # the parent lives 2 s, then the sleep is an orphan
    pytester.makepyfile(f"""
        import subprocess

        import pytest

        def orphan(path):
            subprocess.run(["sh", "-c", {spawn!r}.format(path)], check=True)

        @pytest.fixture
        def broken():
            orphan({str(pids["setup"])!r})
            raise RuntimeError("setup fails")

        def test_leaves_an_orphan_and_fails():
            orphan({str(pids["call"])!r})
            assert False

        def test_setup_leaves_an_orphan_and_fails(broken):
            pass

        def test_leaves_an_orphan_and_passes():
            orphan({str(pids["passing"])!r})
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    pid = {name: int(path.read_text()) for name, path in pids.items()}
    try:
        result.assert_outcomes(failed=1, errors=1, passed=1)
        for name in ("call", "setup"):
            result.stdout.fnmatch_lines([f"*killed processes the failed test left running: {pid[name]} (sleep 300)*"])
            assert not psutil.pid_exists(pid[name]) or psutil.Process(pid[name]).status() == psutil.STATUS_ZOMBIE
        assert psutil.Process(pid["passing"]).status() != psutil.STATUS_ZOMBIE
    finally:
        for p in pid.values():
            if psutil.pid_exists(p):
                psutil.Process(p).send_signal(signal.SIGKILL)
