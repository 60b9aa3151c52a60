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
# Why it is refused under async scheduling (vLLM's GPU default for draft_model and EAGLE since
# 0.32): the runner's output token lists then end in -1 placeholders that vLLM fills only when
# penalties or logits processors need them, so the span would never see its end marker.
REASONING_SCOPE_ASYNC = (
    "selfjudge scope 'reasoning' needs synchronous scheduling: under async scheduling vLLM "
    "leaves placeholders in the token lists the reasoning span is read from; start vLLM with "
    "--no-async-scheduling, or use scope 'all'")


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


def _parser_markers(vllm_config) -> tuple[str, list[int], list[int]] | None:
    """(parser name, start ids, end ids) of the served reasoning parser, or None."""
    reasoning = getattr(vllm_config, "reasoning_config", None)
    if reasoning is None or not reasoning.enabled:
        return None
    return (reasoning.reasoning_parser, list(reasoning.reasoning_start_token_ids or []),
            list(reasoning.natural_reasoning_end_token_ids or []))


def with_reasoning_markers(config, vllm_config):
    """The section with its reasoning marker ids: those it gives, else the start and end
    tokens of the served model's reasoning parser (vLLM's --reasoning-parser, which vLLM
    resolves to token ids at start-up) when they are single tokens, else none. A parser with
    multi-token markers fails start-up only where the section asks for scope 'reasoning'
    (a request asking for it is refused: reasoning_scope_refusal)."""
    from selfjudge_vllm.config import ConfigError

    markers = _parser_markers(vllm_config)
    if config.reasoning_end_token_id is not None or markers is None:
        return config
    parser, start, end = markers
    if len(end) != 1 or len(start) > 1:
        if config.scope == "reasoning":
            raise ConfigError(_multi_token_markers(parser, start, end))
        return config
    return config.model_copy(update={"reasoning_end_token_id": end[0],
                                     "reasoning_start_token_id": start[0] if start else None})


def _multi_token_markers(parser, start, end) -> str:
    return (f"selfjudge: the reasoning parser {parser!r} marks reasoning with several tokens (start {start}, "
            f"end {end}); scope 'reasoning' needs single-token markers: set selfjudge.reasoning_end_token_id "
            "(and reasoning_start_token_id)")


def load_served_policy(config, vllm_config):
    """The rule policy of an enabled config section, and the judge artifact when one is served."""
    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.request_control import RulePolicy

    config = with_reasoning_markers(config, vllm_config)
    refused = reasoning_scope_refusal(config, vllm_config)
    if config.head is None:
        return RulePolicy(config, reasoning_scope_refused=refused), None
    artifact = JudgeArtifact.load(config.head)
    threshold = artifact.resolve_threshold(config.threshold, config.operating_point)
    return RulePolicy(config, artifact.config, threshold, reasoning_scope_refused=refused), artifact


def reasoning_scope_refusal(config, vllm_config) -> str | None:
    """Why this server cannot serve scope 'reasoning' (None: it can): the runner, async
    scheduling, or a reasoning parser whose markers are not single tokens."""
    from selfjudge_vllm.vllm_seams import V2, installed_runner

    if installed_runner() == V2:
        return REASONING_SCOPE_ON_V2
    scheduler = getattr(vllm_config, "scheduler_config", None)
    if getattr(scheduler, "async_scheduling", False):
        return REASONING_SCOPE_ASYNC
    markers = _parser_markers(vllm_config)
    if config.reasoning_end_token_id is None and markers is not None:
        parser, start, end = markers
        if len(end) != 1 or len(start) > 1:
            return _multi_token_markers(parser, start, end)
    return None


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


def fly_window(config, num_drafts: int) -> int:
    """FLy's window: the section's, else vLLM's default min(6, k - 1) for k draft tokens (0:
    with one draft token FLy accepts nothing, as in vLLM)."""
    return config.fly_window if config.fly_window is not None else max(0, min(6, num_drafts - 1))


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
    spec = vllm_config.speculative_config
    num_drafts = spec.num_speculative_tokens if spec else 0
    runtime = JudgeRuntime(
        head, sink, config.log_interval_s, policy.default, policy.for_request, config.entropy_window,
        max_step_rows=vllm_config.scheduler_config.max_num_seqs * num_drafts,
        fly_window=fly_window(config, num_drafts), fly_top_k=config.fly_top_k,
    )
    runtime.start_publisher()
    return runtime
