"""Per-request judge control: parsing, policy, per-row thresholds (no engine)."""

from __future__ import annotations

import math

import pytest
import torch

from selfjudge_vllm.artifact import JudgeArtifactConfig, TargetIdentity, threshold_to_logit
from selfjudge_vllm.judge import JudgeHead
from selfjudge_vllm.request_control import JUDGE_OFF, request_options, request_threshold_logit
from selfjudge_vllm.runtime import JudgeRuntime

ARTIFACT = JudgeArtifactConfig(
    target=TargetIdentity(name="t", architecture="A", hidden_size=2, vocab_size=8, num_hidden_layers=1),
    default_threshold=0.5,
    operating_points={"strict": {"threshold": 0.9}, "loose": {"threshold": 0.2}},
)


def resolve(extra, min_threshold=None):
    return request_threshold_logit(request_options(extra), ARTIFACT, 0.5, min_threshold)


def test_request_options():
    assert request_options(None) is None and request_options({"other": 1}) is None
    assert resolve({}) == threshold_to_logit(0.5)
    assert resolve({"selfjudge_enabled": False}) == JUDGE_OFF
    assert resolve({"selfjudge_enabled": "false"}) == JUDGE_OFF  # vllm_xargs strings
    assert resolve({"selfjudge_threshold": 0.8}) == pytest.approx(threshold_to_logit(0.8))
    assert resolve({"selfjudge_operating_point": "strict"}) == pytest.approx(threshold_to_logit(0.9))
    for extra, message in [
        ({"selfjudge_threshold": 1.5}, "selfjudge_threshold: .*between 0 and 1"),
        ({"selfjudge_threshold": "high"}, "selfjudge_threshold"),
        ({"selfjudge_treshold": 0.5}, "selfjudge_treshold: Extra inputs are not permitted"),
        ({"selfjudge_operating_point": "f1"}, "unknown operating point 'f1'; the served judge has: loose, strict"),
        ({"selfjudge_threshold": 0.5, "selfjudge_operating_point": "strict"}, "not both"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve(extra)


def test_server_policy_bounds_loosening():
    assert resolve({"selfjudge_threshold": 0.7}, min_threshold=0.6) == pytest.approx(threshold_to_logit(0.7))
    assert resolve({"selfjudge_enabled": False}, min_threshold=0.6) == JUDGE_OFF  # stricter is fine
    with pytest.raises(ValueError, match="looser than this server allows"):
        resolve({"selfjudge_threshold": 0.3}, min_threshold=0.6)
    with pytest.raises(ValueError, match="looser than this server allows"):
        resolve({"selfjudge_operating_point": "loose"}, min_threshold=0.6)


def test_row_limits_follow_batch_order_and_draft_counts():
    head = JudgeHead(torch.ones(2), torch.zeros(1), threshold_to_logit(0.5))
    runtime = JudgeRuntime(head, None, 0, request_limit=resolve)
    plain = [("a", 2, None), ("b", 3, {})]
    assert runtime.row_limits(plain, "cpu") is None  # all on the server threshold
    # Request ids are unique and their options never change, so each is resolved once.
    mixed = [("a", 2, None), ("d", 1, {"selfjudge_enabled": False}), ("c", 2, {"selfjudge_threshold": 0.8})]
    limits = runtime.row_limits(mixed, "cpu")
    assert limits.tolist()[:3] == [0.0, 0.0, math.inf]
    assert limits[3:].tolist() == pytest.approx([threshold_to_logit(0.8)] * 2)
    # A judged-off row is never accepted, whatever its score.
    hidden = torch.full((5, 2), 100.0)
    accept, _ = head.apply_(hidden, torch.arange(5), torch.zeros(5, 8), limits)
    assert accept.tolist() == [True, True, False, True, True]
