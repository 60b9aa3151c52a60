"""What the adapter builds from a vLLM configuration: the admission validator and the model
runner's JudgeRuntime. Called by vllm_patches.py (vLLM seams -> factories, never back)."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.selfjudge")

# Why `scope: reasoning` is refused on model runner V2 (start-up error, HTTP 400 per request).
REASONING_SCOPE_ON_V2 = (
    "selfjudge scope 'reasoning' is served on model runner V1 only (vLLM <= 0.33): on model "
    "runner V2 the output tokens the span is read from stay on the device and, under async "
    "scheduling, are placeholders when the step is verified; use scope 'all' or vLLM <= 0.33")


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


def with_reasoning_markers(config, vllm_config):
    """The section with its reasoning marker ids: those it gives, else the start and end
    tokens of the served model's reasoning parser (vLLM's --reasoning-parser, which vLLM
    resolves to token ids at start-up), else none."""
    from selfjudge_vllm.config import ConfigError

    reasoning = getattr(vllm_config, "reasoning_config", None)
    if config.reasoning_end_token_id is not None or reasoning is None or not reasoning.enabled:
        return config
    start, end = reasoning.reasoning_start_token_ids or [], reasoning.natural_reasoning_end_token_ids or []
    if len(end) != 1 or len(start) > 1:
        raise ConfigError(
            f"selfjudge: the reasoning parser {reasoning.reasoning_parser!r} marks reasoning with several "
            f"tokens (start {start}, end {end}); scope 'reasoning' needs single-token markers: set "
            "selfjudge.reasoning_end_token_id (and reasoning_start_token_id)")
    return config.model_copy(update={"reasoning_end_token_id": end[0],
                                     "reasoning_start_token_id": start[0] if start else None})


def load_served_policy(config, vllm_config):
    """The rule policy of an enabled config section, and the judge artifact when one is served."""
    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.request_control import RulePolicy

    config = with_reasoning_markers(config, vllm_config)
    refused = reasoning_scope_refusal()
    if config.head is None:
        return RulePolicy(config, reasoning_scope_refused=refused), None
    artifact = JudgeArtifact.load(config.head)
    threshold = artifact.resolve_threshold(config.threshold, config.operating_point)
    return RulePolicy(config, artifact.config, threshold, reasoning_scope_refused=refused), artifact


def reasoning_scope_refusal() -> str | None:
    """Why the installed vLLM's model runner cannot serve scope 'reasoning' (None: it can)."""
    from selfjudge_vllm.vllm_seams import V2, installed_runner

    return REASONING_SCOPE_ON_V2 if installed_runner() == V2 else None


class RequestValidator:
    """Admission check of per-request options (API server / LLM front end)."""

    def __init__(self, vllm_config):
        from selfjudge_vllm.config import parse_section

        self.policy = None
        config = parse_section(getattr(vllm_config, "additional_config", None))
        if config is None or not config.enabled:
            return
        self.policy, _ = load_served_policy(config, vllm_config)

    def check(self, extra_args) -> None:
        if self.policy is not None:
            self.policy.for_request(extra_args)
        else:
            from selfjudge_vllm.request_control import request_options

            request_options(extra_args)  # still reject malformed options


def build_runtime(vllm_config):
    """The model runner's JudgeRuntime, or None when the plugin is off. Raises on bad input."""
    from selfjudge_vllm.artifact import check_target_matches
    from selfjudge_vllm.config import parse_section
    from selfjudge_vllm.metrics import MetricsSink, metrics_dir
    from selfjudge_vllm.rules import JudgeHead
    from selfjudge_vllm.runtime import JudgeRuntime

    config = parse_section(vllm_config.additional_config)
    if config is None or not config.enabled:
        return None
    policy, artifact = load_served_policy(config, vllm_config)
    head = None
    if artifact is not None:
        check_target_matches(artifact.config, served_target_identity(vllm_config))
        head = JudgeHead.from_artifact(artifact)
    # Tensor-parallel ranks take identical decisions; only rank 0 publishes counters.
    rank = vllm_config.parallel_config.rank
    sink = MetricsSink(metrics_dir(vllm_config.instance_id), rank) if rank == 0 else None
    logger.info(
        "SelfJudge on: default rule %s; requests may choose %s; head %s",
        policy.default.describe(), ", ".join(config.rules), config.head,
    )
    runtime = JudgeRuntime(
        head, sink, config.log_interval_s, policy.default, policy.for_request, config.entropy_window
    )
    runtime.start_publisher()
    return runtime
