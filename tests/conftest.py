"""Shared fixtures. Engine tests build tiny random models once per session and run vLLM
in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless a test says otherwise."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

_WORK = Path(os.environ.get("SELFJUDGE_TEST_WORKDIR") or tempfile.mkdtemp(prefix="selfjudge-tests-"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: each worker builds its own models and caches
    _WORK = _WORK / os.environ["PYTEST_XDIST_WORKER"]
# vLLM hygiene on these machines: no hub, small KV cache, caches and
# IPC paths inside the workspace.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CACHE_ROOT": str(_WORK / "vllm-cache"),
    "VLLM_RPC_BASE_PATH": str(_WORK / "rpc"),
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # A native crash of an engine process leaves its Python stack in the server log (how the
    # bfloat16 SIGILL of docs/serving.md was found: before, the EngineCore vanished silently).
    "PYTHONFAULTHANDLER": "1",
}.items():
    os.environ.setdefault(key, value)
(_WORK / "rpc").mkdir(parents=True, exist_ok=True)
# vLLM's CPU backend pins the model worker of every multiprocess engine (the default mode, and
# the servers of the tests that ask for it) to the cores it does not reserve for the scheduler:
# on 2 cores, core 0 for every engine. Under `pytest -n 2` two such engines, one per pytest
# worker, then share core 0 while core 1 idles. As many pytest workers as cores: each pins its
# engines to its own core instead (still one core, one OpenMP thread, as vLLM's own choice).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if os.environ.get("PYTEST_XDIST_WORKER") and _workers > 1 and _workers == os.cpu_count():
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))

# Module fixtures shared by long tests (a label run, a shared LLM, the README's models, stock vLLM's runs): under
# `pytest -n 2 --dist loadgroup` the tests that use one go to the same worker, so it is built once.
SHARED_MODULE_FIXTURES = ("labelled_run", "uninterrupted_run", "llm", "readme_pair", "draft_lossless", "stock_runs")


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts real vLLM engines on tiny models (slow)")
    config.addinivalue_line("markers", "server: starts `vllm serve` subprocesses (slow)")
    config.addinivalue_line("markers", "gemma: needs the Gemma 3 270M testbed (very slow)")


_HEAP_FROZEN_FOR_ENGINES = []


def _freeze_the_heap_before_each_in_process_engine() -> None:
    """vLLM collects garbage several times while it builds an engine (twice after each model's
    weights are loaded, then before it freezes its own heap): each a full pass over every
    object of the test process, which has imported vLLM, transformers and the suite (~0.5 s a
    pass here). With the heap frozen first, as vLLM freezes it once the engine is built, those
    passes see only the engine's new objects; vLLM unfreezes everything when the engine shuts
    down (and so does this when the engine fails to start). Only when garbage is collected
    changes, not what any engine computes."""
    if _HEAP_FROZEN_FOR_ENGINES:
        return
    import functools
    import gc

    from vllm.v1.engine.core import EngineCore

    original = EngineCore.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        gc.collect()
        gc.freeze()
        try:
            original(self, *args, **kwargs)
        except BaseException:
            gc.unfreeze()
            raise

    EngineCore.__init__ = __init__
    _HEAP_FROZEN_FOR_ENGINES.append(original)


_NUMBA_HIDDEN_FROM_KERNEL_SCAN = []


def _let_engines_build_after_an_ngram_engine() -> None:
    """vLLM 0.32 rebinds its kernel overrides at every engine build by scanning every module of
    sys.modules (vllm/triton_utils/dispatcher.py `_rebind_kernels`). Once an `ngram` engine has
    imported numba, the scan reads `vars()` of `llvmlite.binding.ffi.lib`, whose `__getattr__`
    answers `__dict__` with a function wrapper, and every later engine build of the process dies
    with AttributeError. While the scan runs, that module (which holds no kernel) is out of
    sys.modules, so n-gram engines run in the test process like the others instead of each in
    an interpreter of its own. The scan's result is unchanged; no engine computes differently."""
    if _NUMBA_HIDDEN_FROM_KERNEL_SCAN:
        return
    import functools
    import sys

    from vllm.triton_utils import dispatcher

    original = dispatcher._rebind_kernels

    @functools.wraps(original)
    def _rebind_kernels(overrides):
        hidden = sys.modules.pop("llvmlite.binding.ffi", None)
        try:
            return original(overrides)
        finally:
            if hidden is not None:
                sys.modules["llvmlite.binding.ffi"] = hidden

    dispatcher._rebind_kernels = _rebind_kernels
    _NUMBA_HIDDEN_FROM_KERNEL_SCAN.append(original)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures build engines
def pytest_runtest_setup(item):
    if getattr(item, "selfjudge_ungrouped", False):
        pytest.fail(_UNGROUPED, pytrace=False)
    if item.get_closest_marker("engine"):  # engines in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        _freeze_the_heap_before_each_in_process_engine()
        _let_engines_build_after_an_ngram_engine()


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    # One group per set of shared fixtures that tests join (a test using two puts both in it):
    # every test using any of them then runs on the worker that builds them.
    group_of = {}  # (module, fixture) -> the fixture that names its group (union-find)

    def root(key):
        while group_of.setdefault(key, key) != key:
            key = group_of[key]
        return key

    shared = {item: [(item.module.__name__, name) for name in SHARED_MODULE_FIXTURES
                     if name in getattr(item, "fixturenames", ())] for item in items}
    for keys in shared.values():
        for key in keys[1:]:
            group_of[root(key)] = root(keys[0])
    for item, keys in shared.items():
        if keys:
            module, name = root(keys[0])
            item.add_marker(pytest.mark.xdist_group(f"{module}.{name}"))
    # The longest work first (servers, shared engine runs), then the other engine tests, so two
    # workers end together on short tests rather than one waiting on a long test handed out
    # last; otherwise collection order.
    items.sort(key=lambda item: 0 if item.get_closest_marker("server") or item.get_closest_marker("xdist_group")
               else 1 if item.get_closest_marker("engine") else 2)


_UNGROUPED = ("pytest-xdist did not group this test with the others sharing its fixtures (with pytest 9.2 "
              "`--dist loadgroup` silently stops grouping: pytest-xdist#1386), so each worker would build "
              "them again: use the pytest of requirements/cpu-lock.txt")


def pytest_collection_finish(session):
    """Under `--dist loadgroup`, every grouped test fails at setup unless xdist really grouped
    it (it marks a grouped test by a suffix of its node id; pytest 9.2 no longer takes it)."""
    if getattr(session.config.option, "loadgroup", False):  # set in xdist workers only
        for item in session.items:
            group = item.get_closest_marker("xdist_group")
            item.selfjudge_ungrouped = group is not None and not item.nodeid.endswith("@" + group.args[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when in ("setup", "call") and report.failed:
        item.selfjudge_failed = True
    return report


class _DescendantWatch:
    """Every process descended from this one while a test runs, seen once a second: a process
    whose parent dies (a benchmark script killed by subprocess.run's timeout) is re-parented to
    init and is no descendant afterwards, but was one while its parent lived."""

    def __init__(self, me, before: set[int]):
        import threading

        self.me, self.before, self.seen = me, before, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _look(self) -> None:
        import psutil

        try:
            for process in self.me.children(recursive=True):
                if process.pid not in self.before:
                    self.seen.setdefault(process.pid, process)
        except psutil.Error:
            pass

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            self._look()

    def still_running(self) -> list:
        self.stop.set()
        self.thread.join()
        self._look()
        return [p for p in self.seen.values() if p.is_running()]  # is_running: same pid *and* start time


@pytest.fixture(autouse=True)
def _no_process_outlives_a_failed_test(request):
    """A test stopped by pytest-timeout (pytest.ini) does not stop what it started: a
    subprocess.run with a longer timeout kills only its direct child, whose `vllm serve` and
    EngineCore then ran on beside the rest of the suite (once for 18 minutes, slowing every test
    after it). After a test whose setup or call failed, every process started during it that
    still runs is killed, and said. (Only after a failure: a passing test may leave a pool the
    session reuses; one a failed test started is killed with the rest.)"""
    import psutil

    me = psutil.Process()
    watch = _DescendantWatch(me, {p.pid for p in me.children(recursive=True)})
    yield
    left = watch.still_running()
    if not getattr(request.node, "selfjudge_failed", False):
        return
    named = []
    for process in left:
        try:
            named.append(f"{process.pid} ({' '.join(process.cmdline()[:3])})")
            process.kill()
        except psutil.Error:  # gone meanwhile
            pass
    # Wait for them to go without reaping: a direct child's exit status is its Popen's to collect.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in left):
        time.sleep(0.1)
    if named:
        print(f"\nconftest: killed processes the failed test left running: {', '.join(named)}")


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="session")
def workdir() -> Path:
    return _WORK


@pytest.fixture(scope="session")
def tiny_pair(workdir):
    """(target_dir, draft_dir): 4-layer random Llama and its 1-layer truncation."""
    from selfjudge_vllm.testing.tiny_models import build_target_and_draft

    return build_target_and_draft(workdir / "models")
