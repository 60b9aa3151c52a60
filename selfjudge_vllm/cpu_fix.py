"""vLLM bug vllm-project/vllm#55005 on CPU: the C++ replacement of the rejection sampler's
`expand_batch_to_tokens` writes into a temporary, so sampled verification reads
uninitialised temperature/top-k/top-p. Replaced only when a probe at worker start shows the
bug; installed whenever the `selfjudge` section is present, judge on or off.
"""

from __future__ import annotations

import logging

import torch

from selfjudge_vllm.patching import _WRAPPED, _install, _resolve

logger = logging.getLogger("vllm.selfjudge")


def expand_batch_to_tokens_fixed(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """[batch] -> [num_tokens], repeating x[i] for request i's tokens (vLLM's contract)."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1)).long()
    expanded = x.repeat_interleave(counts, output_size=num_tokens)
    return expanded.masked_fill(expanded == replace_from, replace_to)


def _expand_is_broken(expand) -> bool:
    x = torch.tensor([0.0, 0.25, 3.5], dtype=torch.float32)
    cu = torch.tensor([2, 3, 6], dtype=torch.int32)
    expected = torch.tensor([1.0, 1.0, 0.25, 3.5, 3.5, 3.5])
    got = expand(x, cu, 6, replace_from=0, replace_to=1)
    return not torch.equal(got, expected)


def fix_cpu_expand_bug_if_present() -> bool:
    """Replace expand_batch_to_tokens if (and only if) it is wrong here. Returns whether
    the fix is in place."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False  # the bug lives in the CPU replacement kernel only
    owner, attr = _resolve("vllm.v1.sample.rejection_sampler:expand_batch_to_tokens")
    current = getattr(owner, attr)
    if getattr(current, _WRAPPED, None) is not None:
        return True
    if not _expand_is_broken(current):
        return False
    logger.info("selfjudge: vLLM bug #55005 present; replacing expand_batch_to_tokens")
    _install(
        "vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",
        # A fresh function each time, so wrapping never renames the shared one.
        lambda _original: lambda *a, **k: expand_batch_to_tokens_fixed(*a, **k),
    )
    return True
