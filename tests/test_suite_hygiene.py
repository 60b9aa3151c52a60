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


def test_tests_sharing_a_module_fixture_run_on_one_worker_which_builds_it_once(pytester):
    """`pytest -n 2 --dist loadgroup` with the suite's conftest: the tests that use one of
    SHARED_MODULE_FIXTURES (or several, chained: one group) run on one worker, so each fixture is
    built once, not once per worker (what pytest 9.2 silently did: pytest-xdist#1386)."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    builds = pytester.path / "builds.txt"
    pytester.makepyfile(test_shared=f"""
        import os

        import pytest

        def built(name):
            with open({str(builds)!r}, "a") as f:
                f.write(name + " " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")
            return name

        @pytest.fixture(scope="module")
        def stock_runs():
            return built("stock_runs")

        @pytest.fixture(scope="module")
        def draft_lossless():
            return built("draft_lossless")

        @pytest.mark.parametrize("i", range(6))
        def test_stock(i, stock_runs):
            pass

        @pytest.mark.parametrize("i", range(3))
        def test_lossless(i, draft_lossless):
            pass

        @pytest.fixture(scope="module")
        def llm():
            return built("llm")

        def test_both(stock_runs, draft_lossless):
            pass

        def test_chained(draft_lossless, llm):
            pass

        @pytest.mark.parametrize("i", ["a@b"])
        def test_at_sign_in_its_id(i, llm):
            pass
    """)
    pytester.makepyfile(**{f"test_plain{i}": "def test_plain():\n    pass\n" for i in range(6)})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v")
    result.assert_outcomes(passed=18)
    lines = builds.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["draft_lossless", "llm", "stock_runs"], lines
    assert len({line.split()[1] for line in lines}) == 1  # test_both and test_chained joined the three
