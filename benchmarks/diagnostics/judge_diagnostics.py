"""Why the judge trades quality for acceptance the way it does: its labels and its mistakes.

Reads the judge's label run and trained head (what `benchmarks/tradeoff.py` wrote under
WORK/judge/) and the sweep's results, and reports on the validation prompts' mismatches (the
only rows the head decides online):

  - the share of mismatches the target's own labels call acceptable (score <= tau), per family
  - at each swept threshold: the share of mismatches the head accepts and how many of those
    the labels call acceptable (precision), beside the acceptance length measured online
  - the same for the training-free top_alpha rule, from the target's log-probability ratio
    log p(draft) - log p(top-1) at each mismatch (the target run again with transformers,
    float32, on the label run's sequences), and how well each signal ranks the labels

    python benchmarks/diagnostics/judge_diagnostics.py            # after benchmarks/tradeoff.py, its defaults
    python benchmarks/diagnostics/judge_diagnostics.py --run RUN --head HEAD --sweep SWEEP.json --out OUT.json

Writes benchmarks/results/judge_diagnostics.json (or --out) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import tasks  # noqa: E402

ALPHAS = (0.5, 0.3, 0.2, 0.1, 0.05)


def draft_log_ratios(run_dir: Path, records: list[dict]) -> np.ndarray:
    """log p_target(draft) - max log p_target at each mismatch's position, from the run's
    responses (position m of prompt + response is predicted by position m - 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    from selfjudge_vllm.offline.store import RunDir

    sequences = {r["id"]: r["prompt"] + r["response"] for r in RunDir(run_dir).read_stage("responses")}
    target = json.loads((run_dir / "run.json").read_text())["target"]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    by_prompt: dict[str, list[int]] = {}
    for k, r in enumerate(records):
        by_prompt.setdefault(r["id"], []).append(k)
    ratios = np.empty(len(records))
    with torch.no_grad():
        for done, (prompt_id, rows) in enumerate(by_prompt.items()):
            logprobs = torch.log_softmax(model(torch.tensor([sequences[prompt_id]])).logits[0].float(), -1)
            for k in rows:
                position = logprobs[records[k]["m"] - 1]
                ratios[k] = float(position[records[k]["draft"]] - position.max())
            if done % 50 == 0:
                print(f"log-probability ratios: {done + 1}/{len(by_prompt)} prompts", flush=True)
    return ratios


def _fitted_auc(features, labels, is_val, c) -> float | None:
    """Validation ROC-AUC of a standardised logistic regression fitted on the training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    if len(set(labels[~is_val])) < 2 or len(set(labels[is_val])) < 2:
        return None
    scaler = StandardScaler().fit(features[~is_val])
    model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(features[~is_val]), labels[~is_val])
    return float(roc_auc_score(labels[is_val], model.predict_proba(scaler.transform(features[is_val]))[:, 1]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "bench_work/judge/label-run", help="label run folder")
    parser.add_argument("--head", type=Path, default=ROOT / "bench_work/judge/head", help="judge trained on it")
    parser.add_argument("--sweep", type=Path, default=ROOT / "benchmarks/results/tradeoff.json",
                        help="tradeoff.py's JSON report (measured acceptance lengths)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/judge_diagnostics.json")
    args = parser.parse_args(argv)
    for path in (args.run / "run.json", args.head / "training_report.json", args.sweep):
        if not path.is_file():
            sys.exit(f"judge_diagnostics: {path} missing; run benchmarks/tradeoff.py first (or pass "
                     "--run/--head/--sweep)")

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.features import LOGIT_FEATURES
    from selfjudge_vllm.offline.store import load_run
    from selfjudge_vllm.offline.train import TrainSettings, evidence_matrix, split_by_prompt

    run_dir, head_dir = args.run, args.head
    training = json.loads((head_dir / "training_report.json").read_text())
    records, substituted, _ = load_run(run_dir)
    scores = np.array([r["scores"][training["suffix_mode"]][str(training["suffix_length"])] for r in records])
    acceptable = scores <= training["tau"]
    # The same prompt split as `selfjudge train` (reports written before it recorded the split
    # used its defaults).
    defaults = TrainSettings()
    is_val = split_by_prompt([r["id"] for r in records], training.get("validation_share", defaults.validation_share),
                             training.get("seed", defaults.seed))
    artifact = JudgeArtifact.load(head_dir)
    logits = np.full(len(records), float(artifact.bias))
    if artifact.weight is not None:
        logits += (substituted.double() @ artifact.weight.double()).numpy()
    # The logit features, as `train` compared the heads: mismatches where all of them exist.
    evidence = evidence_matrix(records)
    if evidence is not None:
        is_val &= np.isfinite(evidence).all(1)
    if artifact.scalar_weight is not None:
        columns = [LOGIT_FEATURES.index(f) for f in artifact.config.logit_features]
        logits += np.nan_to_num(evidence[:, columns]) @ artifact.scalar_weight.double().numpy()
    p_accept = 1 / (1 + np.exp(-logits))

    family_of = {item.id: item.family for item in tasks.load_items("train")}
    families = np.array([family_of.get(r["id"], "other") for r in records])
    by_family = {f: {"mismatches": int((families == f).sum()),
                     "acceptable_share": float(acceptable[families == f].mean())}
                 for f in sorted(set(families))}

    sweep = json.loads(args.sweep.read_text())
    measured = {(p["proposer"], p["k"], p["knob"]): p["mean_acceptance_length"]
                for p in sweep["points"] if p["method"] in ("judge", "lossless")}
    servers = sorted({(proposer, k) for proposer, k, _ in measured})
    thresholds = sorted({p["knob"] for p in sweep["points"] if p["method"] == "judge"}, reverse=True)
    val_p, val_ok = p_accept[is_val], acceptable[is_val]
    rows = []
    for t in thresholds:
        chosen = val_p >= t
        rows.append({
            "threshold": t,
            "mismatch_accept_share": float(chosen.mean()),
            "precision": float(val_ok[chosen].mean()) if chosen.any() else None,
            "acceptance_length": {f"{proposer} k={k}": measured.get((proposer, k, t)) for proposer, k in servers},
        })
    from sklearn.metrics import roc_auc_score

    all_ratios = draft_log_ratios(run_dir, records)
    hidden = substituted.double().numpy()
    ratios = all_ratios[is_val]
    alpha_rows = [{"alpha": a, "mismatch_accept_share": float((ratios >= np.log(a)).mean()),
                   "precision": float(val_ok[ratios >= np.log(a)].mean()) if (ratios >= np.log(a)).any() else None}
                  for a in ALPHAS]
    report = {
        "label_run": str(run_dir), "head": str(head_dir), "tau": training["tau"],
        "mismatches": len(records), "acceptable_share": float(acceptable.mean()), "by_family": by_family,
        "validation_mismatches": int(is_val.sum()), "validation_acceptable_share": float(val_ok.mean()),
        "lossless_acceptance_length": {f"{proposer} k={k}": measured[(proposer, k, None)] for proposer, k in servers},
        "thresholds": rows,
        "top_alpha": alpha_rows,
        # How well each signal ranks the validation mismatches by their labels.
        "roc_auc": {"judge_head": float(roc_auc_score(val_ok, val_p)),
                    "draft_log_ratio": float(roc_auc_score(val_ok, ratios)),
                    # Heads fitted here on the training prompts' mismatch rows only (C as trained):
                    "head_on_mismatches": _fitted_auc(hidden, acceptable, is_val, training["C"]),
                    "head_on_mismatches_with_ratio": _fitted_auc(
                        np.column_stack([hidden, all_ratios]), acceptable, is_val, training["C"])},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))

    print(f"{len(records)} labelled mismatches (tau {training['tau']}): {100 * report['acceptable_share']:.1f}% "
          "acceptable; by family: " + ", ".join(
              f"{f} {100 * v['acceptable_share']:.1f}% of {v['mismatches']}" for f, v in by_family.items()))
    columns = list(report["lossless_acceptance_length"])
    print(f"\nValidation mismatches: {report['validation_mismatches']}, "
          f"{100 * report['validation_acceptable_share']:.1f}% acceptable by label.\n")
    print("| threshold | mismatches accepted | of those acceptable | " +
          " | ".join(f"accept. length {c}" for c in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    print("| lossless | 0% | - | " + " | ".join(f"{report['lossless_acceptance_length'][c]:.2f}" for c in columns) + " |")
    for row in rows:
        precision = "-" if row["precision"] is None else f"{100 * row['precision']:.0f}%"
        lengths = " | ".join("n/a" if row["acceptance_length"][c] is None else f"{row['acceptance_length'][c]:.2f}"
                             for c in columns)
        print(f"| {row['threshold']} | {100 * row['mismatch_accept_share']:.1f}% | {precision} | {lengths} |")
    print("\n| top_alpha alpha | mismatches accepted | of those acceptable |\n|---|---|---|")
    for row in alpha_rows:
        precision = "-" if row["precision"] is None else f"{100 * row['precision']:.0f}%"
        print(f"| {row['alpha']} | {100 * row['mismatch_accept_share']:.1f}% | {precision} |")
    auc = {k: "n/a" if v is None else f"{v:.3f}" for k, v in report["roc_auc"].items()}
    print(f"\nRanking of the validation mismatches' labels (ROC-AUC): judge head {auc['judge_head']}; "
          f"log p(draft) - log p(top-1) {auc['draft_log_ratio']}; a head fitted on mismatch rows only "
          f"{auc['head_on_mismatches']}, with the ratio as one more feature {auc['head_on_mismatches_with_ratio']}")
    print(f"\n-> {args.out}")
    return report


if __name__ == "__main__":
    main()
