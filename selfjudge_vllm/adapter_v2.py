"""The Model Runner V2 adapter (`vllm/v1/worker/gpu/`: the only model runner from vLLM 0.34.0,
where even the x86 CPU runner subclasses its GPUModelRunner). vllm_patches.py installs it
where vLLM no longer has model runner V1; the judge itself (rules, features, head, request
table) is the same code as on V1 (runtime.py, rules.py). Every attribute touched is in
vllm_seams.SEAMS (runner V2).

How V2 verifies a step (vLLM 0.34.0 source): `GPUModelRunner.sample(hidden_states,
input_batch, grammar_output)` computes the logits of the sampled rows
(`hidden_states[input_batch.logits_indices]`), applies grammar masks in place and calls
`RejectionSampler.__call__(logits, input_batch, draft_logits)`. That verifies the batch in
chunks of whole requests (one chunk unless the float32 logits pass 1 GiB); per chunk
`RejectionSampler._verify` applies penalties, bans, temperature and top-k/top-p
(`processed_logits`) and calls the module-level `rejection_sample(target_logits=processed,
..., draft_sampled, ...)`, which `_verify` looks up by name at call time. Request i owns
logits rows `cu_num_logits_np[i] .. cu_num_logits_np[i+1]-1`; row r verifies the draft
`draft_sampled[r + 1]` (the input token of the next row; -1 for a placeholder, which the
kernels reject) and a request's last row is its bonus row. There is no registry for a
rejection sampler a plugin could add: the only override, `ModelState.custom_sampler`,
belongs to the model class, so the plugin wraps instead.

Patches, in the order a worker meets them:

1. `GPUModelRunner.__init__`: attaches a JudgeRuntime (as on V1).
   `GPUModelRunner.load_model` (builds the model state): refuses, at start-up, a model state
   that samples more than one new token per step (the bonus-row layout the judge reads).
2. `GPUModelRunner.add_requests` / `_remove_request`: V2 keeps no SamplingParams per request,
   so the adapter keeps each new request's `extra_args` until vLLM removes the request
   (finished or preempted; a preempted request is added again when it resumes).
3. `GPUModelRunner.sample`: keeps the step's hidden states and layout while it runs, and
   afterwards checks that every logits row went through the patched `rejection_sample`, so a
   vLLM change (or a model's custom rejection sampler) cannot switch the judge off silently.
4. `RejectionSampler.__call__`: keeps the model's own logits (grammar masks only) for the
   logit features.
5. `rejection_sample` (as imported into `vllm.v1.worker.gpu.spec_decode.rejection_sampler`):
   decides each draft row of the chunk with its request's rule and forces the accepted ones
   in the processed logits (rules.decide_and_force_ with the chunk's verifying rows), then
   calls the original unchanged. Bonus rows and lossless requests' rows are not written.
6. `GPUModelRunner._dummy_sampler_run`: runs the judge's vocabulary-wide work on logits of
   the dummy rows (`ModelState.compute_sample_logits`, as `sample` computes them) and keeps
   its temporaries allocated while vLLM's profiling pass runs, so the peak that sizes the KV
   cache holds both.

Refused at start-up on V2 (vllm_patches.py): scope 'reasoning', vLLM's own lossy verifiers
(`rejection_sample_method`), adaptive verification, batch-sharded sampling.

Checked on: vLLM 0.34.0 (source; tests/mrv2_verification_check.py drives these wraps
through 0.34.0's own Sampler and RejectionSampler, built as GPUModelRunner builds them, with
its Triton kernels in Triton's CPU interpreter; not run in an engine here: no CPU build of
vLLM 0.34 can be made on this project's machines; benchmarks/gpu_check.py is the engine check
for a GPU machine).

Forced entries are finite in the logits' dtype (rules.forced_logit): when no request of a
chunk needs processing, vLLM verifies the model's own float16/bfloat16 tensor. With
draft_sample_method="probabilistic" the kernels accept when p_target(draft) > u x q(draft)
(in log space, `target_logprob > tl.log(u) + draft_logprob`); a forced draft has p_target =
1 (log 0), and u = tl_rand32(...) is Triton's tl.rand, in (0, 1) (its largest value is
0.99999994 in float32), so log u < 0 <= -log q(draft) and a forced draft is always accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selfjudge_vllm.patching import UnsupportedConfiguration, _install, argument_getter, judged_call
from selfjudge_vllm.runtime import JudgeNotAppliedError, host_to_device

RUNNER = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
VERIFY = "vllm.v1.worker.gpu.spec_decode.rejection_sampler"


def install_step_hooks() -> None:
    _install(f"{RUNNER}.__init__", _wrap_runner_init)
    _install(f"{RUNNER}.load_model", _wrap_load_model)
    _install(f"{RUNNER}.add_requests", _wrap_add_requests)
    _install(f"{RUNNER}._remove_request", _wrap_remove_request)
    _install(f"{RUNNER}.sample", _wrap_sample)
    _install(f"{RUNNER}._dummy_sampler_run", _wrap_dummy_sampler_run)
    _install(f"{VERIFY}:RejectionSampler.__call__", _wrap_verify_call)
    _install(f"{VERIFY}:rejection_sample", _wrap_rejection_sample)


@dataclass
class VerifyStep:
    """One step's verification as model runner V2 lays it out, while `sample` runs."""

    runtime: Any  # the runner's JudgeRuntime
    hidden_states: torch.Tensor  # [num_tokens, H] final-norm hidden states of every token row
    logits_indices: torch.Tensor  # [num_logits] token row of each logits row
    cu_num_logits: np.ndarray  # [num_reqs + 1] host: request i's logits rows
    requests: list[tuple[str, int, Any]]  # (request id, draft tokens, extra_args), batch order
    raw_logits: torch.Tensor | None = None  # [num_logits, V] the model's own logits
    rows_verified: int = 0  # logits rows the patched rejection_sample has seen

    def judge_chunk_(self, processed_logits: torch.Tensor, draft_sampled: torch.Tensor) -> None:
        """Decide and force the draft rows of the next chunk (the rows after those already
        verified; vLLM verifies chunks in batch order, never splitting a request)."""
        lo = self.rows_verified
        hi = lo + processed_logits.shape[0]
        self.rows_verified = hi
        first, last = np.searchsorted(self.cu_num_logits, [lo, hi])
        if last >= len(self.cu_num_logits) or self.cu_num_logits[first] != lo or self.cu_num_logits[last] != hi:
            raise JudgeNotAppliedError(
                f"selfjudge: vLLM verified logits rows {lo}..{hi} of a step laid out as "
                f"{self.cu_num_logits.tolist()}: not whole requests in batch order, so the judge "
                "cannot tell which rows verify which drafts (see selfjudge_vllm/adapter_v2.py)")
        bounds = self.cu_num_logits[first : last + 1] - lo
        # Every row but each request's last (its bonus row) verifies the draft in the next row.
        is_draft_row = np.ones(hi - lo, dtype=bool)
        is_draft_row[bounds[1:] - 1] = False
        rows = np.flatnonzero(is_draft_row)
        if rows.size == 0:
            return
        device = processed_logits.device
        verify_rows = host_to_device(rows, device)
        drafts = draft_sampled.index_select(0, verify_rows + 1)
        rules = self.runtime.step_rules(self.requests[first:last], device, prune=False)
        token_rows = self.logits_indices[lo:hi]
        raw = None if self.raw_logits is None else self.raw_logits[lo:hi]
        self.runtime.decide_(
            rules, drafts, processed_logits, verify_rows,
            lambda sampled_rows: self.hidden_states.index_select(0, token_rows.index_select(0, sampled_rows)),
            raw, logit_rows=verify_rows)


# The step being sampled right now (one model runner per worker process).
_active_step: VerifyStep | None = None


def _wrap_runner_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        from selfjudge_vllm.factories import build_runtime

        self._selfjudge_runtime = build_runtime(vllm_config)
        # Request id -> its SamplingParams.extra_args (V2 keeps no SamplingParams per request).
        self._selfjudge_options = {}

    return __init__


def _check_one_new_token_per_step(model_state) -> None:
    if model_state.num_new_sampled_tokens_per_step != 1:
        raise UnsupportedConfiguration(
            "selfjudge supports models that sample one new token per step (plus drafts); "
            f"{type(model_state).__name__} samples {model_state.num_new_sampled_tokens_per_step}: "
            "serve this model without the selfjudge section, or with \"enabled\": false")


def _wrap_load_model(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self, "_selfjudge_runtime", None) is not None:
            _check_one_new_token_per_step(self.model_state)  # start-up, not the first step
        return result

    return load_model


def _wrap_add_requests(original):
    def add_requests(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        if getattr(self, "_selfjudge_runtime", None) is not None:
            for new in scheduler_output.scheduled_new_reqs:
                params = new.sampling_params
                self._selfjudge_options[new.req_id] = None if params is None else params.extra_args
        return result

    return add_requests


def _wrap_remove_request(original):
    def _remove_request(self, req_id, *args, **kwargs):
        runtime = getattr(self, "_selfjudge_runtime", None)
        if runtime is not None:
            self._selfjudge_options.pop(req_id, None)
            runtime.forget(req_id)
        return original(self, req_id, *args, **kwargs)

    return _remove_request


def _wrap_sample(original):
    arguments = argument_getter(original, "hidden_states", "input_batch")

    def sample(self, *args, **kwargs):
        global _active_step
        runtime = getattr(self, "_selfjudge_runtime", None)
        hidden_states, input_batch = arguments((self, *args), kwargs)
        if (runtime is None or input_batch.num_reqs == 0 or input_batch.num_draft_tokens == 0
                or self.rejection_sampler is None):
            return original(self, *args, **kwargs)
        if getattr(self, "batch_sharder", None) is not None:
            raise UnsupportedConfiguration(
                "selfjudge does not support batch-sharded sampling: turn it off")
        _check_one_new_token_per_step(self.model_state)  # refused at load_model; kept as a backstop
        num_reqs = input_batch.num_reqs
        cu_num_logits = np.asarray(input_batch.cu_num_logits_np[: num_reqs + 1], dtype=np.int64)
        drafts = np.diff(cu_num_logits) - 1
        options = self._selfjudge_options
        requests = [(req_id, int(count), options.get(req_id))
                    for req_id, count in zip(input_batch.req_ids[:num_reqs], drafts)]
        step = _active_step = VerifyStep(runtime, hidden_states, input_batch.logits_indices, cu_num_logits,
                                         requests)
        try:
            output = original(self, *args, **kwargs)
        finally:
            _active_step = None
        if step.rows_verified != cu_num_logits[-1]:
            raise JudgeNotAppliedError(
                f"selfjudge: vLLM verified {step.rows_verified} of this step's {cu_num_logits[-1]} "
                "logits rows through the patched rejection_sample; this vLLM version (or the model's "
                "custom rejection sampler) routes verification elsewhere and the judge would be "
                "silently off. See selfjudge_vllm/adapter_v2.py.")
        runtime.counters.steps_judged += 1
        return output

    return sample


def _wrap_verify_call(original):
    def __call__(self, logits, *args, **kwargs):
        step = _active_step
        if step is not None:
            step.raw_logits = logits
        return original(self, logits, *args, **kwargs)

    return __call__


def _wrap_rejection_sample(original):
    return judged_call(original, ("target_logits", "draft_sampled"), _judge_chunk)


def _judge_chunk(target_logits, draft_sampled):
    step = _active_step
    if step is None:
        return None
    step.judge_chunk_(target_logits, draft_sampled)
    return step.runtime


def _wrap_dummy_sampler_run(original):
    def _dummy_sampler_run(self, hidden_states, *args, **kwargs):
        runtime = getattr(self, "_selfjudge_runtime", None)
        if runtime is None or hidden_states.shape[0] == 0:
            return original(self, hidden_states, *args, **kwargs)
        # In a step the judge works inside verification, beside the sampler's float32 logits:
        # keep its temporaries allocated while vLLM's dummy pass runs, so the peak that sizes
        # the KV cache holds their sum (run after it, the peak held only the larger of the two).
        held = runtime.profile_(self.model_state.compute_sample_logits(hidden_states), hold=True)
        try:
            return original(self, hidden_states, *args, **kwargs)
        finally:
            del held

    return _dummy_sampler_run
