"""vLLM entry points: `register` (vllm.general_plugins) and the runtime factory.

vLLM calls `register()` in every process it starts (API server, engine core, workers), before
any model runner exists and without the configuration. It only installs the worker start-up
hook and the request-admission check; everything else happens in a worker whose config
carries a `selfjudge` section.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.selfjudge")


def register() -> None:
    from selfjudge_vllm.vllm_patches import install_admission_hook, install_worker_hook

    install_worker_hook()
    install_admission_hook()


def served_target_identity(vllm_config):
    """What the served model is, in the artifact's terms."""
    from selfjudge_vllm.artifact import TargetIdentity

    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    return TargetIdentity(
        name=str(model_config.model),
        architecture=(model_config.architectures or ["unknown"])[0],
        hidden_size=model_config.get_hidden_size(),
        vocab_size=model_config.get_vocab_size(),
        num_hidden_layers=text_config.num_hidden_layers,
    )


def request_limit_resolver(config, artifact_config, server_threshold: float):
    """extra_args -> threshold logit for this server's judge (raises ValueError)."""
    from selfjudge_vllm.request_control import request_options, request_threshold_logit

    def resolve(extra_args) -> float:
        return request_threshold_logit(
            request_options(extra_args), artifact_config, server_threshold, config.min_threshold
        )

    return resolve


def load_served_judge(config):
    """The artifact named by an enabled config section, and the threshold it serves with."""
    from selfjudge_vllm.artifact import JudgeArtifact

    artifact = JudgeArtifact.load(config.head)
    return artifact, artifact.resolve_threshold(config.threshold, config.operating_point)


class RequestValidator:
    """Admission check of per-request judge options (API server / LLM front end)."""

    def __init__(self, vllm_config):
        from selfjudge_vllm.config import parse_section

        self.resolve = None
        config = parse_section(getattr(vllm_config, "additional_config", None))
        if config is None or not config.enabled:
            return
        artifact, threshold = load_served_judge(config)
        self.resolve = request_limit_resolver(config, artifact.config, threshold)

    def check(self, extra_args) -> None:
        if self.resolve is not None:
            self.resolve(extra_args)
        else:
            from selfjudge_vllm.request_control import request_options

            request_options(extra_args)  # still reject malformed options


def build_runtime(vllm_config):
    """The model runner's JudgeRuntime, or None when the judge is off. Raises on bad input."""
    from selfjudge_vllm.artifact import check_target_matches, threshold_to_logit
    from selfjudge_vllm.config import parse_section
    from selfjudge_vllm.judge import JudgeHead
    from selfjudge_vllm.metrics import MetricsSink, metrics_dir
    from selfjudge_vllm.runtime import JudgeRuntime

    config = parse_section(vllm_config.additional_config)
    if config is None or not config.enabled:
        return None
    artifact, threshold = load_served_judge(config)
    check_target_matches(artifact.config, served_target_identity(vllm_config))
    head = JudgeHead(artifact.weight, artifact.bias, threshold_to_logit(threshold))
    # Tensor-parallel ranks take identical decisions; only rank 0 publishes counters.
    rank = vllm_config.parallel_config.rank
    sink = MetricsSink(metrics_dir(vllm_config.instance_id), rank) if rank == 0 else None
    logger.info(
        "SelfJudge on: head %s (trained for %s), threshold %.4f", config.head,
        artifact.config.target.name, threshold,
    )
    runtime = JudgeRuntime(head, sink, config.log_interval_s, request_limit_resolver(config, artifact.config, threshold))
    runtime.start_publisher()
    return runtime
