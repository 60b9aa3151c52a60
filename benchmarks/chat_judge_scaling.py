"""The paper's judge for chat traffic, and the data-scaling curve its conclusion leaves open
(issue 42, item 4): SelfJudge labels on held-out ShareGPT prompts, heads on hidden states, on
logits and on both, at several training-set sizes.

    prompts   ShareGPT first turns of the judge-label split (benchmarks/chat_tasks.py
              SHAREGPT_SPLITS["judge_labels"]: disjoint from the served head's prompts, the
              scorer validation pairs and the chat benchmark) as a label prompt file
    label     `selfjudge label` on them with the Qwen testbed (the target's greedy responses,
              draft-model and ngram k=8 mismatches, the semantic preservation score at N=20,
              the target's hidden states); resumable shard by shard (rerun to continue). Its
              float32 features/ are not committed; their float16 copy (label-run/
              features-float16, written by `selfjudge label`, or `selfjudge compact --run` for
              a run labelled before) is, so train and report run on a fresh clone
    train     per size in --sizes and per feature set (hidden, logits, both): `selfjudge train
              --max-train-mismatches SIZE` at SelfJudge's tau for N=20 (0.0563), the validation
              prompts the same for every size (nested training subsets)
    report    held-out ROC-AUC per feature set and size (RESULTS/chat_judge_scaling/scaling.{json,md,png})

    python benchmarks/chat_judge_scaling.py --testbed testbed-qwen --stages prompts,label --prompts 400
    python benchmarks/chat_judge_scaling.py --testbed testbed-qwen --stages train,report --sizes 1000,2500,5000
    python benchmarks/chat_judge_scaling.py --run benchmarks/results/chat_judge/label-run --features logits \\
        --sizes 100,200,300 --stages train,report --out /tmp/scaling --allow-partial-run   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import chat_tasks  # noqa: E402
from selfjudge_vllm.measurement import log  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TAU = 0.0563  # SelfJudge's released GSM8K tau for N=20 (chat has no answers to calibrate it on)
FEATURE_SETS = ("hidden", "logits", "both")


def write_prompts(args) -> None:
    template = chat_tasks.ChatTemplate(args.testbed / "target")
    rows = [{"id": pid, "prompt": template([{"role": "user", "content": text}])}
            for pid, text in chat_tasks.sharegpt_split("judge_labels", args.prompts)]
    path = args.out / "label_prompts.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.is_file() and not text.startswith(path.read_text()):
        sys.exit(f"chat_judge_scaling: {path} holds other prompts; the label run is bound to it")
    path.write_text(text)
    log(f"prompts: {len(rows)} in {path}")


def label(args) -> None:
    cli = [sys.executable, "-m", "selfjudge_vllm.cli"]
    subprocess.run(cli + [
        "label", "--target", os.path.relpath(args.testbed / "target"), "--draft", os.path.relpath(args.testbed / "draft"),
        "--prompts", os.path.relpath(args.out / "label_prompts.jsonl"), "--out", os.path.relpath(args.run),
        "--max-new-tokens", "256", "--dtype", "float32", "--block-size", "32", "--max-model-len", "2048",
        "--suffix-lengths", "20", "--shard-size", "20", "--ngram-k", "8",
    ], check=True, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="6"))


def head_folder(args, features: str, size: int) -> Path:
    return args.out / "heads" / f"{features}-{size}"


def train(args) -> None:
    cli = [sys.executable, "-m", "selfjudge_vllm.cli", "train"]
    for size in args.sizes:
        for features in args.features:
            out = head_folder(args, features, size)
            if (out / "training_report.json").is_file():
                continue  # a trained head is kept: the curve's points do not move
            log(f"train: {features} on at most {size} training mismatches")
            subprocess.run(cli + ["--run", str(args.run), "--out", str(out), "--tau", str(TAU), "--suffix-length",
                                  "20", "--features", features, "--max-train-mismatches", str(size)]
                           + (["--allow-partial-run"] if args.allow_partial_run else []), check=True,
                           stdout=subprocess.DEVNULL)


def report(args) -> None:
    rows = []
    for size in args.sizes:
        for features in args.features:
            path = head_folder(args, features, size) / "training_report.json"
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            rows.append({"size": size, "features": features, "training_mismatches": r["training_mismatches"],
                         "validation_mismatches": r["validation_mismatches"],
                         "validation_mismatch_roc_auc": r["feature_sets"][features]["validation_mismatch_roc_auc"]})
    (args.out / "scaling.json").write_text(json.dumps({"run": str(args.run), "tau": TAU, "rows": rows}, indent=1) + "\n")
    lines = ["# SelfJudge heads by training-set size (held-out ROC-AUC on validation mismatches)", "",
             f"Label run `{args.run}`, tau {TAU} (N=20); the validation prompts are the same at every size.", "",
             "| training mismatches (limit) | used | features | validation mismatches | ROC-AUC |",
             "|---:|---:|---|---:|---:|"]
    lines += [f"| {r['size']} | {r['training_mismatches']} | {r['features']} | {r['validation_mismatches']} "
              f"| {r['validation_mismatch_roc_auc']:.3f} |" for r in rows]
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for features in args.features:
            points = [(r["training_mismatches"], r["validation_mismatch_roc_auc"]) for r in rows
                      if r["features"] == features]
            if points:
                ax.plot(*zip(*points), marker="o", label=features)
        ax.set_xscale("log")
        ax.set_xlabel("training mismatches")
        ax.set_ylabel("held-out ROC-AUC (validation mismatches)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "scaling.png", dpi=110)
        plt.close(fig)
    except ImportError:
        log("report: matplotlib not installed; no plot")
    log(f"report: {len(rows)} heads in {args.out / 'scaling.md'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, help="`selfjudge testbed --model qwen-coder` folder (prompts, label)")
    parser.add_argument("--out", type=Path, default=RESULTS / "chat_judge_scaling")
    parser.add_argument("--run", type=Path, help="the label run (default OUT/label-run)")
    parser.add_argument("--stages", default="prompts,label,train,report")
    parser.add_argument("--prompts", type=int, default=400, help="label prompts (default 400: about 5,000 mismatches)")
    parser.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1000, 2500, 5000])
    parser.add_argument("--features", type=lambda t: t.split(","), default=list(FEATURE_SETS))
    parser.add_argument("--allow-partial-run", action="store_true", help="train on a label run's complete shards")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.run = args.run or args.out / "label-run"
    for stage in args.stages.split(","):
        if stage in ("prompts", "label") and args.testbed is None:
            parser.error(f"the {stage} stage needs --testbed")
        {"prompts": write_prompts, "label": label, "train": train, "report": report}[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
