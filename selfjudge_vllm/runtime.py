"""Per-worker state: the rules and head on the model's device, decision counters, step tracking.

No vLLM import: the adapter (vllm_patches.py) hands in plain tensors. One `JudgeRuntime`
belongs to one model runner.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from selfjudge_vllm.features import evidence_from_logits
from selfjudge_vllm.metrics import JudgeCounters, MetricsSink
from selfjudge_vllm.rules import JUDGE, LOSSLESS, JudgeHead, RowRule, StepRules, decide_and_force_

logger = logging.getLogger("vllm.selfjudge")


class JudgeNotAppliedError(RuntimeError):
    """A verification step with draft tokens ran without the judge: the vLLM hook broke."""


@dataclass
class PendingStep:
    """What `sample_tokens` kept for the rejection sampler call of the same step."""

    sample_hidden_states: torch.Tensor  # [num_logits_rows, H], rows aligned with logits
    logits: torch.Tensor | None  # [num_logits_rows, V], the model's own (grammar masks only)
    draft_token_ids: torch.Tensor  # [num_draft_tokens], the object vLLM will verify
    target_logits_indices: torch.Tensor  # [num_draft_tokens]
    rules: StepRules  # the rule and knob of every draft row
    judged: bool = False


class JudgeRuntime:
    def __init__(
        self,
        head: JudgeHead | None,
        sink: MetricsSink | None,
        log_interval_s: float,
        default_rule: RowRule,
        request_rule: Callable[[Any], RowRule] | None = None,
        entropy_window: int = 2,
    ):
        self.head = head
        self.default_rule = default_rule
        # extra_args of a request -> its rule (validated at admission).
        self.request_rule = request_rule
        self.entropy_window = entropy_window
        self._rules_by_request: dict[str, RowRule] = {}
        # Requests with a reasoning scope: (output tokens read so far, inside the span now).
        self._spans: dict[str, tuple[int, bool]] = {}
        self.sink = sink
        self.log_interval_s = log_interval_s
        self.pending: PendingStep | None = None
        # Device-side running sums [draft tokens seen, judge-accepted]; only the publisher
        # thread reads them, so the step path never waits on the device.
        self._device_counts: torch.Tensor | None = None
        self.counters = JudgeCounters()

    # -- step protocol, driven by the adapter -------------------------------------------

    def begin_step(self, sample_hidden_states, draft_token_ids, target_logits_indices, rules=None,
                   logits=None) -> None:
        if rules is None:
            rules = StepRules(self.default_rule, present=frozenset({self.default_rule.rule}))
        self.pending = PendingStep(sample_hidden_states, logits, draft_token_ids, target_logits_indices, rules)

    def step_rules(self, requests: Iterable[tuple], device) -> StepRules:
        """The rules of a batch of (request id, number of draft tokens, extra_args[, tokens]),
        in batch order; tokens: (prompt token ids, output token ids), needed for requests with
        a reasoning scope. Each request is resolved once, at its first step; outside its
        reasoning span a scoped request is verified losslessly."""
        previous, self._rules_by_request = self._rules_by_request, {}
        spans, self._spans = self._spans, {}
        rows = []
        for req_id, num_drafts, extra_args, *tokens in requests:
            rule = previous.get(req_id)
            if rule is None:
                rule = self.default_rule if self.request_rule is None else self.request_rule(extra_args)
            self._rules_by_request[req_id] = rule
            if rule.reasoning_end is not None:
                prompt, output = tokens[0] if tokens else ((), ())
                self._spans[req_id] = span = reasoning_span(rule, prompt, output, spans.get(req_id))
                if not span[1]:
                    rows.append((LOSSLESS, num_drafts))
                    continue
            rows.append((rule, num_drafts))
        return StepRules.build(rows, device)

    def end_step(self) -> None:
        step, self.pending = self.pending, None
        if step is None:
            return
        if not step.judged and step.draft_token_ids.numel() > 0:
            raise JudgeNotAppliedError(
                "selfjudge: vLLM verified draft tokens without calling the patched "
                "rejection_sample; this vLLM version routes verification elsewhere and the "
                "judge would be silently off. See selfjudge_vllm/vllm_patches.py."
            )
        self.counters.steps_judged += 1

    def judge_(self, draft_token_ids: torch.Tensor, target_logits: torch.Tensor) -> bool:
        """Apply the judge to `target_logits` in place if this call verifies the pending
        step's draft tokens. A call it cannot match is counted and left alone; the step
        then fails in end_step, because its own drafts were never judged."""
        step = self.pending
        if step is None or draft_token_ids is not step.draft_token_ids:
            self.counters.unmatched_calls += 1
            return False
        step.judged = True
        if draft_token_ids.numel() == 0:
            return True
        # The hidden state at the draft token's own position is the row after the one whose
        # logits verify it (for the last draft token, the bonus row).
        hidden = head = evidence = None
        if self.head is not None and JUDGE in step.rules.present:
            head = self.head.to(target_logits.device)
            if head.reads_hidden:
                hidden = step.sample_hidden_states.index_select(0, step.target_logits_indices + 1)
            if head.logit_features:
                if step.logits is None:
                    raise JudgeNotAppliedError("selfjudge: the step's logits were not kept; the head needs them")
                evidence = evidence_from_logits(step.logits, step.target_logits_indices, draft_token_ids,
                                                head.logit_features)
        accept, valid = decide_and_force_(
            step.rules, draft_token_ids, target_logits, hidden, head, self.entropy_window, evidence
        )
        self._count(valid, accept)
        return True

    # -- counters -----------------------------------------------------------------------

    def _count(self, valid: torch.Tensor, accept: torch.Tensor) -> None:
        if self._device_counts is None:
            self._device_counts = torch.zeros(2, dtype=torch.int64, device=accept.device)
        self._device_counts.add_(torch.stack((valid, accept)).sum(1))

    def flush(self) -> JudgeCounters:
        """Read the device counters into `counters` and publish them. Waits for the
        device, so it runs on the publisher thread, at shutdown, and in tests, never on
        the step path."""
        device_counts = self._device_counts
        if device_counts is not None:
            seen, accepted = device_counts.tolist()
            self.counters.draft_tokens, self.counters.judge_accepted = seen, accepted
        if self.sink is not None:
            self.sink.write(self.counters)
        return self.counters

    def start_publisher(self, publish_interval_s: float = 1.0) -> None:
        """A daemon thread that publishes the counters every `publish_interval_s` and logs
        them every `log_interval_s`. It holds the runtime weakly and ends with it."""
        if self.sink is None and self.log_interval_s <= 0:
            return
        thread = threading.Thread(
            target=_publish_loop,
            args=(weakref.ref(self), publish_interval_s, self.log_interval_s),
            name="selfjudge-metrics",
            daemon=True,
        )
        thread.start()


def reasoning_span(rule: RowRule, prompt, output, previous: tuple[int, bool] | None) -> tuple[int, bool]:
    """(output tokens read, inside the reasoning span after them), reading only the output
    tokens added since `previous`. Without a start marker the span opens with the response;
    with one, it is open after the last start marker (prompt or output) not followed by an
    end marker."""
    if previous is None:
        inside = rule.reasoning_start is None
        if rule.reasoning_start is not None:
            for token in prompt:
                if token == rule.reasoning_start:
                    inside = True
                elif token == rule.reasoning_end:
                    inside = False
        previous = (0, inside)
    read, inside = previous
    for token in output[read:]:
        if token == rule.reasoning_end:
            inside = False
        elif token == rule.reasoning_start:
            inside = True
    return len(output), inside


def _publish_loop(runtime_ref, publish_interval_s: float, log_interval_s: float) -> None:
    next_log = time.monotonic() + log_interval_s
    last_logged = None  # log only when the counts moved since the previous log line
    while True:
        time.sleep(publish_interval_s)
        runtime = runtime_ref()
        if runtime is None:
            return
        try:
            counters = runtime.flush()
            snapshot = (counters.draft_tokens, counters.steps_judged)
            if log_interval_s > 0 and time.monotonic() >= next_log and snapshot != last_logged:
                counters.log(logger)
                next_log = time.monotonic() + log_interval_s
                last_logged = snapshot
        except Exception as exc:  # metrics must never take the worker down
            logger.warning("selfjudge metrics publisher: %s", exc)
        del runtime
