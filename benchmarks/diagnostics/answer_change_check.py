"""Does the artifact's answer-change estimate predict what serving measures, and can a local
signal tell which substitutions change the final answer?

Reads a label run with answer outcomes (`selfjudge label --answer-pattern`: for each
mismatch, the target finished the response with the draft token substituted, and the final
answer was compared), the served head, and the chat benchmark's report:

  per mismatch   the share whose substitution changes the final answer, and how well each
                 signal ranks "answer kept" (ROC-AUC): the head's score, the draft
                 log-ratio (what top_alpha thresholds), the SelfJudge label score (N=20)
  per point      for each judge threshold and top_alpha alpha the benchmark served on one
                 server: the estimated share of responses whose answer changes
                 (offline.train.response_change_share, the estimate the `changes_*`
                 operating points are set with) beside the measured rate on the benchmark's
                 GSM8K items (paired against the same server's lossless run)
  --probe        whether a head trained on "answer kept" itself could do better: logistic
                 regressions on the logit features, the hidden state and both, fitted and
                 scored out of fold (folds by prompt, C chosen inside each training fold);
                 needs the run's features stage

The estimate is computed on the label run's responses (the judge's training prompts, never
the benchmark's items), on all of them and on the head's validation prompts alone.

    python benchmarks/diagnostics/answer_change_check.py --run benchmarks/results/chat_judge/label-run \\
        --head benchmarks/results/chat_judge/head --report benchmarks/results/chat_tradeoff.json \\
        --server draft_model:8 --json benchmarks/results/answer_change_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SCORE_N = "20"  # the label score's suffix length, as the benchmark's head was trained


def _auc(kept: np.ndarray, signal: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(signal)
    return float(roc_auc_score(kept[ok], signal[ok])) if len(set(kept[ok])) == 2 else None


def head_accept_probability(head_dir: Path, data) -> np.ndarray:
    """The served head's P(accept) for every mismatch of `data` (NaN where a logit feature
    does not exist offline: the response's last position has no next row)."""
    import torch

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.offline.train import evidence_matrix
    from selfjudge_vllm.rules import JudgeHead

    artifact = JudgeArtifact.load(head_dir)
    head = JudgeHead.from_artifact(artifact)
    evidence = None
    if head.logit_features:
        from selfjudge_vllm.features import LOGIT_FEATURES

        columns = [LOGIT_FEATURES.index(f) for f in head.logit_features]
        evidence = torch.from_numpy(evidence_matrix(data.records)[:, columns])
    logits = head.judge_logits(data.substituted if head.reads_hidden else None, evidence)
    return torch.sigmoid(logits.double()).numpy()


PROBE_C = (0.001, 0.01, 0.1, 1.0)
PROBE_FOLDS = 5


def _probe_model(c: float):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # The imputer fills next_confidence where a mismatch is the response's last token.
    return make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def out_of_fold_auc(x: np.ndarray, kept: np.ndarray, groups: np.ndarray) -> dict:
    """ROC-AUC of out-of-fold P(answer kept): each outer fold's model is fitted on the
    other prompts with C chosen by a grid search over splits of those prompts, so no prompt
    is scored by a model that saw it."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GridSearchCV, GroupKFold

    predicted, chosen = np.full(len(kept), np.nan), []
    for fit, test in GroupKFold(PROBE_FOLDS).split(x, kept, groups):
        search = GridSearchCV(_probe_model(PROBE_C[0]), {"logisticregression__C": PROBE_C},
                              scoring="roc_auc", cv=GroupKFold(PROBE_FOLDS - 1))
        search.fit(x[fit], kept[fit], groups=groups[fit])
        chosen.append(search.best_params_["logisticregression__C"])
        predicted[test] = search.predict_proba(x[test])[:, 1]
    return {"roc_auc": float(roc_auc_score(kept, predicted)), "C_per_fold": chosen}


def answer_kept_probe(evidence: np.ndarray, hidden: np.ndarray, kept: np.ndarray, groups: np.ndarray) -> dict:
    return {name: out_of_fold_auc(x, kept, groups) for name, x in
            (("logits", evidence), ("hidden", hidden), ("both", np.hstack([hidden, evidence])))}


def measured_gsm8k_changes(report: dict, server: tuple[str, int]) -> dict[tuple[str, float], dict]:
    """(method, knob) -> answer changes on the GSM8K items, from the benchmark's report."""
    out = {}
    for row in report["points"]:
        if (row["proposer"], row["k"]) != server or "changes" not in row:
            continue
        changed = [i for i in row["changed_ids"] if i.startswith("gsm8k/")]
        out[(row["method"], row["knob"])] = {
            "gsm8k_n": row["gsm8k_n"], "gsm8k_changes": len(changed),
            "gsm8k_change_rate": len(changed) / row["gsm8k_n"] if row["gsm8k_n"] else None,
            "all_n": row["paired_n"], "all_changes": row["changes"], "text_changes": row["text_changes"],
            "mean_acceptance_length": row["mean_acceptance_length"]}
    return out


def check(run_dir: Path, head_dir: Path, report: dict, server: tuple[str, int], probe: bool = False) -> dict:
    import torch

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.features import DRAFT_LOGRATIO, LOGIT_FEATURES
    from selfjudge_vllm.offline.train import evidence_matrix, load_training_data, response_change_share, split_by_prompt
    from selfjudge_vllm.rules import RULES

    artifact = JudgeArtifact.load(head_dir)
    training = artifact.config.provenance.get("report", {})
    data = load_training_data([run_dir], with_hidden=probe or artifact.weight is not None, allow_partial=True)
    # The head's own train/validation split (same records, share and seed as `selfjudge train`).
    is_val = split_by_prompt([r["id"] for r in data.records], training.get("validation_share", 0.2),
                             training.get("seed", 0))
    changed = [data.outcomes.changed(r) for r in data.records]
    rows = np.array([c is not None for c in changed])
    if rows.sum() < 2:
        sys.exit(f"answer_change_check: {run_dir} has no answer outcomes; run `selfjudge label ... --answer-pattern` "
                 "on it first")
    changed = np.array([bool(c) for c, ok in zip(changed, rows) if ok])
    records = [r for r, ok in zip(data.records, rows) if ok]
    p_head = head_accept_probability(head_dir, data)[rows]
    evidence = evidence_matrix(records)
    logratio = evidence[:, LOGIT_FEATURES.index(DRAFT_LOGRATIO)]
    label_score = np.array([r["scores"]["max"][SCORE_N] for r in records])
    kept = ~changed
    response_of = np.array([r["id"] for r in records])
    m = np.array([r["m"] for r in records])
    validation = is_val[rows]

    def estimate(signal, threshold, where):
        return response_change_share(response_of[where], m[where], signal[where], changed[where], threshold)

    measured = measured_gsm8k_changes(report, server)
    points = []
    for (method, knob), figures in sorted(measured.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if method == "judge":
            signal, threshold = p_head, knob  # the step's logit >= logit(threshold) is p >= threshold
        elif method == "top_alpha":
            signal, threshold = logratio, RULES["top_alpha"].to_step(knob)
        else:
            continue  # entropy needs the verifying row's entropy, which the label run does not keep
        everywhere = np.ones(len(records), dtype=bool)
        points.append({"method": method, "knob": knob, **figures,
                       "mismatch_accept_share": float((signal >= threshold).mean()),
                       "estimated_change_share": estimate(signal, threshold, everywhere),
                       "estimated_change_share_validation": estimate(signal, threshold, validation)})
    probed = None
    if probe:
        hidden = data.substituted[torch.from_numpy(rows)].double().numpy()
        probed = answer_kept_probe(evidence, hidden, kept, response_of)
    return {
        "run": str(run_dir), "head": str(head_dir), "server": list(server),
        "mismatches_with_outcomes": int(len(records)), "responses": int(len(set(response_of))),
        "validation_responses": int(len(set(response_of[validation]))),
        "answer_change_share_of_mismatches": float(changed.mean()),
        "roc_auc_answer_kept": {"head": _auc(kept, p_head), "draft_logratio": _auc(kept, logratio),
                                "label_score": _auc(kept, -label_score)},
        "points": points,
        "answer_kept_probe": probed,
    }


def _markdown(result: dict) -> str:
    auc = result["roc_auc_answer_kept"]
    lines = [
        f"{result['mismatches_with_outcomes']} mismatches of {result['responses']} label-run responses with answer "
        f"outcomes: {100 * result['answer_change_share_of_mismatches']:.1f}% of single substitutions change the final "
        f"answer. ROC-AUC for 'answer kept': head {_f(auc['head'])}, draft log-ratio {_f(auc['draft_logratio'])}, "
        f"label score {_f(auc['label_score'])}.", "",
        "| method | knob | accept. length | mismatches accepted (label run) | estimated answer changes "
        f"(all {result['responses']} / validation {result['validation_responses']} responses) "
        "| measured GSM8K answer changes | measured, all items (text differs) |",
        "|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(
            f"| {p['method']} | {p['knob']:g} | {_f(p['mean_acceptance_length'])} | {100 * p['mismatch_accept_share']:.1f}% "
            f"| {100 * p['estimated_change_share']:.1f}% / {100 * p['estimated_change_share_validation']:.1f}% "
            f"| {p['gsm8k_changes']}/{p['gsm8k_n']} ({100 * p['gsm8k_change_rate']:.1f}%) "
            f"| {p['all_changes']}/{p['all_n']} ({p['text_changes']}) |")
    if result.get("answer_kept_probe"):
        probe = result["answer_kept_probe"]
        lines += ["", "Heads fitted on 'answer kept' itself, out of fold by prompt (ROC-AUC): "
                  + ", ".join(f"{name} {_f(v['roc_auc'])}" for name, v in probe.items()) + "."]
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="label run with answer outcomes")
    parser.add_argument("--head", type=Path, required=True, help="the head the benchmark served")
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks/results/chat_tradeoff.json")
    parser.add_argument("--server", default="draft_model:8", help="proposer:k of the benchmark's points")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--probe", action="store_true",
                        help="also fit heads on 'answer kept' (out of fold; needs the run's features)")
    args = parser.parse_args(argv)
    proposer, k = args.server.split(":")
    result = check(args.run, args.head, json.loads(args.report.read_text()), (proposer, int(k)), probe=args.probe)
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = "python benchmarks/diagnostics/answer_change_check.py " + arguments
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
