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

import numpy as np
import torch

from selfjudge_vllm.features import chunk_rows_for, evidence_from_logits, row_max_and_top1_logprob
from selfjudge_vllm.metrics import JudgeCounters, MetricsSink
from selfjudge_vllm.rules import (
    JUDGE,
    LOSSLESS,
    TABLE_COLUMNS,
    JudgeHead,
    RowRule,
    StepRules,
    decide_and_force_,
    draft_entries,
    request_values,
    row_entropy,
    set_draft_entries_,
    topk_entropy,
)

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
        max_step_rows: int = 0,
        fly_window: int = 6,
        fly_top_k: int = 3,
    ):
        self.head = head
        self.default_rule = default_rule
        # extra_args of a request -> its rule (validated at admission).
        self.request_rule = request_rule
        self.entropy_window = entropy_window
        self.fly_window, self.fly_top_k = fly_window, fly_top_k
        self._rules_by_request: dict[str, RowRule] = {}
        self._table: RequestRuleTable | None = None
        # Requests with a reasoning scope: (output tokens read so far, inside the span now).
        self._spans: dict[str, tuple[int, bool]] = {}
        self.sink = sink
        self.log_interval_s = log_interval_s
        self.pending: PendingStep | None = None
        # Draft entries forced and not yet written back: (logits, drafts, original, rows).
        self._forced: list[tuple] = []
        # Device-side running sums [draft tokens seen, judge-accepted]; only the publisher
        # thread reads them, so the step path never waits on the device.
        self._device_counts: torch.Tensor | None = None
        self.counters = JudgeCounters()
        # Set by the adapter while vLLM's memory profiling runs the sampler on dummy inputs.
        self.profiling = False
        self.profiled_rows = 0
        # The most draft rows one step can verify (max_num_seqs x draft tokens): what
        # profiling sizes the judge's temporaries for.
        self.max_step_rows = max_step_rows

    # -- step protocol, driven by the adapter -------------------------------------------

    def begin_step(self, sample_hidden_states, draft_token_ids, target_logits_indices, rules=None,
                   logits=None) -> None:
        if rules is None:
            rules = StepRules(self.default_rule, present=frozenset({self.default_rule.rule}))
        self.pending = PendingStep(sample_hidden_states, logits, draft_token_ids, target_logits_indices, rules)

    def step_rules(self, requests: Iterable[tuple], device, prune: bool = True) -> StepRules:
        """The rules of a batch of (request id, number of draft tokens, extra_args[, tokens]),
        in batch order; tokens: (prompt token ids, output token ids), needed for requests with
        a reasoning scope. Each request is resolved once, at its first step; outside its
        reasoning span a scoped request is verified losslessly. With `prune`, requests absent
        from the batch are forgotten (model runner V1: a request missing from a step has
        finished, or was preempted and is resolved again when back); without it, the adapter
        calls `forget` when vLLM removes a request (model runner V2, which verifies a step in
        chunks of requests)."""
        if self._table is None or self._table.device != torch.device(device):
            self._table = RequestRuleTable(device)
        rules, spans = self._rules_by_request, self._spans
        req_ids, counts = [], []
        for req_id, num_drafts, extra_args, *tokens in requests:
            rule = rules.get(req_id)
            if rule is None:
                rule = rules[req_id] = self.default_rule if self.request_rule is None else self.request_rule(extra_args)
            effective = rule
            if rule.reasoning_end is not None:
                prompt, output = tokens[0] if tokens else ((), ())
                spans[req_id] = span = reasoning_span(rule, prompt, output, spans.get(req_id))
                effective = rule if span[1] else LOSSLESS
            self._table.set(req_id, effective)
            req_ids.append(req_id)
            counts.append(num_drafts)
        if prune:
            in_step = set(req_ids)
            for req_id in [r for r in rules if r not in in_step]:
                del rules[req_id]
                spans.pop(req_id, None)
            self._table.keep_only(rules)
        return self._table.step(req_ids, counts)

    def forget(self, req_id: str) -> None:
        """Drop a request's rule and span state (vLLM removed it)."""
        self._rules_by_request.pop(req_id, None)
        self._spans.pop(req_id, None)
        if self._table is not None:
            self._table.remove(req_id)

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
        if step is None and self.profiling:
            self.profile_(target_logits)
            return False
        if step is None or draft_token_ids is not step.draft_token_ids:
            self.counters.unmatched_calls += 1
            return False
        step.judged = True
        if draft_token_ids.numel() == 0:
            return True
        self.decide_(step.rules, draft_token_ids, target_logits, step.target_logits_indices,
                     lambda rows: step.sample_hidden_states.index_select(0, rows), step.logits)
        return True

    def decide_(self, rules: StepRules, draft_token_ids: torch.Tensor, processed_logits: torch.Tensor,
                verify_rows: torch.Tensor, hidden_at: Callable[[torch.Tensor], torch.Tensor],
                raw_logits: torch.Tensor | None, logit_rows: torch.Tensor | None = None) -> None:
        """Decide and force the draft rows of one verification call, in place, and count them
        (both runners' adapters call this).

        verify_rows: [n] the row verifying each draft among the step's sampled rows, in the
            row space of `raw_logits` and of `hidden_at`; the row after it holds the hidden
            state at the draft token's own position (for the last draft, the bonus row).
        hidden_at(rows): the final-norm hidden states of those sampled rows.
        raw_logits: the model's own logits of the sampled rows (the logit features).
        processed_logits / logit_rows: as in rules.decide_and_force_.
        """
        hidden = head = evidence = None
        if self.head is not None and JUDGE in rules.present:
            head = self.head.to(processed_logits.device)
            if head.reads_hidden:
                hidden = hidden_at(verify_rows + 1)
            if head.logit_features:
                if raw_logits is None:
                    raise JudgeNotAppliedError("selfjudge: the step's logits were not kept; the head needs them")
                evidence = evidence_from_logits(raw_logits, verify_rows, draft_token_ids, head.logit_features)
        original = draft_entries(processed_logits, draft_token_ids, logit_rows)
        accept, valid = decide_and_force_(rules, draft_token_ids, processed_logits, hidden, head,
                                          self.entropy_window, evidence, logit_rows, self.fly_window, self.fly_top_k)
        self._forced.append((processed_logits, draft_token_ids, original, logit_rows))
        self._count(valid, accept)

    def unforce_(self) -> None:
        """Write back the draft entries forced since the last call: the adapters call it once
        vLLM's verification kernel has read them, so logprobs vLLM computes from the
        processed logits afterwards (processed_logprobs modes) are the target's own."""
        forced, self._forced = self._forced, []
        for processed_logits, draft_token_ids, original, logit_rows in forced:
            set_draft_entries_(processed_logits, draft_token_ids, original, logit_rows)

    def profile_(self, target_logits: torch.Tensor, hold: bool = False) -> torch.Tensor | None:
        """vLLM's memory profiling calls the sampler once on dummy rows before it sizes the
        KV cache: run the vocabulary-wide work of the worst step this server can reach
        (`max_step_rows` draft rows: the logit features' log-softmax, the entropy rule's
        softmax and FLy's top-k entropy through an index list, each chunked by
        CHUNK_ELEMENTS) on a view of those
        rows, so the peak it measures holds the largest temporaries a step can make.

        With `hold` (model runner V2, which profiles the sampler outside verification), the
        judge's largest simultaneous temporaries (three float32 chunks: a chunk's rows
        gathered, their softmax and its entropy terms) are returned still allocated, for the caller to keep while vLLM's
        own dummy pass runs: the measured peak is then the sum of both, as in a real step."""
        if target_logits.shape[0] == 0:
            return None
        rows = max(target_logits.shape[0], self.max_step_rows)
        worst = target_logits[:1].expand(rows, -1)  # a view: only the work's temporaries are new
        every = torch.arange(rows, device=worst.device)
        row_max_and_top1_logprob(worst)
        row_entropy(worst, every)
        topk_entropy(worst, every, self.fly_top_k)
        self.profiled_rows += rows
        if not hold:
            return None
        chunk_rows = min(rows, chunk_rows_for(worst))
        return torch.empty((3, chunk_rows, worst.shape[-1]), dtype=torch.float32, device=worst.device)

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


def host_to_device(array: np.ndarray, device) -> torch.Tensor:
    """A host array on `device` without blocking the host: on CUDA it is staged in pinned
    memory (a copy from pageable memory waits for the device), as vLLM's async_tensor_h2d
    does. The pinned block comes from torch's caching host allocator, which records the
    copy and hands the block out again only once the copy has finished, so a caller can
    drop the staging tensor at once."""
    device = torch.device(device)
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device, copy=True)
    return host.pin_memory().to(device, non_blocking=True)


class RequestRuleTable:
    """Per-request rule state in persistent host buffers, vLLM's pattern for sampling
    parameters: a request's values are written when it is added or its rule changes; a step
    gathers its batch's values with one vectorized index into a staging tensor (pinned on
    CUDA) and copies it to the device once, where StepRules.expand makes the rows."""

    def __init__(self, device, capacity: int = 64):
        self.device = torch.device(device)
        self._slot_of: dict[str, int] = {}
        self._rule_in_slot: list[RowRule | None] = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._values = np.zeros((capacity, TABLE_COLUMNS - 1), np.float32)  # request_values per slot

    def set(self, req_id: str, rule: RowRule) -> None:
        slot = self._slot_of.get(req_id)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._slot_of[req_id] = self._free.pop()
        elif self._rule_in_slot[slot] == rule:
            return
        self._rule_in_slot[slot] = rule
        self._values[slot] = request_values(rule)

    def remove(self, req_id: str) -> None:
        slot = self._slot_of.pop(req_id, None)
        if slot is not None:
            self._rule_in_slot[slot] = None
            self._free.append(slot)

    def keep_only(self, req_ids) -> None:
        """Free the slots of requests not in `req_ids`."""
        for req_id in [r for r in self._slot_of if r not in req_ids]:
            self.remove(req_id)

    def step(self, req_ids: list[str], counts: list[int]) -> StepRules:
        """The rules of one verification call (model runner V2 makes one per chunk, so a
        step can make several). Each call stages into its own tensor: a fixed pair of
        buffers reused in turn made the third chunk of a step wait for the first chunk's
        copy, i.e. for the device to finish the step so far."""
        slots = [self._slot_of[req_id] for req_id in req_ids]
        rules = [self._rule_in_slot[slot] for slot in slots]
        if not StepRules.needs_table(rules, counts):
            return StepRules.expand(rules, counts, None)
        rows = np.empty((len(slots), TABLE_COLUMNS), np.float32)
        rows[:, : TABLE_COLUMNS - 1] = self._values[slots]
        rows[:, TABLE_COLUMNS - 1] = counts
        return StepRules.expand(rules, counts, host_to_device(rows, self.device))

    def _grow(self) -> None:
        old = len(self._rule_in_slot)
        self._rule_in_slot += [None] * old
        self._free += list(range(2 * old - 1, old - 1, -1))
        self._values = np.concatenate([self._values, np.zeros_like(self._values)])


def reasoning_span(rule: RowRule, prompt, output, previous: tuple[int, bool] | None) -> tuple[int, bool]:
    """(output tokens read, inside the reasoning span after them), reading only the output
    tokens added since `previous`. Without a start marker the span opens with the response;
    with one, it is open after the last start marker (prompt or output) not followed by an
    end marker. Reading stops at a placeholder (-1: a token async scheduling has not resolved
    yet) and goes on from there next time; a list vLLM shortened since is read from its end."""
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
    read = min(read, len(output))
    for token in output[read:]:
        if token < 0:
            break
        if token == rule.reasoning_end:
            inside = False
        elif token == rule.reasoning_start:
            inside = True
        read += 1
    return read, inside


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
