"""How the adapter wraps a vLLM attribute: resolve it (failing loudly when absent), wrap it
once (idempotent across repeated plugin loads), remember the original."""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

# Versions the worker starts on without "allow_unsupported_vllm" (how each was tested: the
# supported matrix in docs/vllm-integration.md). 0.33.0 (model runner V1, source-checked only)
# needs the flag.
SUPPORTED_VLLM_VERSIONS = ("0.32.0", "0.34.0")


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
            f"(checked: {', '.join(SUPPORTED_VLLM_VERSIONS)})"
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


