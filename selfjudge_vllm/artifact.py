"""The judge artifact: a directory with `config.json` and `model.safetensors`.

`config.json` is validated by a versioned pydantic schema; `model.safetensors` holds the
logistic-regression weights with any input standardisation (and stacking) already folded in,
so serving is one dot product plus a few scalar products:

    score = hidden . weight + scalar_weight . [logit features] + bias      (a logit)

Format 1 (the SelfJudge paper's head) reads the hidden state only. Format 2 names the
features it reads in `features` (selfjudge_vllm/features.py, versioned by
`feature_set_version`): `weight` exists when "hidden" is among them, `scalar_weight` holds
one entry per logit feature in the listed order. Format-1 artifacts load unchanged. Nothing
here imports vLLM, and nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selfjudge_vllm.features import ALL_FEATURES, FEATURE_SET_VERSION, HIDDEN

FORMAT_NAME = "selfjudge-head"
# The newest format this package reads. A head that reads the hidden state only is still
# written as format 1, so older releases keep serving it.
FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The hidden-state feature's name in format-1 artifacts (features.HIDDEN in format 2).
FEATURE_FINAL_NORM_AT_DRAFT = "final_norm_hidden_state_at_draft_position"


class ArtifactError(ValueError):
    """A judge artifact that is missing, corrupt, or made for something else."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_one_threshold_choice(threshold, operating_point) -> None:
    """A threshold is chosen by value or by operating-point name, not both (the config
    section, a request and the artifact API all choose one this way)."""
    if threshold is not None and operating_point is not None:
        raise ValueError("give either 'threshold' or 'operating_point', not both")


def operating_point_threshold(config: "JudgeArtifactConfig", name: str, owner: str = "this artifact") -> float:
    """The threshold of the named operating point, or an error listing the known names."""
    point = config.operating_points.get(name)
    if point is None:
        known = ", ".join(sorted(config.operating_points)) or "none"
        raise ArtifactError(f"unknown operating point {name!r}; {owner} has: {known}")
    return point.threshold


def _check_open_unit_interval(value: float) -> float:
    if not (0.0 < value < 1.0):
        raise ValueError(f"a threshold must lie strictly between 0 and 1, got {value}")
    return value


# A threshold on P(accept): artifact, server config and per-request options all use it.
Threshold = Annotated[float, AfterValidator(_check_open_unit_interval)]


class TargetIdentity(_Strict):
    """What the head was trained on. Served models must match on every field but the name."""

    name: str = Field(description="model name or path the features were extracted from")
    architecture: str = Field(description="HF architecture, e.g. LlamaForCausalLM")
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)


class OperatingPoint(_Strict):
    threshold: Threshold
    description: str = ""
    # Validation metrics at this threshold (precision, recall, ...), for humans.
    metrics: dict[str, float] = Field(default_factory=dict)
    # What certified this point (`selfjudge calibrate`: measure, budget, n, bound, prompts'
    # SHA-256, ...); empty for points chosen on validation mismatches.
    evidence: dict[str, Any] = Field(default_factory=dict)


class JudgeArtifactConfig(_Strict):
    format: Literal["selfjudge-head"] = FORMAT_NAME
    format_version: Literal[1, 2] = 1
    target: TargetIdentity
    feature: Literal["final_norm_hidden_state_at_draft_position"] = FEATURE_FINAL_NORM_AT_DRAFT
    # Format 2: what the head reads, in weight order (format 1: the hidden state only).
    features: tuple[str, ...] = (HIDDEN,)
    feature_set_version: int = Field(default=FEATURE_SET_VERSION, ge=1)
    # The head outputs P(accepting the draft token keeps the meaning); accept when >= this.
    default_threshold: Threshold
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _features_are_computable(self) -> "JudgeArtifactConfig":
        if self.format_version == 1 and self.features != (HIDDEN,):
            raise ValueError(f"a format-1 artifact reads the hidden state only; features {list(self.features)} "
                             "need format_version 2")
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be non-empty and distinct, got {list(self.features)}")
        unknown = [f for f in self.features if f not in ALL_FEATURES]
        if unknown or self.feature_set_version > FEATURE_SET_VERSION:
            raise ValueError(
                f"the head reads features {list(self.features)} (feature set v{self.feature_set_version}); "
                f"this selfjudge-vllm computes {list(ALL_FEATURES)} (feature set v{FEATURE_SET_VERSION}): "
                "upgrade selfjudge-vllm or retrain the head"
            )
        return self

    @property
    def logit_features(self) -> tuple[str, ...]:
        return tuple(f for f in self.features if f != HIDDEN)

    @model_validator(mode="after")
    def _names_are_plain(self) -> "JudgeArtifactConfig":
        for name in self.operating_points:
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"operating point name {name!r} must be alphanumeric/_/-")
        return self

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size


class JudgeArtifact:
    """A loaded, validated judge head: float32 `weight` [hidden_size] (None when the head does
    not read the hidden state), `scalar_weight` [number of logit features] and `bias` [1]."""

    def __init__(self, config: JudgeArtifactConfig, weight: torch.Tensor | None, bias: torch.Tensor,
                 scalar_weight: torch.Tensor | None = None):
        def flat(t):
            return None if t is None else t.detach().to(torch.float32).reshape(-1).contiguous()

        weight, bias, scalar_weight = flat(weight), flat(bias), flat(scalar_weight)
        if HIDDEN in config.features:
            if weight is None or weight.numel() != config.hidden_size:
                raise ArtifactError(
                    f"weight has {None if weight is None else weight.numel()} entries but config says "
                    f"hidden_size={config.hidden_size}"
                )
        elif weight is not None:
            raise ArtifactError("the head does not read the hidden state but has a hidden-state weight")
        n_scalar = len(config.logit_features)
        if n_scalar and (scalar_weight is None or scalar_weight.numel() != n_scalar):
            raise ArtifactError(f"scalar_weight must hold one entry per logit feature {list(config.logit_features)}")
        if not n_scalar and scalar_weight is not None:
            raise ArtifactError("scalar_weight given but the head reads no logit feature")
        if bias.numel() != 1:
            raise ArtifactError(f"bias must hold exactly one value, got {bias.numel()}")
        if not all(torch.isfinite(t).all() for t in (weight, bias, scalar_weight) if t is not None):
            raise ArtifactError("weight or bias contains NaN or infinity")
        self.config = config
        self.weight = weight
        self.bias = bias
        self.scalar_weight = scalar_weight

    def resolve_threshold(self, threshold: float | None, operating_point: str | None) -> float:
        """The threshold to serve with: explicit value, named point, or the default."""
        check_one_threshold_choice(threshold, operating_point)
        if operating_point is not None:
            return operating_point_threshold(self.config, operating_point)
        if threshold is not None:
            return _check_open_unit_interval(threshold)
        return self.config.default_threshold

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"bias": self.bias}
        if self.weight is not None:
            tensors["weight"] = self.weight
        if self.scalar_weight is not None:
            tensors["scalar_weight"] = self.scalar_weight
        save_file(tensors, str(directory / WEIGHTS_FILE),
                  metadata={"format": FORMAT_NAME, "format_version": str(self.config.format_version)})
        (directory / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "JudgeArtifact":
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ArtifactError(f"judge artifact {directory}: missing {path.name}")
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"judge artifact {config_path}: not valid JSON ({exc})") from exc
        try:
            config = JudgeArtifactConfig.model_validate(raw)
        except ValidationError as exc:
            raise ArtifactError(f"judge artifact {config_path}: invalid config\n{exc}") from exc
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"judge artifact {weights_path}: unreadable ({exc})") from exc
        needed = {"bias"} | ({"weight"} if HIDDEN in config.features else set())
        needed |= {"scalar_weight"} if config.logit_features else set()
        missing = needed - tensors.keys()
        if missing:
            raise ArtifactError(f"judge artifact {weights_path}: missing tensors {sorted(missing)}")
        try:
            return cls(config, tensors.get("weight"), tensors["bias"], tensors.get("scalar_weight"))
        except ArtifactError as exc:
            raise ArtifactError(f"judge artifact {directory}: {exc}") from exc


def check_target_matches(artifact: JudgeArtifactConfig, served: TargetIdentity) -> None:
    """Raise if the served model is not the model the head was trained for."""
    expected = artifact.target.model_dump(exclude={"name"})
    actual = served.model_dump(exclude={"name"})
    diffs = [f"{k}: artifact {expected[k]!r}, served {actual[k]!r}" for k in expected if expected[k] != actual[k]]
    if diffs:
        raise ArtifactError(
            f"judge artifact was made for {artifact.target.name!r}, which differs from the "
            f"served model {served.name!r} ({'; '.join(diffs)})"
        )


def threshold_to_logit(threshold: float) -> float:
    """The judge's threshold in the units the step compares (rules.RULES["judge"])."""
    from selfjudge_vllm.rules import RULES

    return RULES["judge"].to_step(threshold)
