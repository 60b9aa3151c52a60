"""Why the judge trades quality for acceptance the way it does: its labels and its mistakes.

Reads the judge's label run and trained head (what `benchmarks/tradeoff.py` wrote under
WORK/judge/) and the sweep's results, and reports on the validation prompts' mismatches (the
only rows the head decides online):

  - the share of mismatches the target's own labels call acceptable (score <= tau), per family
  - at each swept threshold: the share of mismatches the head accepts and how many of those
    the labels call acceptable (precision), beside the acceptance length measured online

    python benchmarks/judge_diagnostics.py                    # after benchmarks/tradeoff.py
    python benchmarks/judge_diagnostics.py --work bench_work --tau 0.1

Writes RESULTS/judge_diagnostics.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import tasks  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench_work", help="tradeoff.py's --work folder")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args(argv)

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.offline.train import TrainSettings, load_run, split_by_prompt

    run_dir, head_dir = args.work / "judge/label-run", args.work / "judge/head"
    training = json.loads((head_dir / "training_report.json").read_text())
    records, substituted, _ = load_run(run_dir)
    scores = np.array([r["scores"][training["suffix_mode"]][str(training["suffix_length"])] for r in records])
    acceptable = scores <= training["tau"]
    # The same prompt split as `selfjudge train` (its defaults: tradeoff.py does not change them).
    defaults = TrainSettings()
    is_val = split_by_prompt([r["id"] for r in records], defaults.validation_share, defaults.seed)
    artifact = JudgeArtifact.load(head_dir)
    logits = (substituted.double() @ artifact.weight.double().reshape(-1) + float(artifact.bias)).numpy()
    p_accept = 1 / (1 + np.exp(-logits))

    family_of = {item.id: item.family for item in tasks.load_items("train")}
    families = np.array([family_of.get(r["id"], "other") for r in records])
    by_family = {f: {"mismatches": int((families == f).sum()),
                     "acceptable_share": float(acceptable[families == f].mean())}
                 for f in sorted(set(families))}

    sweep = json.loads((args.results / "tradeoff.json").read_text())
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
    report = {
        "label_run": str(run_dir), "head": str(head_dir), "tau": training["tau"],
        "mismatches": len(records), "acceptable_share": float(acceptable.mean()), "by_family": by_family,
        "validation_mismatches": int(is_val.sum()), "validation_acceptable_share": float(val_ok.mean()),
        "lossless_acceptance_length": {f"{proposer} k={k}": measured[(proposer, k, None)] for proposer, k in servers},
        "thresholds": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "judge_diagnostics.json").write_text(json.dumps(report, indent=1))

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
    print(f"\n-> {args.results / 'judge_diagnostics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
