"""Per-request control of the acceptance rule (no vLLM import).

A request sets flat `selfjudge_*` keys in `SamplingParams.extra_args` (the OpenAI API's
`vllm_xargs`, whose values must be flat, or `extra_args` offline):

    {"selfjudge_enabled": false}              verified losslessly (stock vLLM output)
    {"selfjudge_threshold": 0.8}              the judge with its own threshold, in (0, 1)
    {"selfjudge_operating_point": "best_f1"}  a named threshold of the served artifact
    {"selfjudge_rule": "top_alpha", "selfjudge_alpha": 0.3}
                                              another rule the server allows (request_rules)
    {"selfjudge_rule": "entropy", "selfjudge_min_entropy": 2.0}
    {"selfjudge_rule": "fly", "selfjudge_fly_threshold": 0.5}
    {"selfjudge_scope": "reasoning"}          relaxed only inside the reasoning span

The server's floors bound how far a request may loosen its rule (rules.RuleSpec.floor):
`selfjudge.min_threshold` for the judge (a threshold, explicit or named, below it is
refused), `min_alpha` for top_alpha and `min_entropy_floor` for entropy. Invalid values raise ValueError, which
vLLM turns into HTTP 400 at admission.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selfjudge_vllm.artifact import (
    JudgeArtifactConfig,
    Threshold,
    check_one_threshold_choice,
    operating_point_threshold,
    threshold_to_logit,
)
from selfjudge_vllm.config import RuleName, Scope, SelfJudgeConfig
from selfjudge_vllm.rules import LOSSLESS, RULES, RowRule

KEY_PREFIX = "selfjudge_"
# Threshold logit of a request with the judge off: no score reaches it.
JUDGE_OFF = math.inf


class RequestJudgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    rule: RuleName | None = None
    threshold: Threshold | None = None
    operating_point: str | None = None
    alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    min_entropy: float | None = Field(default=None, ge=0.0)
    fly_threshold: float | None = Field(default=None, ge=0.0)
    scope: Scope | None = None

    @model_validator(mode="after")
    def _one_choice(self) -> "RequestJudgeOptions":
        check_one_threshold_choice(self.threshold, self.operating_point)
        return self


def has_options(extra_args: Any) -> bool:
    return isinstance(extra_args, dict) and any(str(k).startswith(KEY_PREFIX) for k in extra_args)


def request_options(extra_args: Any) -> RequestJudgeOptions | None:
    """The request's judge options, or None when it sets none. Raises ValueError."""
    if not has_options(extra_args):
        return None
    raw = {k[len(KEY_PREFIX):]: v for k, v in extra_args.items() if str(k).startswith(KEY_PREFIX)}
    try:
        return RequestJudgeOptions.model_validate(raw)
    except ValidationError as exc:
        details = "; ".join(
            f"{KEY_PREFIX}{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise ValueError(f"invalid selfjudge request options: {details}") from None


def request_threshold_logit(
    options: RequestJudgeOptions | None,
    artifact: JudgeArtifactConfig,
    server_threshold: float,
    min_threshold: float | None,
) -> float:
    """The judge's threshold logit for this request (JUDGE_OFF: lossless)."""
    if options is None:
        return threshold_to_logit(server_threshold)
    if not options.enabled:
        return JUDGE_OFF
    threshold = server_threshold
    if options.operating_point is not None:
        threshold = operating_point_threshold(artifact, options.operating_point, "the served judge")
    elif options.threshold is not None:
        threshold = options.threshold
    if min_threshold is not None and threshold < min_threshold:
        raise ValueError(
            f"threshold {threshold:.4f} is looser than this server allows (min_threshold "
            f"{min_threshold:.4f})"
        )
    return threshold_to_logit(threshold)


class RulePolicy:
    """A server's rules: the default every request gets, and what a request may choose."""

    def __init__(
        self,
        config: SelfJudgeConfig,
        artifact: JudgeArtifactConfig | None = None,
        server_threshold: float | None = None,
        reasoning_scope_refused: str | None = None,
    ):
        self.config, self.artifact, self.server_threshold = config, artifact, server_threshold
        # Why this server cannot serve scope 'reasoning' (None: it can).
        self.reasoning_scope_refused = reasoning_scope_refused
        self.default = self._scoped(self._rule(config.rule, RequestJudgeOptions()), config.scope)

    def for_request(self, extra_args: Any) -> RowRule:
        """The rule this request is verified with. Raises ValueError on bad options."""
        options = request_options(extra_args)
        if options is None:
            return self.default
        if not options.enabled:
            return LOSSLESS
        rule = options.rule or self.config.rule
        if rule not in self.config.rules:
            raise ValueError(
                f"selfjudge_rule {rule!r} is not served here; this server allows: "
                f"{', '.join(self.config.rules)} (selfjudge.request_rules)"
            )
        # A key of another rule is a mistake worth a 400.
        for other in RULES.values():
            for key in other.request_keys:
                if other.name != rule and getattr(options, key) is not None:
                    raise ValueError(f"{KEY_PREFIX}{key} belongs to the rule {other.name!r}, not {rule!r}")
        return self._scoped(self._rule(rule, options), options.scope or self.config.scope)

    def _scoped(self, row_rule: RowRule, scope: str) -> RowRule:
        if scope == "all":
            return row_rule
        if self.reasoning_scope_refused is not None:
            raise ValueError(self.reasoning_scope_refused)
        if self.config.reasoning_end_token_id is None:
            raise ValueError(
                "scope 'reasoning' needs the token that ends the reasoning: serve with vLLM's "
                "--reasoning-parser (its markers are used) or set selfjudge.reasoning_end_token_id")
        return dataclasses.replace(row_rule, reasoning_end=self.config.reasoning_end_token_id,
                                   reasoning_start=self.config.reasoning_start_token_id)

    def _rule(self, rule: str, options: RequestJudgeOptions) -> RowRule:
        spec = RULES[rule]
        if rule == "judge":  # thresholds come from the artifact, named points and the server's floor
            limit = request_threshold_logit(
                options, self.artifact, self.server_threshold, self.config.min_threshold
            )
            return RowRule(spec.rule_id, limit)
        knob = getattr(options, spec.knob)
        if knob is None:
            knob = getattr(self.config, spec.knob)
        floor = getattr(self.config, spec.floor)
        if floor is not None and knob < floor:
            raise ValueError(f"{KEY_PREFIX}{spec.knob} {knob:g} is looser than this server allows "
                             f"({spec.floor} {floor:g})")
        return RowRule.named(rule, knob)
