"""The `selfjudge` section of vLLM's `--additional-config` (no vLLM import here).

    --additional-config '{"selfjudge": {"head": "/path/to/judge", "threshold": 0.6}}'

`{"selfjudge": {"enabled": false}}` keeps the judge off but still applies the plugin's CPU
sampling fix (see vllm_patches.py), which is what "judge off" means in the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selfjudge_vllm.artifact import Threshold, check_one_threshold_choice
from selfjudge_vllm.guard import GuardConfig
from selfjudge_vllm.rules import RULE_NAMES, RULES

SECTION = "selfjudge"

RuleName = Literal[RULE_NAMES]
Scope = Literal["all", "reasoning"]


class ConfigError(ValueError):
    """The `selfjudge` section of --additional-config is unusable."""


class SelfJudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # The acceptance rule requests get by default (rules.py): the trained judge, or one of
    # the training-free baselines.
    rule: RuleName = "judge"
    # Rules a request may pick instead (selfjudge_rule); the server's `rule` always may.
    request_rules: tuple[RuleName, ...] = ()
    head: Path | None = Field(default=None, description="judge artifact directory")
    # Exactly one of these picks the threshold; neither means the artifact's default.
    threshold: Threshold | None = None
    operating_point: str | None = None
    # Server policy: requests may not choose a threshold below this (loosen the judge).
    min_threshold: Threshold | None = None
    # Knobs of the training-free rules (requests may override them when allowed the rule),
    # and the server's floor on each (rules.RuleSpec.floor): a request below it is refused.
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    min_alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    min_entropy: float = Field(default=1.0, ge=0.0)
    min_entropy_floor: float | None = Field(default=None, ge=0.0)
    entropy_window: int = Field(default=2, ge=0, le=16)
    # FLy (rules.py `fly`; vLLM's defaults): the top-k entropy threshold in nats, its floor,
    # the window of later drafts that must be the target's own choices (None: min(6, k - 1)
    # for k draft tokens, as vLLM), and the k of the top-k entropy.
    fly_threshold: float = Field(default=0.3, ge=0.0)
    min_fly_threshold: float | None = Field(default=None, ge=0.0)
    fly_window: int | None = Field(default=None, ge=1, le=16)
    fly_top_k: int = Field(default=3, ge=1)
    # Where relaxed acceptance applies: "all", or "reasoning": only inside a request's
    # reasoning span (ended by reasoning_end_token_id, opened by reasoning_start_token_id
    # when given, else by the response's start); the answer after it is verified exactly.
    # Without ids here, those of the served model's reasoning parser (--reasoning-parser).
    scope: Scope = "all"
    reasoning_start_token_id: int | None = Field(default=None, ge=0)
    reasoning_end_token_id: int | None = Field(default=None, ge=0)
    # Serve on a vLLM version this release was not checked on. Explicit, off by default.
    allow_unsupported_vllm: bool = False
    # Seconds between the worker's judge log lines (only when counts changed); 0 disables.
    log_interval_s: float = Field(default=10.0, ge=0.0)
    # Guarded serving (guard.py): re-check a sample of relaxed requests lossless.
    guard: GuardConfig | None = None

    @model_validator(mode="after")
    def _head_when_enabled(self) -> "SelfJudgeConfig":
        if self.enabled and self.head is None and "judge" in self.rules:
            raise ValueError("'head' (the judge artifact directory) is required for the rule 'judge'")
        check_one_threshold_choice(self.threshold, self.operating_point)
        if self.guard is not None and self.guard.enabled and self.guard.budget is None and not (
                self.rule == "judge" and (self.operating_point or "").startswith("certified_")):
            raise ValueError("guard.budget is required unless the server's default is a certified operating point "
                             "(`selfjudge calibrate`), whose budget the guard then keeps")
        for spec in RULES.values():
            knob, floor = getattr(self, spec.knob, None), getattr(self, spec.floor)
            if spec.name != "judge" and floor is not None and knob < floor:
                raise ValueError(f"'{spec.knob}' {knob} is below the server's own floor '{spec.floor}' {floor}")
        return self

    @property
    def rules(self) -> tuple[str, ...]:
        """Every rule this server serves, its default first."""
        return (self.rule,) + tuple(r for r in self.request_rules if r != self.rule)


def parse_section(additional_config: Any) -> SelfJudgeConfig | None:
    """The validated `selfjudge` section, or None when the plugin is not configured."""
    if not isinstance(additional_config, dict) or SECTION not in additional_config:
        return None
    section = additional_config[SECTION]
    if not isinstance(section, dict):
        raise ConfigError(
            f"--additional-config '{SECTION}' must be a JSON object, got {type(section).__name__}"
        )
    try:
        return SelfJudgeConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(f"invalid --additional-config '{SECTION}' section:\n{exc}") from exc
