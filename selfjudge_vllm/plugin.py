"""vLLM entry point: `register` (vllm.general_plugins).

vLLM calls `register()` in every process it starts (API server, engine core, workers), before
any model runner exists and without the configuration. It only installs the worker start-up
hook, the request-admission check and the guard's wrapper of the engine client; everything
else happens in a worker whose config carries a `selfjudge` section (vllm_patches.py, which
builds through factories.py).
"""

from __future__ import annotations


def register() -> None:
    from selfjudge_vllm.vllm_patches import install_admission_hook, install_guard_hook, install_worker_hook

    install_worker_hook()
    install_admission_hook()
    install_guard_hook()
