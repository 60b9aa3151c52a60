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

from selfjudge_vllm import guard
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
    assert guard.resolve(config, {"budget": 0.02, "measure": "answer_changes"}) == (0.02, "answer")
    with pytest.raises(ValueError, match="carries no certified budget"):
        guard.resolve(config, {})
    own = parse_section({"selfjudge": {"rule": "top_alpha", "guard": {"sample_share": 0.05, "budget": 0.1}}})
    assert guard.resolve(own, None) == (0.1, "text")


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


def _output(tokens, text, finished):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, text=text)], finished=finished)


def _wrapped(engine):
    from selfjudge_vllm.adapter_guard import _wrap_generate

    generate = _wrap_generate(ScriptedEngine.generate)
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


def test_shadows_beyond_max_in_flight_are_skipped_and_counted():
    from selfjudge_vllm.adapter_guard import guard_of

    engine = ScriptedEngine(_section(max_in_flight=2), delay=0.2)

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
    assert state.max_in_flight_seen == 2 and state.compared == 2 and state.skipped == 8 and state.in_flight == 0


def test_a_recorded_fallback_survives_a_restart_only_with_a_state_file(tmp_path):
    from selfjudge_vllm.adapter_guard import guard_of

    path = tmp_path / "guard.json"
    engine = ScriptedEngine(_section(action="fallback", state_file=str(path)))
    asyncio.run(_serve(engine, 6))
    assert guard_of(engine).fell_back and json.loads(path.read_text())["fell_back"]
    assert guard_of(ScriptedEngine(_section(action="fallback", state_file=str(path)))).fell_back
    assert not guard_of(ScriptedEngine(_section(action="fallback"))).fell_back
