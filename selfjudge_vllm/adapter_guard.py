"""Guarded serving, the vLLM side: a wrapper of the engine client's `generate` (the one call
both OpenAI endpoints, chat and completions, streaming or not, make per request) in the API
server process. Every attribute read or patched here is in vllm_seams.py.

When a request arrives that the server verifies relaxed and that can be compared (greedy,
one sequence, more than one token, not a shadow itself, a prompt that can be submitted
again: not an already processed EngineCoreRequest nor an async generator of streaming
inputs), the guard decides there whether it is sampled, before anything about its response
is known, and gives it its place in the sampling order. Once the user's response has run to
its end, its shadow (the same prompt and parameters with `selfjudge_enabled=false`, at the
lowest priority when vLLM schedules by priority) waits for one of max_in_flight slots, runs
in the background and is compared on token ids (measure text), answers (measure answer) or
meaning (measure meaning: guard.MeaningComparer on the two texts, in a worker thread).
The user's request never waits for its shadow. A sampled response that does not run to its
end (the client closed the stream or disconnected, the engine aborted it, an error) is
recorded as abandoned, so it is counted, not lost. Sampled (temperature > 0) requests are
never shadowed: their relaxed and lossless runs draw different random numbers once a token
differs, so a difference says nothing about the rule.

After a fallback, requests that carry no `selfjudge_*` option are served lossless (their
extra_args get `selfjudge_enabled=false`); requests that chose a rule explicitly keep it (the
server's policy: an explicit choice is the client's; counted, and still shadowed).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import json
import logging
from pathlib import Path

from selfjudge_vllm.config import parse_section
from selfjudge_vllm.guard import ABANDONED, FAILED, Comparison, GuardSettings, GuardState, answer_of, resolve
from selfjudge_vllm.request_control import KEY_PREFIX

logger = logging.getLogger("vllm.selfjudge")

SHADOW_PREFIX = "selfjudge-shadow-"
LOWEST_PRIORITY = 2**31 - 1  # vLLM's priority scheduling serves lower values first
_STATE = "_selfjudge_guard"
# Every live guard (one per engine client), for the /metrics collector.
GUARDS: list[GuardState] = []


def install_guard_hook() -> None:
    from selfjudge_vllm.patching import _install

    _install("vllm.v1.engine.async_llm:AsyncLLM.generate", _wrap_generate)


def guard_of(engine) -> GuardState | None:
    """The engine client's guard, built at its first request (None: no guard configured)."""
    state = engine.__dict__.get(_STATE, False)
    if state is False:
        state = None
        config = parse_section(getattr(engine.vllm_config, "additional_config", None))
        if config is not None and config.enabled and config.guard is not None and config.guard.enabled:
            settings = guard_settings(config)
            state = GuardState(config.guard, settings.budget, settings.measure, settings.answer_pattern,
                               settings.meaning_threshold)
            if config.guard.state_file and _fallback_recorded(Path(config.guard.state_file)):
                state.fell_back = True
                state.reason = f"fallback recorded in {config.guard.state_file} by an earlier run"
                logger.warning("selfjudge guard: starting lossless: %s", state.reason)
            GUARDS.append(state)
            _register_metrics()
        engine.__dict__[_STATE] = state
    return state


def guard_settings(config) -> GuardSettings:
    """The guard's budget and measure: its own, or those of the certified operating point it
    serves."""
    evidence = None
    if config.guard.budget is None or config.guard.measure is None:
        if config.head is not None and config.operating_point:
            from selfjudge_vllm.artifact import JudgeArtifact

            point = JudgeArtifact.load(config.head).config.operating_points.get(config.operating_point)
            evidence = point.evidence if point is not None else None
    return resolve(config, evidence)


def _fallback_recorded(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("fell_back"))
    except (OSError, ValueError):
        return False


def is_explicit(extra_args) -> bool:
    return bool(extra_args) and any(str(k).startswith(KEY_PREFIX) for k in extra_args)


def is_relaxed(extra_args) -> bool:
    """Whether the server verifies this request relaxed (the judge is on for it)."""
    value = (extra_args or {}).get(f"{KEY_PREFIX}enabled", True)
    return not (value is False or str(value).lower() == "false")


def comparable(params) -> bool:
    """Greedy, one sequence, more than one token: a one-token response is the target model's
    own first token, sampled before any draft exists, so relaxed verification cannot change
    it (this also leaves out vLLM's online beam search, which calls generate once per beam
    and step with max_tokens=1)."""
    return params.n == 1 and params.temperature < 1e-5 and params.max_tokens != 1


def resubmittable(prompt) -> bool:
    """Whether a shadow can submit the prompt again: not an async generator of streaming
    inputs (consumed as the request runs; it cannot be copied)."""
    return not (inspect.isasyncgen(prompt) or hasattr(prompt, "__aiter__"))


# vLLM's finish reasons of a response that ran to its end ("abort" and "error" did not).
COMPLETE = ("stop", "length", "repetition")


def _wrap_generate(original):
    async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        guard = guard_of(self)
        if (guard is None or str(request_id).startswith(SHADOW_PREFIX) or not hasattr(sampling_params, "extra_args")
                or type(prompt).__name__ == "EngineCoreRequest"):  # a processed request: not re-submittable
            async for out in original(self, prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        if guard.fell_back:
            if is_explicit(sampling_params.extra_args):
                guard.explicit_after_fallback += 1
            else:
                sampling_params = sampling_params.clone()
                sampling_params.extra_args = {**(sampling_params.extra_args or {}), f"{KEY_PREFIX}enabled": False}
        # Decided at arrival, so whether a request is measured cannot depend on its response.
        seq = (guard.admit() if is_relaxed(sampling_params.extra_args) and comparable(sampling_params)
               and resubmittable(prompt) else None)
        if seq is None:
            async for out in original(self, prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        try:
            lossless_params = _lossless_copy(sampling_params)
            shadow_prompt = copy.deepcopy(prompt)  # the engine may consume what it was given
        except Exception:  # an admitted request must end as an outcome, or every later one waits
            logger.exception("selfjudge guard: cannot prepare a shadow request")
            _resolve(guard, seq, FAILED)
            async for out in original(self, prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        token_ids, text, ended = [], [], False
        cumulative = _is_cumulative(sampling_params)
        try:
            async for out in original(self, prompt, sampling_params, request_id, *args, **kwargs):
                if out.outputs:
                    first = out.outputs[0]
                    if cumulative:
                        token_ids[:], text[:] = list(first.token_ids), [first.text]
                    else:
                        token_ids.extend(first.token_ids)
                        text.append(first.text)
                if out.finished and not ended:
                    # Settled before the final output is handed on: a caller may stop reading there.
                    ended = True
                    if out.outputs and out.outputs[0].finish_reason in COMPLETE:
                        guard.queue_shadow(functools.partial(
                            _shadow, self, original, guard, seq, shadow_prompt, lossless_params, str(request_id),
                            list(token_ids), "".join(text), kwargs))
                        _start_ready(guard)
                    else:
                        _resolve(guard, seq, ABANDONED)
                yield out
        finally:
            if not ended:  # closed, cancelled (client gone) or failed before its final output
                _resolve(guard, seq, ABANDONED)

    return generate


_TASKS: set[asyncio.Task] = set()  # keeps running shadows referenced until they end


def _start_ready(guard: GuardState) -> None:
    """Starts queued shadows while slots are free (first ready, first started)."""
    while (job := guard.next_shadow()) is not None:
        task = asyncio.get_running_loop().create_task(job())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)


def _resolve(guard: GuardState, seq: int, outcome) -> None:
    """Records an outcome (a comparison may trigger the fallback); never raises into the
    user's response or a shadow: a state_file that cannot be written is logged."""
    message = guard.resolve(seq, outcome)
    if message:
        logger.warning("selfjudge guard: falling back to lossless verification for requests without "
                       "selfjudge_* options: %s", message)
        if guard.config.state_file:
            try:
                Path(guard.config.state_file).write_text(json.dumps(
                    {"fell_back": True, "reason": message, "compared": guard.compared, "changes": guard.changes,
                     "sampled_without_comparison": guard.unknown}))
            except Exception:  # the fallback holds in this process; only a restart would forget it
                logger.exception("selfjudge guard: cannot record the fallback in state_file %s: this server has "
                                 "fallen back, but a restart would start relaxed", guard.config.state_file)


def _is_cumulative(params) -> bool:
    from vllm.sampling_params import RequestOutputKind

    return params.output_kind != RequestOutputKind.DELTA


def _lossless_copy(params):
    from vllm.sampling_params import RequestOutputKind

    shadow = params.clone()
    shadow.extra_args = {**(params.extra_args or {}), f"{KEY_PREFIX}enabled": False}
    shadow.output_kind = RequestOutputKind.FINAL_ONLY
    return shadow


async def _shadow(engine, original, guard: GuardState, seq, prompt, params, request_id, token_ids, text, kwargs):
    """Runs the lossless twin and records the comparison; never raises into the server."""
    outcome, cancelled = FAILED, False
    try:
        keep = {k: v for k, v in kwargs.items() if k in ("lora_request", "tokenization_kwargs", "prompt_text")}
        if getattr(engine.vllm_config.scheduler_config, "policy", "fcfs") == "priority":
            keep["priority"] = LOWEST_PRIORITY
        final = None
        async for out in original(engine, prompt, params, SHADOW_PREFIX + request_id, **keep):
            final = out
        if final is not None and final.finished and final.outputs and final.outputs[0].finish_reason in COMPLETE:
            twin = final.outputs[0]
            text_changed = list(twin.token_ids) != list(token_ids)
            pattern = guard.answer_pattern
            meaning_changed = False
            if guard.meaning is not None and text_changed:
                try:  # the loop check and the embedding model in a worker thread, off the event loop
                    meaning_changed = await asyncio.to_thread(guard.meaning.changed, twin.text, text)
                except Exception:  # no comparison: the outcome stays FAILED
                    meaning_changed = None
                    if not guard.meaning_failure_logged:
                        guard.meaning_failure_logged = True
                        logger.exception("selfjudge guard: the meaning measure cannot compare; each comparison "
                                         "fails from now on (counted unchanged: the fallback cannot fire)")
            if meaning_changed is not None:
                outcome = Comparison(text_changed, text_changed and answer_of(twin.text, pattern)
                                     != answer_of(text, pattern), meaning_changed)
    except asyncio.CancelledError:  # the server is shutting down
        cancelled = True
        raise
    except Exception:  # a shadow's failure must not reach the user's request or the server
        logger.exception("selfjudge guard: a shadow request failed")
    finally:
        guard.end_shadow()
        try:
            _resolve(guard, seq, outcome)
        finally:  # the queued shadows start whatever happened here
            if not cancelled:
                _start_ready(guard)


_metrics_registered = False


def _register_metrics() -> None:
    """The guard's figures on the API server's /metrics (prometheus_client's default registry)."""
    global _metrics_registered
    if _metrics_registered:
        return
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    prefix = "vllm:selfjudge_guard"

    class Collector:
        def collect(self):
            # Each outcome is counted when it comes; the sampled requests still without one are pending.
            counters = {
                "shadows_sampled": ("Comparable relaxed requests sampled at arrival (skipped ones included).",
                                    lambda g: g.sampled),
                "shadows_compared": ("Sampled requests re-run lossless and compared.", lambda g: g.compared),
                "shadows_skipped": ("Sampled requests left out of the measurement at arrival: max_pending "
                                    "sampled requests were awaiting their outcome.", lambda g: g.skipped),
                "shadows_abandoned": ("Sampled requests whose response did not run to its end (client closed or "
                                      "disconnected, aborted, failed): no shadow.", lambda g: g.abandoned),
                "shadows_failed": ("Sampled requests without a comparable result: the shadow could not be "
                                   "prepared, errored or was aborted.", lambda g: g.failed),
                "text_changed": ("Compared requests whose tokens differ from lossless.", lambda g: g.text_changed),
                "answer_changed": ("Compared requests whose answer differs from lossless.", lambda g: g.answer_changed),
                "meaning_changed": ("Compared requests whose meaning differs from lossless (measure meaning: a new "
                                    "loop, or the embedding scorer below its threshold).", lambda g: g.meaning_changed),
                "explicit_after_fallback": ("Requests served with their explicit selfjudge_* choice after the "
                                            "fallback.", lambda g: g.explicit_after_fallback),
            }
            gauges = {
                "change_rate_lower": ("Lower end of the anytime-valid two-sided interval of the guarded change "
                                      "rate (at the guard's confidence).", lambda g: g.lower()),
                "change_rate_upper": ("Upper end of the anytime-valid two-sided interval of the guarded change "
                                      "rate (at the guard's confidence).", lambda g: g.upper()),
                "change_rate_fallback_bound": ("One-sided anytime-valid lower bound of the change rate at the "
                                               "guard's confidence; the fallback fires when it exceeds the budget.",
                                               lambda g: g.fallback_bound()),
                "budget": ("The change rate the guard promises.", lambda g: g.budget),
                "fallback": ("1 once the guard has fallen back to lossless verification, else 0.",
                             lambda g: float(g.fell_back)),
                "shadows_in_flight": ("Shadow requests running now.", lambda g: g.in_flight),
                "shadows_queued": ("Shadows waiting for one of max_in_flight slots.", lambda g: g.queued),
                "shadows_pending": ("Sampled requests whose outcome is not known yet (at most max_pending).",
                                    lambda g: g.pending),
                "shadows_in_flight_max": ("Most shadow requests running at once so far.",
                                          lambda g: g.max_in_flight_seen),
            }
            for name, (doc, value) in counters.items():
                family = CounterMetricFamily(f"{prefix}_{name}", doc)
                family.add_metric([], float(sum(value(g) for g in GUARDS)))
                yield family
            for name, (doc, value) in gauges.items():
                family = GaugeMetricFamily(f"{prefix}_{name}", doc)
                if GUARDS:
                    family.add_metric([], float(value(GUARDS[0])))
                yield family

    REGISTRY.register(Collector())
    _metrics_registered = True
