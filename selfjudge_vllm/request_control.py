"""Per-request judge control (no vLLM import).

A request sets flat `selfjudge_*` keys in `SamplingParams.extra_args` (the OpenAI API's
`vllm_xargs`, whose values must be flat, or `extra_args` offline):

    {"selfjudge_enabled": false}              verified losslessly (stock vLLM output)
    {"selfjudge_threshold": 0.8}              its own threshold, in (0, 1)
    {"selfjudge_operating_point": "best_f1"}  a named threshold of the served artifact

The server's `selfjudge.min_threshold` bounds how far a request may loosen the judge: a
threshold (explicit or named) below it is refused. Invalid values raise ValueError, which
vLLM turns into HTTP 400 at admission.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from selfjudge_vllm.artifact import JudgeArtifactConfig, Threshold, threshold_to_logit

KEY_PREFIX = "selfjudge_"
# Threshold logit of a request with the judge off: no score reaches it.
JUDGE_OFF = math.inf


class RequestJudgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    threshold: Threshold | None = None
    operating_point: str | None = None

    @model_validator(mode="after")
    def _one_choice(self) -> "RequestJudgeOptions":
        if self.threshold is not None and self.operating_point is not None:
            raise ValueError("give either 'threshold' or 'operating_point', not both")
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
    """The threshold logit to verify this request with (JUDGE_OFF: lossless)."""
    if options is None:
        return threshold_to_logit(server_threshold)
    if not options.enabled:
        return JUDGE_OFF
    threshold = server_threshold
    if options.operating_point is not None:
        point = artifact.operating_points.get(options.operating_point)
        if point is None:
            known = ", ".join(sorted(artifact.operating_points)) or "none"
            raise ValueError(
                f"unknown operating point {options.operating_point!r}; the served judge has: {known}"
            )
        threshold = point.threshold
    elif options.threshold is not None:
        threshold = options.threshold
    if min_threshold is not None and threshold < min_threshold:
        raise ValueError(
            f"threshold {threshold:.4f} is looser than this server allows (min_threshold "
            f"{min_threshold:.4f})"
        )
    return threshold_to_logit(threshold)
