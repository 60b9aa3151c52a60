"""benchmarks/diagnostics/answer_change_check.py: the estimated share of changed responses at each served
point, against a hand count on a small run (no engine)."""

from __future__ import annotations

import math

import numpy as np
import torch

from benchmarks.diagnostics.answer_change_check import check, out_of_fold_auc
from selfjudge_vllm.artifact import JudgeArtifact, JudgeArtifactConfig, TargetIdentity
from selfjudge_vllm.features import LOGIT_FEATURES
from selfjudge_vllm.offline.store import RunDir


def _run_with_outcomes(root, rng):
    """12 responses x 4 mismatches; the answer changes at random."""
    run = RunDir(root)
    run.bind_shard_count(1)
    run.write_json("target.json", {"name": "t", "architecture": "A", "hidden_size": 4, "vocab_size": 10,
                                   "num_hidden_layers": 1})
    scores, outcomes = [], []
    for prompt in range(12):
        for m in (5, 9, 14, 20):
            ratio = float(-rng.uniform(0, 4))
            scores.append({"id": f"gsm8k/{prompt}", "m": m, "draft": 3, "scores": {"max": {"20": -ratio}},
                           "evidence": {"draft_logratio": ratio, "verify_confidence": -0.5, "next_confidence": -0.1}})
            outcomes.append({"id": f"gsm8k/{prompt}", "m": m, "draft": 3, "unchanged": bool(rng.uniform() < 0.5)})
    run.write_records("scores", 0, scores)
    run.write_records("outcomes", 0, outcomes)
    return scores, outcomes


def _head(folder):
    """P(accept) = sigmoid(2 * draft_logratio + 1)."""
    config = JudgeArtifactConfig(
        format_version=2, features=LOGIT_FEATURES, default_threshold=0.5,
        target=TargetIdentity(name="t", architecture="A", hidden_size=4, vocab_size=10, num_hidden_layers=1),
        provenance={"report": {"validation_share": 0.25, "seed": 0}})
    JudgeArtifact(config, None, torch.tensor([1.0]), torch.tensor([2.0, 0.0, 0.0])).save(folder)
    return folder


def _expected(scores, outcomes, accepted) -> float:
    """Share of responses whose first accepted mismatch (by position) changed the answer."""
    changed = {(o["id"], o["m"]): not o["unchanged"] for o in outcomes}
    first = {}
    for r in sorted(scores, key=lambda r: r["m"]):
        if accepted(r["evidence"]["draft_logratio"]) and r["id"] not in first:
            first[r["id"]] = changed[(r["id"], r["m"])]
    return sum(first.values()) / len({r["id"] for r in scores})


def test_estimates_at_served_points_match_a_hand_count(tmp_path):
    scores, outcomes = _run_with_outcomes(tmp_path / "run", np.random.default_rng(3))
    head = _head(tmp_path / "head")
    report = {"points": [
        {"proposer": "draft_model", "k": 8, "method": method, "knob": knob, "changes": 2, "paired_n": 10,
         "changed_ids": ["gsm8k/1", "humaneval/2"], "gsm8k_n": 8, "text_changes": 5, "mean_acceptance_length": 6.5}
        for method, knob in (("judge", 0.7), ("judge", 0.2), ("top_alpha", 0.5), ("entropy", 2.0))]
        + [{"proposer": "ngram", "k": 8, "method": "judge", "knob": 0.7}]}
    result = check(tmp_path / "run", head, report, ("draft_model", 8))
    assert result["mismatches_with_outcomes"] == 48 and result["responses"] == 12
    by_point = {(p["method"], p["knob"]): p for p in result["points"]}
    assert set(by_point) == {("judge", 0.7), ("judge", 0.2), ("top_alpha", 0.5)}  # no entropy, no other server

    def sigmoid(z):
        return 1 / (1 + math.exp(-z))

    for threshold in (0.7, 0.2):
        assert by_point[("judge", threshold)]["estimated_change_share"] == _expected(
            scores, outcomes, lambda ratio, t=threshold: sigmoid(2 * ratio + 1) >= t)
    assert by_point[("top_alpha", 0.5)]["estimated_change_share"] == _expected(
        scores, outcomes, lambda ratio: ratio >= math.log(0.5))
    assert by_point[("judge", 0.7)]["gsm8k_changes"] == 1 and by_point[("judge", 0.7)]["gsm8k_change_rate"] == 1 / 8
    # The label score here is minus the ratio, so both rank "answer kept" identically.
    auc = result["roc_auc_answer_kept"]
    assert auc["draft_logratio"] == auc["label_score"] == auc["head"]


def test_the_answer_kept_probe_scores_each_prompt_with_a_model_that_never_saw_it():
    """A feature that reads the answer only through the prompt's identity (one column per
    prompt, the label constant within a prompt) is perfect in sample and useless out of fold;
    a feature that carries the label in every prompt is found."""
    rng = np.random.default_rng(0)
    prompts, per_prompt = 30, 8
    groups = np.repeat(np.arange(prompts), per_prompt)
    kept = np.repeat(rng.uniform(size=prompts) < 0.5, per_prompt)
    identity = np.eye(prompts)[groups] * np.where(kept, 1.0, -1.0)[:, None]
    assert out_of_fold_auc(identity, kept, groups)["roc_auc"] < 0.65
    kept_mixed = kept.copy()
    kept_mixed[::2] = ~kept_mixed[::2]  # the label varies within a prompt too
    informative = np.column_stack([kept_mixed + rng.normal(0, 0.7, len(kept)), rng.normal(size=len(kept))])
    assert out_of_fold_auc(informative, kept_mixed, groups)["roc_auc"] > 0.8
