"""The judge artifact: a directory with `config.json` and `model.safetensors`.

`config.json` is validated by a versioned pydantic schema; `model.safetensors` holds the
logistic-regression weight vector and bias with any input standardisation already folded
in, so serving is one dot product. Nothing here imports vLLM, and nothing is pickled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_NAME = "selfjudge-head"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The only feature the plugin can capture (DESIGN.md section 3).
FEATURE_FINAL_NORM_AT_DRAFT = "final_norm_hidden_state_at_draft_position"


class ArtifactError(ValueError):
    """A judge artifact that is missing, corrupt, or made for something else."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class JudgeArtifactConfig(_Strict):
    format: Literal["selfjudge-head"] = FORMAT_NAME
    format_version: Literal[1] = FORMAT_VERSION
    target: TargetIdentity
    feature: Literal["final_norm_hidden_state_at_draft_position"] = FEATURE_FINAL_NORM_AT_DRAFT
    # The head outputs P(accepting the draft token keeps the meaning); accept when >= this.
    default_threshold: Threshold
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

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
    """A loaded, validated judge head (float32 weight [hidden_size] and bias)."""

    def __init__(self, config: JudgeArtifactConfig, weight: torch.Tensor, bias: torch.Tensor):
        weight = weight.detach().to(torch.float32).reshape(-1).contiguous()
        bias = bias.detach().to(torch.float32).reshape(-1).contiguous()
        if weight.numel() != config.hidden_size:
            raise ArtifactError(
                f"weight has {weight.numel()} entries but config says hidden_size="
                f"{config.hidden_size}"
            )
        if bias.numel() != 1:
            raise ArtifactError(f"bias must hold exactly one value, got {bias.numel()}")
        if not torch.isfinite(weight).all() or not torch.isfinite(bias).all():
            raise ArtifactError("weight or bias contains NaN or infinity")
        self.config = config
        self.weight = weight
        self.bias = bias

    def resolve_threshold(self, threshold: float | None, operating_point: str | None) -> float:
        """The threshold to serve with: explicit value, named point, or the default."""
        if threshold is not None and operating_point is not None:
            raise ArtifactError("give either a threshold or an operating_point, not both")
        if operating_point is not None:
            if operating_point not in self.config.operating_points:
                known = ", ".join(sorted(self.config.operating_points)) or "none"
                raise ArtifactError(
                    f"unknown operating point {operating_point!r}; this artifact has: {known}"
                )
            return self.config.operating_points[operating_point].threshold
        if threshold is not None:
            return _check_open_unit_interval(threshold)
        return self.config.default_threshold

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight, "bias": self.bias},
            str(directory / WEIGHTS_FILE),
            metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)},
        )
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
        missing = {"weight", "bias"} - tensors.keys()
        if missing:
            raise ArtifactError(f"judge artifact {weights_path}: missing tensors {sorted(missing)}")
        try:
            return cls(config, tensors["weight"], tensors["bias"])
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
    """sigmoid(z) >= t  <=>  z >= log(t / (1 - t)); comparing logits skips the sigmoid."""
    return math.log(threshold) - math.log1p(-threshold)
