"""Per-request control inside real engines: mixed batches, admission errors."""

from __future__ import annotations

import gc

import pytest
import torch

from selfjudge_vllm.testing.tiny_models import write_head
from tests.engine_helpers import PROMPTS, spec_config

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(workdir, tiny_pair):
    from vllm import LLM

    target, draft = tiny_pair
    head = write_head(workdir / "heads/requests_accept_all", target, torch.zeros(64), bias=20.0,
                      threshold=0.5, operating_points={"strict": {"threshold": 0.9}})
    engine = LLM(model=str(target), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
                 speculative_config=spec_config("draft_model", draft),
                 additional_config={"selfjudge": {"head": str(head), "min_threshold": 0.4}})
    yield engine
    del engine
    gc.collect()


def _generate(llm, per_prompt_extra):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, extra_args=extra)
              for extra in per_prompt_extra]
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_mixed_batch_judged_and_lossless(llm):
    n = len(PROMPTS)
    judged = _generate(llm, [None] * n)
    lossless = _generate(llm, [{"selfjudge_enabled": False}] * n)
    assert judged != lossless
    # Odd requests lossless, even ones judged, verified in the same steps.
    mixed = _generate(llm, [{"selfjudge_enabled": False} if i % 2 else None for i in range(n)])
    for i in range(n):
        assert mixed[i] == (lossless[i] if i % 2 else judged[i]), i
    # A named stricter point is still accept-all for this head (p ~ 1): same as judged.
    assert _generate(llm, [{"selfjudge_operating_point": "strict"}] * n) == judged


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"selfjudge_threshold": 2.0}, "between 0 and 1"),
        ({"selfjudge_threshold": 0.1}, "looser than this server allows"),
        ({"selfjudge_operating_point": "nope"}, "unknown operating point 'nope'"),
        ({"selfjudge_enabeld": False}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_request_options_are_refused_at_admission(llm, extra, message):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # the HTTP 400 kind

    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, extra_args=extra), use_tqdm=False)
