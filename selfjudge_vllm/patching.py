"""How the adapter wraps a vLLM attribute: resolve it (failing loudly when absent), wrap it
once (idempotent across repeated plugin loads), remember the original."""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable

# What each vLLM version was checked with (the support matrix in docs/vllm-integration.md
# says the same, row by row; tests/test_adapter_v2.py holds them together):
#   engine   real engines and servers, every test (the CPU build)
#   kernels  the wheel's source checked against the register, and the adapter driven through
#            the version's own sampler and verification kernels (Triton's CPU interpreter);
#            no engine, no GPU
#   source   the wheel's source checked against the register only
VLLM_EVIDENCE = {"0.32.0": "engine", "0.33.0": "source", "0.34.0": "kernels"}
# Versions the worker starts on without "allow_unsupported_vllm": those run in an engine.
SUPPORTED_VLLM_VERSIONS = tuple(v for v, evidence in VLLM_EVIDENCE.items() if evidence == "engine")


class UnsupportedConfiguration(RuntimeError):
    """The configuration asks for the judge where it cannot run."""


_WRAPPED = "__selfjudge_original__"


def _resolve(target: str) -> tuple[Any, str]:
    """'pkg.module:Class.attr' -> (owner object, attribute name); fail loudly if absent."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    if not hasattr(owner, attr):
        raise UnsupportedConfiguration(
            f"selfjudge: vLLM has no {target}; this vLLM version is not supported "
            f"(checked: {', '.join(VLLM_EVIDENCE)})"
        )
    return owner, attr


def _install(target: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Wrap `target` once (idempotent across repeated plugin loads)."""
    owner, attr = _resolve(target)
    current = getattr(owner, attr)
    if getattr(current, _WRAPPED, None) is not None:
        return
    wrapper = make_wrapper(current)
    functools.update_wrapper(wrapper, current)
    setattr(wrapper, _WRAPPED, current)
    setattr(owner, attr, wrapper)




def argument_getter(function: Callable, *names: str) -> Callable[[tuple, dict], tuple]:
    """(args, kwargs) of a call of `function` -> the values of its parameters `names`,
    whether they were passed by position or by name."""
    params = list(inspect.signature(function).parameters)
    positions = [params.index(name) for name in names]

    def get(args: tuple, kwargs: dict) -> tuple:
        return tuple(args[p] if len(args) > p else kwargs[n] for p, n in zip(positions, names))

    return get


def judged_call(original: Callable, names: tuple[str, ...], judge: Callable) -> Callable:
    """A verification function that first lets `judge(*the named arguments)` force the
    accepted drafts (it returns the runtime that forced them, or None), then verifies with
    `original`, then has the runtime write the forced entries back (JudgeRuntime.unforce_)."""
    get = argument_getter(original, *names)

    def call(*args, **kwargs):
        runtime = judge(*get(args, kwargs))
        try:
            return original(*args, **kwargs)
        finally:
            if runtime is not None:
                runtime.unforce_()

    return call
