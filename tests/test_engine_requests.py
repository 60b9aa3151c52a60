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
                 additional_config={"selfjudge": {"head": str(head), "min_threshold": 0.4}},
                 # Random models pad JSON with whitespace forever otherwise.
                 structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
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


def _judge_counts(llm) -> tuple[int, int]:
    def read(worker):
        counters = worker.model_runner._selfjudge_runtime.flush()
        return counters.draft_tokens, counters.judge_accepted

    return llm.collective_rpc(read)[0]


def test_memory_profiling_sees_the_judges_work(llm):
    """vLLM's profiling run (the dummy sampler call that precedes KV-cache sizing) goes
    through the judge's vocabulary-wide work, through the patched seam of a real runner."""

    def profile(worker):
        runner = worker.model_runner
        runtime = runner._selfjudge_runtime
        before = runtime.profiled_rows
        runner._dummy_sampler_run(torch.zeros(5, runner.model_config.get_hidden_size()))
        worst = runner.scheduler_config.max_num_seqs * runner.speculative_config.num_speculative_tokens
        return runtime.profiled_rows - before, runtime.profiling, worst, runtime.max_step_rows

    # Two rejection-sampler calls (mixed and all-greedy), each doing the work of the worst
    # step the server can reach (max_num_seqs x draft tokens rows), not of the 5 dummy rows.
    profiled, profiling, worst, max_step_rows = llm.collective_rpc(profile)[0]
    assert (profiled, profiling, max_step_rows) == (2 * max(5, worst), False, worst) and worst > 5


def test_grammar_constrained_requests_stay_valid(llm):
    """Grammar-constrained requests with an accept-everything judge still follow their
    grammars. (vLLM 0.32 already cuts each draft to its grammar-valid prefix before
    verification; the judge also skips any token whose processed logit is -inf.)"""
    import json
    import re

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    regex = r"[a-z ]{10,60}\."  # permissive, so many draft tokens survive and get judged
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    (scored_before, accepted_before) = _judge_counts(llm)
    outs = llm.generate(PROMPTS[:8], [
        SamplingParams(max_tokens=64, temperature=0.0,
                       structured_outputs=StructuredOutputsParams(regex=regex) if i % 2 else
                       StructuredOutputsParams(json=schema))
        for i in range(8)
    ], use_tqdm=False)
    for i, out in enumerate(outs):
        text = out.outputs[0].text
        if i % 2:
            assert re.fullmatch(regex, text), text
        else:
            assert set(json.loads(text)) == {"a"}, text
    scored, accepted = _judge_counts(llm)
    assert accepted > accepted_before  # the judge accepted tokens inside the grammar


def test_banned_tokens_are_never_accepted(llm):
    """allowed_token_ids masks every other token to -inf after the draft was made; an
    accept-everything judge must still not accept a masked draft token."""
    from vllm import SamplingParams

    allowed = list(range(100, 400))
    scored_before, _ = _judge_counts(llm)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                allowed_token_ids=allowed), use_tqdm=False)
    for out in outs:
        assert set(out.outputs[0].token_ids) <= set(allowed)
    scored, _ = _judge_counts(llm)
    assert scored > scored_before


def test_stops_and_lengths_behave_as_without_the_judge(llm):
    from vllm import SamplingParams

    base = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # max_tokens is exact even when a verification step accepts several tokens.
    for n in (1, 5, 7):
        out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert list(out.token_ids) == list(base.token_ids[:n])
    # A stop string ends the text right before it.
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 4]
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[: base.text.index(stop)]
    # A stop token is banned (-inf) until min_tokens, so the judge may not accept it early.
    stop_token = base.token_ids[3]
    first = list(base.token_ids).index(stop_token)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_token],
                                                    min_tokens=first + 4), use_tqdm=False)[0].outputs[0]
    assert stop_token not in out.token_ids[: first + 4]
    assert len(out.token_ids) >= first + 4


def test_logprobs_of_judge_accepted_tokens_are_the_models_own(llm):
    """Default raw_logprobs mode: an accepted token reports the model's log-probability,
    not the forced 0.0 (README, "Logprobs of judge-accepted tokens")."""
    from vllm import SamplingParams

    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    values = [entry[token].logprob for token, entry in zip(out.token_ids, out.logprobs)]
    assert all(v <= 0.0 for v in values) and sum(v < -1e-3 for v in values) >= len(values) // 2
