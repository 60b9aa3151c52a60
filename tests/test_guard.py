"""Guarded serving: the confidence sequence's anytime validity by simulation, the guard's
configuration, the engine-client wrapper against a scripted engine (no model), and (marked
`server`) a real server on tiny models: an accept-all judge falls back within the number of
comparisons the bound implies and then answers like lossless; a reject-all head never falls
back; 64 concurrent users with the guard on get no errors and the shadows stay within bound."""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from selfjudge_vllm import guard, meaning
from selfjudge_vllm.config import ConfigError, parse_section

DELTA = 0.05


def _first_fire(rng, rate, budget, horizon):
    """The comparison at which the guard falls back (None: never within the horizon), with a
    look after every comparison, as the server looks."""
    changes = np.cumsum(rng.random(horizon) < rate)
    for t in range(1, horizon + 1):
        if guard.exceeds(int(changes[t - 1]), t - int(changes[t - 1]), budget, DELTA):
            return t
    return None


def test_fallback_fires_in_at_most_delta_of_long_runs_within_budget_and_fires_above():
    """Monitored after every one of 1,000 comparisons: with the true change rate at the
    budget the guard falls back in at most delta of 400 runs (plus Monte Carlo error); at
    three times the budget it falls back in every run, after about a hundred comparisons."""
    rng = np.random.default_rng(3)
    budget, runs = 0.05, 400
    at_budget = sum(_first_fire(rng, budget, budget, 1000) is not None for _ in range(runs)) / runs
    assert at_budget <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / runs), at_budget
    above = [_first_fire(rng, 3 * budget, budget, 1000) for _ in range(40)]
    assert all(t is not None for t in above) and np.median(above) < 300


def test_the_bounds_cover_at_every_look():
    """Both one-sided bounds hold simultaneously over all looks in at least 1 - delta of runs."""
    rng = np.random.default_rng(4)
    rate, runs, horizon = 0.2, 200, 300
    misses_low = misses_high = 0
    for _ in range(runs):
        changes = np.cumsum(rng.random(horizon) < rate)
        looks = range(9, horizon, 10)
        misses_low += any(guard.lower_bound(int(changes[t]), t + 1 - int(changes[t]), DELTA) > rate for t in looks)
        misses_high += any(guard.upper_bound(int(changes[t]), t + 1 - int(changes[t]), DELTA) < rate for t in looks)
    assert misses_low / runs <= DELTA + 0.05 and misses_high / runs <= DELTA + 0.05
    assert guard.lower_bound(0, 50, DELTA) == 0.0 and guard.upper_bound(0, 50, DELTA) < 0.1
    assert guard.lower_bound(40, 60, DELTA) < 0.4 < guard.upper_bound(40, 60, DELTA)


def _reported_interval_misses(rate, runs, horizon, seed):
    """Share of runs in which the interval the guard reports ([lower(), upper()], /metrics)
    excludes the true rate at some look, with a look after every comparison.

    The interval misses at a look iff the mixture process at b = rate reaches the side's
    threshold there (the bounds are where the process crosses it), so a run misses iff it
    misses at the look where that process peaks. The peaks are found in numpy (screening with
    the untruncated mixture, which bounds the truncated one from above), then the guard's own
    bounds are computed at that one look per run and side, at whatever level they spend."""
    from scipy import special

    rng = np.random.default_rng(seed)
    changes = np.cumsum(rng.random((runs, horizon)) < rate, axis=1)
    kept = np.arange(1, horizon + 1) - changes
    state = guard.GuardState(guard.GuardConfig(sample_share=1.0, budget=0.5, confidence=1 - DELTA), 0.5)

    def peaks(s, f, b):
        # log of the untruncated mixture ratio >= the truncated one (its tail factor is <= 1)
        screen = special.betaln(1 + s, 1 + f) - math.log1p(-b) - s * math.log(b) - f * math.log1p(-b)
        out = []
        for row in range(runs):
            looks = np.flatnonzero(screen[row] >= math.log(2))  # no bound spends more than 1/2
            if looks.size:
                exact = [guard._log_mixture_above(int(s[row, t]), int(f[row, t]), b) for t in looks]
                out.append(int(looks[int(np.argmax(exact))]))
            else:
                out.append(None)
        return out

    def at(t, row):
        state.sampled, state.compared, state.text_changed = t + 1, t + 1, int(changes[row, t])
        return state

    high, low = peaks(changes, kept, rate), peaks(kept, changes, 1 - rate)
    misses = sum((h is not None and at(h, i).lower() > rate) or (lo is not None and at(lo, i).upper() < rate)
                 for i, (h, lo) in enumerate(zip(high, low)))
    return misses / runs


def test_the_reported_interval_is_two_sided_at_the_stated_confidence():
    """The interval the guard reports as 95% covers the true rate at every one of 3,000
    looks in at least 95% of 2,000 runs at rate 0.3, the review's setting (missed: 3.5%; with
    delta on each side, before issue 44, 7.6%), and in 1,000 runs of 1,000 looks at 0.03, a
    rate near a budget (3.0%; before, 6.0%)."""
    assert _reported_interval_misses(0.3, 2000, 3000, seed=5) <= DELTA
    assert _reported_interval_misses(0.03, 1000, 1000, seed=6) <= DELTA


def test_comparisons_to_fall_back_when_every_comparison_changed():
    for budget in (0.01, 0.05, 0.2):
        t = guard.comparisons_to_fall_back(budget, DELTA)
        assert guard.exceeds(t, 0, budget, DELTA) and not guard.exceeds(t - 1, 0, budget, DELTA)


@pytest.mark.parametrize("section, message", [
    ({"rule": "top_alpha", "guard": {"sample_share": 0.1}}, "guard.budget is required"),
    ({"rule": "top_alpha", "guard": {"sample_share": 0.1, "budget": 0.05, "every": 2}}, "Extra inputs"),
    ({"rule": "top_alpha", "guard": {"sample_share": 1.5, "budget": 0.05}}, "sample_share"),
    ({"rule": "top_alpha", "guard": {"sample_share": 0.1, "budget": 0.05, "answer_pattern": "x"}},
     "answer_pattern goes with measure 'answer'"),
    ({"rule": "top_alpha", "guard": {"sample_share": 0.1, "budget": 0.05, "action": "panic"}}, "action"),
])
def test_bad_guard_sections_are_refused(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_section({"selfjudge": section})


def test_the_certified_point_gives_its_budget_and_measure():
    config = parse_section({"selfjudge": {"head": "h", "operating_point": "certified_answer_changes_2pct",
                                          "guard": {"sample_share": 0.05}}})
    numeric = {"kind": "numeric", "pattern": None}
    assert guard.resolve(config, {"budget": 0.02, "measure": "answer_changes", "answer": numeric}) == (
        0.02, "answer", None, None)
    pattern = {"kind": "pattern", "pattern": "[A-D]"}
    assert guard.resolve(config, {"budget": 0.02, "measure": "answer_changes", "answer": pattern}) == (
        0.02, "answer", "[A-D]", None)
    assert guard.resolve(config, {"budget": 0.05, "measure": "text_changes"}) == (0.05, "text", None, None)
    for evidence, why in (({}, "not none"), ({"budget": 0.02, "measure": "accuracy"}, "not accuracy"),
                          ({"budget": 0.02, "measure": "answer_changes", "answer": {"kind": "code"}}, "on code")):
        with pytest.raises(ValueError, match=f"carries no certified change budget.*{why}"):
            guard.resolve(config, evidence)
    own = parse_section({"selfjudge": {"rule": "top_alpha", "guard": {"sample_share": 0.05, "budget": 0.1}}})
    assert guard.resolve(own, None) == (0.1, "text", None, None)


def test_a_point_certified_on_meaning_by_the_embedding_scorer_is_guarded_on_meaning():
    """calibrate's meaning_changes with the embedding scorer carries over: the guard compares
    meaning with the certified threshold (its own meaning_threshold first); the LLM scorer's
    certificate does not (the guard has no LLM judge): refused, saying what to set."""
    config = parse_section({"selfjudge": {"head": "h", "operating_point": "certified_meaning_changes_5pct",
                                          "guard": {"sample_share": 0.05}}})
    embedding = {"budget": 0.05, "measure": "meaning_changes", "answer": {"kind": "code"},  # code: read by no meaning
                 "scorer": {"scorer": "embedding", "threshold": 0.97, "loop_check": meaning.LOOP_CHECK_VERSION}}
    assert guard.resolve(config, embedding) == (0.05, "meaning", None, 0.97)
    own = parse_section({"selfjudge": {"head": "h", "operating_point": "certified_meaning_changes_5pct",
                                       "guard": {"sample_share": 0.05, "meaning_threshold": 0.9}}})
    assert guard.resolve(own, embedding) == (0.05, "meaning", None, 0.9)
    with pytest.raises(ValueError, match="by the llm scorer; the guard compares meaning with the embedding scorer"):
        guard.resolve(config, {**embedding, "scorer": {"scorer": "llm", "threshold": 0.7}})
    with pytest.raises(ValueError, match="certified with the loop check loop-v0, the guard's is"):
        guard.resolve(config, {**embedding, "scorer": {**embedding["scorer"], "loop_check": "loop-v0"}})
    with pytest.raises(ValueError, match="meaning_threshold goes with measure 'meaning'; the guard's measure is 'text'"):
        guard.resolve(own, {"budget": 0.05, "measure": "text_changes"})
    texts = parse_section({"selfjudge": {"head": "h", "operating_point": "certified_meaning_changes_5pct",
                                         "guard": {"sample_share": 0.05, "measure": "text"}}})
    assert guard.resolve(texts, {**embedding, "scorer": {"scorer": "llm"}}) == (0.05, "text", None, None)
    plain = parse_section({"selfjudge": {"rule": "top_alpha", "guard": {"sample_share": 0.05, "budget": 0.1,
                                                                        "measure": "meaning"}}})
    assert guard.resolve(plain, None) == (0.1, "meaning", None, meaning.DEFAULT_THRESHOLDS["embedding"])
    with pytest.raises(ConfigError, match="meaning_threshold goes with measure 'meaning'"):
        parse_section({"selfjudge": {"rule": "top_alpha", "guard": {"sample_share": 0.05, "budget": 0.1,
                                                                    "measure": "text", "meaning_threshold": 0.9}}})


class FixedCosine:
    def __init__(self, cosine):
        self.value, self.calls = cosine, 0

    def cosine(self, texts, references):
        self.calls += 1
        return [self.value for _ in texts]


def test_the_meaning_comparer_counts_a_new_loop_or_a_low_cosine():
    comparer = guard.MeaningComparer(0.9, embedder_factory=lambda: FixedCosine(0.95))
    lossless = "The plan has three parts: warm up, run, and cool down."
    assert not comparer.changed(lossless, lossless) and not comparer.changed(lossless, "The plan has three parts.")
    assert comparer.changed(lossless, "I think the answer is this one. " * 4)  # a new loop, whatever the cosine
    assert guard.MeaningComparer(0.99, embedder_factory=lambda: FixedCosine(0.95)).changed(lossless, "Other words.")



# -- the wrapper against a scripted engine -----------------------------------------------------------


class ScriptedEngine:
    """Answers relaxed requests with `relaxed` tokens and lossless ones with [1, 2, 3, 4];
    `delay` seconds per lossless (shadow) request; records every request it gets."""

    def __init__(self, section, relaxed=(1, 2, 9, 9), delay=0.0):
        self.vllm_config = SimpleNamespace(additional_config={"selfjudge": section},
                                           scheduler_config=SimpleNamespace(policy="fcfs"))
        self.relaxed, self.delay, self.seen = list(relaxed), delay, []

    async def generate(self, prompt, params, request_id, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        self.seen.append((request_id, dict(params.extra_args or {}), kwargs))
        lossless = str((params.extra_args or {}).get("selfjudge_enabled", True)).lower() == "false"
        tokens = [1, 2, 3, 4] if lossless else self.relaxed
        if lossless and self.delay:
            await asyncio.sleep(self.delay)
        if params.output_kind == RequestOutputKind.DELTA:
            for i, t in enumerate(tokens):
                yield _output([t], str(t), i == len(tokens) - 1)
        else:
            yield _output(tokens, "".join(map(str, tokens)), True)


def _output(tokens, text, finished, reason="length"):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, text=text,
                                                    finish_reason=reason if finished else None)], finished=finished)


def _wrapped(engine):
    from selfjudge_vllm.adapter_guard import _wrap_generate

    generate = _wrap_generate(type(engine).generate)
    return lambda *a, **k: generate(engine, *a, **k)


async def _serve(engine, n, extra=None, stream=False, temperature=0.0):
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from selfjudge_vllm import adapter_guard

    call = _wrapped(engine)
    outs = []
    for i in range(n):
        params = SamplingParams(temperature=temperature, max_tokens=4, extra_args=dict(extra or {}),
                                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.CUMULATIVE)
        outs.append([o async for o in call({"prompt_token_ids": [5, 6]}, params, f"r{i}")])
        while adapter_guard._TASKS:  # one request at a time, its shadow done before the next
            await asyncio.gather(*list(adapter_guard._TASKS))
    return outs


def _section(**guard_config):
    return {"rule": "top_alpha", "guard": {"budget": 0.05, "sample_share": 1.0, **guard_config}}


def test_without_a_guard_nothing_is_shadowed_or_changed():
    engine = ScriptedEngine({"rule": "top_alpha"})
    asyncio.run(_serve(engine, 5))
    assert [r for r, _, _ in engine.seen] == [f"r{i}" for i in range(5)] and all(x == {} for _, x, _ in engine.seen)


@pytest.mark.parametrize("stream", [False, True])
def test_an_accept_all_rule_falls_back_after_the_implied_comparisons(stream):
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section(action="fallback"))
    asyncio.run(_serve(engine, 2 * guard.comparisons_to_fall_back(0.05, 1 - 0.95) + 3, stream=stream))
    state = guard_of(engine)
    needed = guard.comparisons_to_fall_back(0.05, 0.05)
    assert state.fell_back and state.compared == needed  # after the fallback nothing relaxed is left to compare
    users = [x for r, x, _ in engine.seen if not r.startswith("selfjudge-shadow-")]
    # the requests after the fallback are served lossless; those before it relaxed
    assert all(x == {} for x in users[:needed]) and all(x == {"selfjudge_enabled": False} for x in users[needed:])
    # an explicit choice keeps its rule after the fallback, is counted, and is still compared
    asyncio.run(_serve(engine, 2, extra={"selfjudge_rule": "top_alpha", "selfjudge_alpha": 0.1}))
    assert state.explicit_after_fallback == 2 and state.compared == needed + 2


def test_equal_outputs_never_fall_back_and_streamed_deltas_are_joined():
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section(action="fallback"), relaxed=(1, 2, 3, 4))
    asyncio.run(_serve(engine, 30, stream=True))
    state = guard_of(engine)
    assert (state.compared, state.text_changed, state.fell_back) == (30, 0, False)


def test_sampled_and_lossless_requests_are_not_shadowed_and_the_report_action_never_falls_back():
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section())  # action: report
    asyncio.run(_serve(engine, 3, temperature=0.8))
    asyncio.run(_serve(engine, 3, extra={"selfjudge_enabled": "false"}))
    assert guard_of(engine).compared == 0
    asyncio.run(_serve(engine, 20))
    state = guard_of(engine)
    assert state.compared == 20 and state.text_changed == 20 and not state.fell_back and state.lower() > 0.05


def test_one_token_requests_and_streaming_input_prompts_are_not_comparable():
    """The review's L2: vLLM's online beam search calls generate once per beam and step, with
    max_tokens=1, logprobs and its own request ids ('<id>-<uuid>-beam-<i>'); each got a shadow,
    though a one-token response is the target's own first token, before any draft, and cannot
    change. A prompt that is an async generator of streaming inputs passed as comparable, then
    failed the shadow's copy and counted as failed. Neither is sampled now; both are served."""
    from vllm.sampling_params import SamplingParams

    from selfjudge_vllm import adapter_guard
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section(), relaxed=(1,))
    call = _wrapped(engine)

    async def streaming_input():
        yield {"prompt_token_ids": [5]}

    async def traffic():
        beam = SamplingParams(logprobs=8, max_tokens=1, temperature=0.0, detokenize=False)
        outs = [[o async for o in call({"prompt_token_ids": [5]}, beam, f"chatcmpl-abc-1234-beam-{i}")]
                for i in range(3)]
        outs.append([o async for o in call(streaming_input(), SamplingParams(temperature=0, max_tokens=4), "s")])
        while adapter_guard._TASKS:
            await asyncio.gather(*list(adapter_guard._TASKS))
        return outs

    outs = asyncio.run(traffic())
    state = guard_of(engine)
    assert all(len(o) == 1 for o in outs)
    assert (state.sampled, state.failed) == (0, 0)
    assert not [r for r, _, _ in engine.seen if r.startswith("selfjudge-shadow-")]
    assert adapter_guard.comparable(SamplingParams(temperature=0, max_tokens=None))  # up to the context: compared


@pytest.mark.parametrize("max_pending, compared, skipped", [(None, 10, 0), (3, 3, 7)])
def test_shadows_beyond_max_in_flight_wait_and_beyond_max_pending_are_skipped_at_arrival(max_pending, compared,
                                                                                       skipped):
    """Ten requests at once, 2 shadows at a time: every shadow waits for a slot and runs (before
    issue 44, 8 were dropped). Only beyond max_pending sampled requests awaiting their outcome
    is one skipped, decided when it arrives from the pending count alone, counted, and left out
    of the measurement (before, it was counted unchanged in the lower bounds and changed in the
    upper one)."""
    from selfjudge_vllm.adapter_guard import guard_of

    limits = {"max_in_flight": 2} if max_pending is None else {"max_in_flight": 2, "max_pending": max_pending}
    engine = ScriptedEngine(_section(**limits), delay=0.05)

    async def burst():
        from vllm.sampling_params import SamplingParams

        from selfjudge_vllm import adapter_guard

        call = _wrapped(engine)

        async def one(i):
            return [o async for o in call({"prompt_token_ids": [5]}, SamplingParams(temperature=0, max_tokens=4),
                                          f"u{i}")]

        await asyncio.gather(*(one(i) for i in range(10)))
        while adapter_guard._TASKS:
            await asyncio.gather(*list(adapter_guard._TASKS))

    asyncio.run(burst())
    state = guard_of(engine)
    assert (state.compared, state.skipped) == (compared, skipped)
    assert (state.sampled, state.pending) == (10, 0)
    assert state.max_in_flight_seen == 2 and state.in_flight == 0 and state.queued == 0
    assert state.upper() == guard.upper_bound(compared, 0, DELTA / 2)  # the compared ones, all changed
    assert state.lower() == guard.lower_bound(compared, 0, DELTA / 2)


def test_skipped_requests_under_sustained_overload_do_not_blind_the_fallback():
    """The review's repro (issue 44, M1): shadows cannot keep up (max_pending 1, three of every
    four sampled requests skipped) and the true change rate is four times the budget. Counted
    unchanged, the skipped ones kept the fallback bound below the budget for 4,000 sampled
    requests; left out, the guard falls back within a few hundred comparisons."""
    import random

    state = guard.GuardState(guard.GuardConfig(sample_share=1.0, budget=0.05, action="fallback", max_pending=1,
                                               seed=1), 0.05)
    rng = random.Random(7)
    for _ in range(1000):
        seq = state.admit()
        assert [state.admit() for _ in range(3)] == [None] * 3  # decided from the pending count alone
        changed = rng.random() < 0.2
        state.resolve(seq, (changed, changed))
        if state.fell_back:
            break
    assert state.fell_back and state.compared < 300, (state.compared, state.changes, state.fallback_bound())
    assert state.skipped == 3 * state.compared and state.fallback_bound() == guard.lower_bound(
        state.changes, state.compared - state.changes, DELTA)
    assert state.sampled == state.compared + state.abandoned + state.failed + state.skipped + state.pending


def test_skipping_decided_from_the_past_keeps_false_fallbacks_within_delta():
    """Leaving skipped requests out is valid because whether one is skipped depends on earlier
    requests alone: at a true rate equal to the budget, with an adversarial rule that skips
    the next three after every unchanged comparison (to let changes through), the guard on the
    admitted requests falls back in at most delta of 400 runs of 1,000 requests (plus Monte Carlo
    error)."""
    rng = np.random.default_rng(11)
    budget, runs, fired = 0.05, 400, 0
    for _ in range(runs):
        changes = kept = skip = 0
        for x in rng.random(1000) < budget:
            if skip:
                skip -= 1
                continue
            changes, kept = changes + x, kept + (not x)
            skip = 0 if x else 3
            if x and guard.exceeds(int(changes), int(kept), budget, DELTA):
                fired += 1
                break
    assert fired / runs <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / runs), fired


def test_a_pending_request_holds_no_later_outcome_back():
    """Outcomes count when they come, not in sampling order behind the earliest pending one:
    at every look the statistics are over every sampled request so far, the pending ones
    counted unchanged for the fallback and the lower end, changed for the upper end. Only the
    pending requests' places are kept, at most max_pending of them."""
    state = guard.GuardState(guard.GuardConfig(sample_share=1.0, budget=0.05, action="fallback", max_pending=3),
                             0.05)
    seqs = [state.admit() for _ in range(3)]
    assert seqs == [0, 1, 2] and state.sampled == 3 and state.pending == 3
    assert state.resolve(1, (True, True)) is None
    message = state.resolve(2, (True, True))  # request 0 still pending: counted unchanged, holds nothing back
    assert guard.exceeds(2, 1, 0.05, DELTA) and state.fell_back and message == state.reason
    assert (state.compared, state.changes, state.pending) == (2, 2, 1)
    assert ("changed in 2 of 2 shadow comparisons, with 1 more sampled without a comparison (pending, abandoned "
            "or failed) counted unchanged;") in message
    assert state.lower() == guard.lower_bound(2, 1, DELTA / 2) and state.upper() == 1.0
    assert [state.admit() for _ in range(3)] == [3, 4, None]  # at most max_pending places are kept
    assert (state.sampled, state.skipped, state.pending) == (6, 1, 3)
    assert state.resolve(0, guard.ABANDONED) is None and state.pending == 2
    with pytest.raises(ValueError, match="resolved twice"):
        state.resolve(0, guard.FAILED)
    assert state.sampled == state.compared + state.abandoned + state.failed + state.skipped + state.pending


def _state_after(outcomes, action="fallback"):
    """A guard (budget 5%, 95%) that sampled len(outcomes) requests, then saw their outcomes
    in that order."""
    state = guard.GuardState(guard.GuardConfig(sample_share=1.0, budget=0.05, action=action), 0.05)
    for seq, outcome in zip([state.admit() for _ in outcomes], outcomes):
        state.resolve(seq, outcome)
    return state


def test_the_fallback_counts_missing_outcomes_unchanged_not_changed():
    """2 changed, 5 unchanged, 2 abandoned and 1 failed: counted unchanged, as the guard does,
    the fallback's statistic is exceeds(2, 8), far from the budget; counted as changed it would
    be exceeds(5, 5) and fall back (the review's mutant B, which fell back in 50 of 50 runs at
    a true rate of 0.02 against a 5% budget). The reported interval's ends count them
    unchanged below and changed above, each at delta/2."""
    same, diff = (False, False), (True, True)
    state = _state_after([diff, guard.ABANDONED, same, same, guard.FAILED, diff, same, guard.ABANDONED, same,
                             same])
    assert not guard.exceeds(2, 8, 0.05, DELTA) and guard.exceeds(5, 5, 0.05, DELTA)
    assert not state.fell_back and (state.changes, state.compared, state.missing) == (2, 7, 3)
    assert state.fallback_bound() == guard.lower_bound(2, 8, DELTA)
    assert state.lower() == guard.lower_bound(2, 8, DELTA / 2)
    assert state.upper() == guard.upper_bound(5, 5, DELTA / 2)


def test_the_fallback_does_not_drop_missing_outcomes():
    """An abandoned and a failed request, then 2 changed comparisons: dropped, the missing ones
    would leave exceeds(2, 0) and fall back at once (the review's mutant A); counted unchanged
    they give exceeds(2, 2), below the budget, and the guard falls back only at the third
    change, exceeds(3, 2), its message naming the 2 counted unchanged."""
    diff = (True, True)
    state = _state_after([guard.ABANDONED, guard.FAILED, diff, diff])
    assert guard.exceeds(2, 0, 0.05, DELTA) and not guard.exceeds(2, 2, 0.05, DELTA)
    assert not state.fell_back and state.fallback_bound() == guard.lower_bound(2, 2, DELTA) < 0.05
    message = state.resolve(state.admit(), diff)
    assert state.fell_back and guard.exceeds(3, 2, 0.05, DELTA) and message == state.reason
    assert "changed in 3 of 3 shadow comparisons, with 2 more sampled without a comparison" in message


def test_the_fallback_warning_is_the_one_docs_guard_md_quotes():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guard.md").read_text()
    quoted = next(line for line in page.splitlines() if line.startswith("selfjudge guard: falling back"))
    pattern = re.escape(quoted).replace(r"\[", "(?:").replace(r"\]", ")?")
    for name, value in (("S", r"\d+"), ("N", r"\d+"), ("M", r"\d+"), ("X", r"[\d.]+"), ("B", r"[\d.]+")):
        pattern = re.sub(rf"(?<![A-Za-z]){name}(?![A-Za-z])", value.replace("\\", "\\\\"), pattern)
    diff = (True, True)
    for outcomes in ([diff, diff], [guard.ABANDONED, diff, diff, diff]):
        state = _state_after(outcomes)
        line = "selfjudge guard: falling back to lossless verification for requests without selfjudge_* options: " + (
            state.reason)
        assert state.fell_back and re.fullmatch(pattern, line), (pattern, line)


@pytest.mark.parametrize("action", ["fallback", "report"])
def test_a_stalled_response_does_not_freeze_the_guard(action):
    """The review's repro (issue 44, H1): a sampled streaming response whose client reads one
    token and stops (or a very long one) is pending for as long as it runs. Every later
    comparison changes. Before, outcomes waited in sampling order behind it: nothing was
    recorded, the guard never fell back, and beyond max_pending every sampled request was
    skipped while the buffer of waiting outcomes grew without bound. Now the later
    comparisons count at once (the stalled one unchanged for the fallback), the guard falls
    back after the comparisons the bound implies, and only the pending one is kept."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from selfjudge_vllm import adapter_guard
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section(action=action, max_pending=5))
    call = _wrapped(engine)

    async def traffic():
        stuck = call({"prompt_token_ids": [5]}, SamplingParams(temperature=0, max_tokens=4,
                                                               output_kind=RequestOutputKind.DELTA), "stuck")
        await stuck.__anext__()
        for i in range(40):
            [o async for o in call({"prompt_token_ids": [5]}, SamplingParams(temperature=0, max_tokens=4), f"u{i}")]
            while adapter_guard._TASKS:
                await asyncio.gather(*list(adapter_guard._TASKS))
            state = guard_of(engine)
            assert state.pending <= 5
        during = (state.compared, state.skipped, state.pending, state.fell_back)
        await stuck.aclose()
        return during

    compared, skipped, pending, fell_back = asyncio.run(traffic())
    state = guard_of(engine)
    needed = 3  # 2 changed comparisons and the pending one counted unchanged: exceeds(2, 1)
    assert guard.exceeds(needed - 1, 1, 0.05, DELTA) and not guard.exceeds(needed - 2, 1, 0.05, DELTA)
    if action == "fallback":  # after the fallback no request is relaxed: none is sampled
        assert (compared, skipped, pending, fell_back) == (needed - 1, 0, 1, True)
    else:
        assert (compared, skipped, pending, fell_back) == (40, 0, 1, False)
        assert state.lower() > 0.8 and state.fallback_bound() > 0.05
    assert (state.abandoned, state.pending) == (1, 0)  # the stalled stream, once closed
    assert state.sampled == state.compared + state.abandoned + state.failed + state.skipped + state.pending


class BurstyEngine(ScriptedEngine):
    """Prompt [0]: a short response that relaxed and lossless agree on. Prompt [1]: a long,
    streamed response that relaxed verification changes, whose lossless twin is slow; [2]:
    like [1], but the engine aborts it after two tokens (vLLM's final output, finish reason
    'abort')."""

    async def generate(self, prompt, params, request_id, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        self.seen.append((request_id, dict(params.extra_args or {}), kwargs))
        kind = prompt["prompt_token_ids"][0]
        lossless = str((params.extra_args or {}).get("selfjudge_enabled", True)).lower() == "false"
        tokens = [1, 2, 3, 4] if lossless or kind == 0 else [1, 2, 9, 9]
        if kind == 0:
            yield _output(tokens, "".join(map(str, tokens)), True)
            return
        if lossless:
            await asyncio.sleep(0.02)
        for i in range(len(tokens)):
            await asyncio.sleep(0.002)
            if kind == 2 and i == 2 and not lossless:
                yield _output([] if params.output_kind == RequestOutputKind.DELTA else tokens[:2], "", True, "abort")
                return
            last = i == len(tokens) - 1
            if params.output_kind == RequestOutputKind.DELTA:
                yield _output([tokens[i]], str(tokens[i]), last)
            elif last or params.output_kind == RequestOutputKind.CUMULATIVE:
                yield _output(tokens[: i + 1], "".join(map(str, tokens[: i + 1])), last)


def test_bursty_traffic_with_cut_off_responses_is_measured_without_bias():
    """Three waves, each a burst of 12 long relaxed responses that change (8 run to the end; 2
    the engine aborts; 1 whose client closes the stream; 1 whose client disconnects, i.e. its
    task is cancelled), then 12 short unchanged ones one at a time. Every one is sampled; half
    change (had they run to the end). Before issue 44 a shadow was skipped when 2 were in flight
    at its request's end, cut-off streams vanished and the engine's aborts were compared
    truncated: the guard compared 2 (the first wave's aborts, both "changed"), skipped 64, lost
    the 6 closed or disconnected streams, and reported 2 changed of 2 against a true 50%.
    Now every sampled request is either compared or counted as
    abandoned, and the reported interval counts each abandoned one as unchanged for its lower
    end and changed for its upper end, so it covers the rate whatever made them cut off."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from selfjudge_vllm import adapter_guard
    from selfjudge_vllm.adapter_guard import guard_of

    engine = BurstyEngine(_section(max_in_flight=2))
    call = _wrapped(engine)

    def params():
        return SamplingParams(temperature=0, max_tokens=4, output_kind=RequestOutputKind.DELTA)

    async def whole(kind, rid):
        return [o async for o in call({"prompt_token_ids": [kind]}, params(), rid)]

    async def closed_after_one(rid):
        stream = call({"prompt_token_ids": [1]}, params(), rid)
        await stream.__anext__()
        await stream.aclose()

    async def traffic():
        for wave in range(3):
            tasks = [asyncio.create_task(whole(1, f"w{wave}c{i}")) for i in range(8)]
            tasks += [asyncio.create_task(whole(2, f"w{wave}a{i}")) for i in range(2)]
            tasks.append(asyncio.create_task(closed_after_one(f"w{wave}x")))
            gone = asyncio.create_task(whole(1, f"w{wave}d"))
            await asyncio.sleep(0.003)  # its first token has been served
            gone.cancel()
            await asyncio.gather(*tasks, gone, return_exceptions=True)
            for i in range(12):
                await whole(0, f"w{wave}s{i}")
        while adapter_guard._TASKS:
            await asyncio.gather(*list(adapter_guard._TASKS))

    asyncio.run(traffic())
    state = guard_of(engine)
    assert (state.compared, state.text_changed) == (60, 24)
    assert (state.sampled, state.abandoned, state.skipped, state.failed, state.pending) == (72, 12, 0, 0, 0)
    assert state.max_in_flight_seen == 2 and state.in_flight == 0
    assert state.lower() <= 0.5 <= state.upper()
    # the cut-off ones widen the interval by their share: they are counted, not guessed
    assert state.upper() > guard.upper_bound(24, 36, DELTA / 2) and state.lower() < guard.lower_bound(24, 36, DELTA / 2)


def test_a_recorded_fallback_survives_a_restart_only_with_a_state_file(tmp_path):
    from selfjudge_vllm.adapter_guard import guard_of

    path = tmp_path / "guard.json"
    engine = ScriptedEngine(_section(action="fallback", state_file=str(path)))
    asyncio.run(_serve(engine, 6))
    assert guard_of(engine).fell_back and json.loads(path.read_text())["fell_back"]
    assert guard_of(ScriptedEngine(_section(action="fallback", state_file=str(path)))).fell_back
    assert not guard_of(ScriptedEngine(_section(action="fallback"))).fell_back


def test_a_state_file_that_cannot_be_written_is_logged_and_queued_shadows_still_start(caplog):
    """The review's repro (issue 44, L1): with state_file in a folder that does not exist, the
    write that records the fallback raised out of the shadow that triggered it, so the shadows
    still queued behind it (one slot) never started and their requests stayed pending. Now the
    error is logged and every queued shadow runs; no user's request sees it."""
    from vllm.sampling_params import SamplingParams

    from selfjudge_vllm import adapter_guard
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section(action="fallback", max_in_flight=1, state_file="/nonexistent-dir/guard.json"),
                            delay=0.01)
    call = _wrapped(engine)

    async def traffic():
        async def user(i):
            return [o async for o in call({"prompt_token_ids": [5]}, SamplingParams(temperature=0, max_tokens=4),
                                          f"u{i}")]

        users = await asyncio.gather(*(user(i) for i in range(4)), return_exceptions=True)
        shadows = []
        while adapter_guard._TASKS:
            shadows += await asyncio.gather(*list(adapter_guard._TASKS), return_exceptions=True)
        return users, shadows

    users, shadows = asyncio.run(traffic())
    state = guard_of(engine)
    assert not [r for r in users + shadows if isinstance(r, BaseException)]
    assert state.fell_back and (state.sampled, state.compared, state.pending, state.queued, state.in_flight) == (
        4, 4, 0, 0, 0)
    assert "cannot record the fallback in state_file /nonexistent-dir/guard.json" in caplog.text


# -- a real server on tiny models --------------------------------------------------------------------


async def _ask(client, kind, stream, prompt, xargs=None):
    """One request of the given kind; returns its text."""
    body = {"vllm_xargs": xargs} if xargs else None
    if kind == "chat":
        messages = [{"role": "user", "content": prompt}]
        if stream:
            parts = []
            async for chunk in await client.chat.completions.create(model="tiny", messages=messages, max_tokens=24,
                                                                     temperature=0, stream=True, extra_body=body):
                parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            return "".join(parts)
        out = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                   extra_body=body)
        return out.choices[0].message.content
    if stream:
        parts = []
        async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                                            stream=True, extra_body=body):
            parts.append(chunk.choices[0].text if chunk.choices else "")
        return "".join(parts)
    out = await client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body=body)
    return out.choices[0].text


def _guard_metrics(server) -> dict:
    from selfjudge_vllm.testing.load import parse_metric

    text = server.get("/metrics")
    names = ("shadows_sampled_total", "shadows_compared_total", "shadows_skipped_total", "shadows_abandoned_total",
             "shadows_failed_total", "text_changed_total", "fallback", "shadows_in_flight", "shadows_in_flight_max",
             "shadows_pending", "change_rate_lower")
    return {n: parse_metric(text, f"vllm:selfjudge_guard_{n}") for n in names}


def _settled(server, timeout=120.0) -> dict:
    """The guard's metrics once every sampled request's outcome is recorded."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        m = _guard_metrics(server)
        if m["shadows_pending"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def _start(workdir, tiny_pair, tmp_path, name, bias, guard_section):
    import torch

    from selfjudge_vllm.testing.load import Server, free_port, serve_command
    from selfjudge_vllm.testing.tiny_models import write_head
    from tests.engine_helpers import spec_config

    target, draft = tiny_pair
    head = write_head(workdir / f"heads/{name}", target, torch.zeros(64), bias=bias)
    section = {"head": str(head), "guard": guard_section}
    command = serve_command(target, free_port(), spec_config("draft_model", draft), {"selfjudge": section})
    return Server(command, tmp_path / f"{name}.log", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})


PROMPTS = ["one two three four five", "the model token draft judge", "river stone house tree red",
           "accept verify river stone", "green blue the model one", "seven eight nine ten the"]
KINDS = [("completions", False), ("chat", True), ("completions", True), ("chat", False)]


@pytest.mark.server
def test_a_guarded_server_falls_back_answers_like_lossless_and_bounds_its_shadows(workdir, tiny_pair, tmp_path):
    from openai import AsyncOpenAI

    server = _start(workdir, tiny_pair, tmp_path, "guard_accept_all", 20.0,
                    {"sample_share": 1.0, "budget": 0.05, "action": "fallback", "max_in_flight": 2})
    try:
        async def scenario():
            client = AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
            # 1. one request at a time, every kind, until the guard falls back
            sent, history = 0, []
            while sent < 24:
                kind, stream = KINDS[sent % len(KINDS)]
                await _ask(client, kind, stream, PROMPTS[sent % len(PROMPTS)])
                sent += 1
                m = _settled(server)
                history.append(m)
                if m["fallback"] == 1.0:
                    break
            # 2. afterwards a default request answers like lossless, for every kind
            same = [await _ask(client, k, s, p) == await _ask(client, k, s, p, {"selfjudge_enabled": "false"})
                    for (k, s), p in zip(KINDS, PROMPTS)]
            # 3. 64 concurrent users who chose the judge explicitly (still relaxed, still shadowed)
            results = await asyncio.gather(*(
                _ask(client, *KINDS[i % len(KINDS)], PROMPTS[i % len(PROMPTS)], {"selfjudge_threshold": "0.5"})
                for i in range(64)), return_exceptions=True)
            await client.close()
            return sent, history, same, results

        sent, history, same, results = asyncio.run(scenario())
        final = history[-1]
        compared, changed = int(final["shadows_compared_total"]), int(final["text_changed_total"])
        assert final["fallback"] == 1.0, history
        # it fell back at the first comparison where the bound allowed it, not later
        assert guard.exceeds(changed, compared - changed, 0.05, DELTA)
        before = history[-2] if len(history) > 1 else None
        if before is not None:
            c0, x0 = int(before["shadows_compared_total"]), int(before["text_changed_total"])
            assert not guard.exceeds(x0, c0 - x0, 0.05, DELTA)
        assert all(same), same
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        after = _settled(server)
        # 64 at once with 2 slots: every shadow waited for its turn, none was dropped
        assert after["shadows_in_flight_max"] <= 2 and after["shadows_compared_total"] == compared + 64
        assert after["shadows_sampled_total"] == compared + 64 and after["shadows_pending"] == 0
        assert after["shadows_skipped_total"] == after["shadows_abandoned_total"] == after["shadows_failed_total"] == 0
        assert "falling back to lossless verification" in server.tail(200_000)
    finally:
        server.stop()


@pytest.mark.server
def test_a_guarded_server_with_a_reject_all_head_never_falls_back(workdir, tiny_pair, tmp_path):
    from openai import AsyncOpenAI

    server = _start(workdir, tiny_pair, tmp_path, "guard_reject_all", -20.0,
                    {"sample_share": 1.0, "budget": 0.05, "action": "fallback", "max_in_flight": 4})
    try:
        async def scenario():
            client = AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
            for i in range(12):
                await _ask(client, *KINDS[i % len(KINDS)], PROMPTS[i % len(PROMPTS)])
                _settled(server)
            await client.close()

        asyncio.run(scenario())
        m = _settled(server)
        assert (m["shadows_compared_total"], m["text_changed_total"], m["fallback"]) == (12, 0, 0.0)
    finally:
        server.stop()


@pytest.mark.parametrize("cosine, falls_back", [(0.95, False), (0.5, True)])
def test_a_meaning_guard_counts_meaning_changes_not_token_changes(cosine, falls_back):
    """Every relaxed response differs from lossless in its tokens; the meaning guard counts it
    changed only when the embedding scorer (here a fixed cosine) is below its threshold."""
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section(action="fallback", measure="meaning", meaning_threshold=0.9))
    state = guard_of(engine)
    state.meaning.embedder = FixedCosine(cosine)
    asyncio.run(_serve(engine, 20))
    assert state.text_changed == state.compared > 0 and state.fell_back == falls_back
    assert state.meaning_changed == (state.compared if falls_back else 0) and state.meaning.embedder.calls == state.compared
    assert ("meaning changed in" in state.reason) == falls_back


class TextEngine(ScriptedEngine):
    """Relaxed and lossless responses with texts of their own (non-streamed)."""

    def __init__(self, section, relaxed_text, lossless_text):
        super().__init__(section)
        self.texts = {False: relaxed_text, True: lossless_text}

    async def generate(self, prompt, params, request_id, **kwargs):
        self.seen.append((request_id, dict(params.extra_args or {}), kwargs))
        lossless = str((params.extra_args or {}).get("selfjudge_enabled", True)).lower() == "false"
        yield _output([1, 2, 3, 4] if lossless else self.relaxed, self.texts[lossless], True)


LOSSLESS_TEXT = "Warm up for ten minutes, run for twenty, then cool down."


@pytest.mark.parametrize("relaxed_text, changed", [
    ("I think the answer is this one. " * 4, True),  # a new loop in the relaxed response: changed
    (LOSSLESS_TEXT, False),  # other tokens, the same text: unchanged, as calibrate decides
])
def test_the_meaning_guard_reads_the_relaxed_text_as_relaxed(relaxed_text, changed):
    """Through the wrapper: the loop check is asymmetric (a loop only the relaxed response has),
    so this fails if the two texts are handed over the other way round."""
    from selfjudge_vllm.adapter_guard import guard_of

    engine = TextEngine(_section(measure="meaning"), relaxed_text, LOSSLESS_TEXT)
    state = guard_of(engine)
    state.meaning.embedder = FixedCosine(0.999)  # the embedding scorer would call these the same
    asyncio.run(_serve(engine, 5))
    assert (state.compared, state.text_changed, state.meaning_changed) == (5, 5, 5 if changed else 0)
    reversed_loop = TextEngine(_section(measure="meaning"), LOSSLESS_TEXT, "I think the answer is this one. " * 4)
    guard_of(reversed_loop).meaning.embedder = FixedCosine(0.999)
    asyncio.run(_serve(reversed_loop, 3))
    assert guard_of(reversed_loop).meaning_changed == 0  # the lossless response's own loop is not a change


def test_an_embedding_model_that_fails_to_load_fails_each_comparison_once_logged(caplog):
    from selfjudge_vllm.adapter_guard import guard_of

    loads = []

    def broken():
        loads.append(1)
        raise OSError("no model files")

    engine = ScriptedEngine(_section(action="fallback", measure="meaning"))
    state = guard_of(engine)
    state.meaning.embedder_factory = broken
    with caplog.at_level("ERROR", logger="vllm.selfjudge"):
        asyncio.run(_serve(engine, 6))
    assert (state.compared, state.failed, state.fell_back, len(loads)) == (0, 6, False, 1)
    assert sum("the meaning measure cannot compare" in r.getMessage() for r in caplog.records) == 1


def test_a_meaning_guard_that_cannot_work_fails_at_start_up():
    from selfjudge_vllm.vllm_patches import check_meaning_guard

    settings = guard.GuardSettings(0.05, "meaning", None, 0.99)
    served = SimpleNamespace(model_config=SimpleNamespace(skip_tokenizer_init=False))
    check_meaning_guard(served, settings, embedder_factory=lambda: FixedCosine(1.0))  # loads: starts

    def missing():
        raise ImportError("No module named 'sentence_transformers'")

    with pytest.raises(ConfigError, match=r"cannot load the embedding scorer .*pip install"):
        check_meaning_guard(served, settings, embedder_factory=missing)
    no_texts = SimpleNamespace(model_config=SimpleNamespace(skip_tokenizer_init=True))
    with pytest.raises(ConfigError, match="this server makes none"):
        check_meaning_guard(no_texts, settings, embedder_factory=lambda: FixedCosine(1.0))
