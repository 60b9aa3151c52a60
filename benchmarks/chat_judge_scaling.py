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
    serve     the served meaning-change rate at a matched validation accept share: each head of --serve-heads
              (default: the feature set with the best held-out ROC-AUC at the largest size, at
              every size) at its --serve-point operating point (default accepts_10pct: at most
              10% of the same validation mismatches accepted) served on every chat benchmark
              prompt (benchmarks/chat_meaning.py's 420, calibration and test) by calibrate's
              server, into a folder on the benchmark's store (RESULTS/chat_meaning/ngram-k8/
              scaling-FEATURES-SIZE: lossless is not served again, calibrate keys each head's
              judge points apart), then scored by the embedding scorer; resumable
    report    held-out ROC-AUC per feature set and size (the validation prompts choose nothing; an
              approximate 95% interval by a bootstrap over validation prompts, and the paired gap
              to the best feature set at each size), and each served head's acceptance against
              lossless, meaning changes (embedding, with a 95% bound), text changes and new loops
              (RESULTS/chat_judge_scaling/scaling.{json,md,png})

    python benchmarks/chat_judge_scaling.py --testbed testbed-qwen --stages prompts,label --prompts 400
    python benchmarks/chat_judge_scaling.py --stages train,report --allow-partial-run   # sizes 500 ... 10000 (all)
    python benchmarks/chat_judge_scaling.py --testbed testbed-qwen --stages serve,report --max-minutes 100
    python benchmarks/chat_judge_scaling.py --run benchmarks/results/chat_judge/label-run --features logits \\
        --sizes 100,200,300 --stages train,report --out /tmp/scaling --allow-partial-run   # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import chat_tasks  # noqa: E402
from selfjudge_vllm import calibrate  # noqa: E402
from selfjudge_vllm.measurement import log  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TAU = 0.0563  # SelfJudge's released GSM8K tau for N=20 (chat has no answers to calibrate it on)
FEATURE_SETS = ("hidden", "logits", "both")
SERVER = ("ngram", 8)  # the chat benchmark's first server, whose store the served heads share
# Each head at the same share of the same validation mismatches accepted (at most 10%): what
# is matched offline; the served acceptance against lossless differs by head and is reported.
SERVE_POINT = "accepts_10pct"


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


def auroc_rows(args) -> list[dict]:
    """Each trained head's held-out ROC-AUC, by size and feature set."""
    rows = []
    for size in args.sizes:
        for features in args.features:
            path = head_folder(args, features, size) / "training_report.json"
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            rows.append({"size": size, "features": features, "training_mismatches": r["training_mismatches"],
                         "validation_mismatches": r["validation_mismatches"],
                         "validation_prompts": r.get("validation_prompts"),
                         "validation_mismatch_roc_auc": r["feature_sets"][features]["validation_mismatch_roc_auc"]})
    return rows


BOOTSTRAP_RESAMPLES = 2000


def validation_logits(args, rows: list[dict]) -> tuple:
    """The validation mismatches every head was compared on (labels at TAU, each row's prompt)
    and each head's logit there, as the served head computes it (rules.JudgeHead). Refuses
    where a head was compared on other rows than the run's shards (with features, if a head
    reads them) give, or where the recomputed ROC-AUC is not its report's (the committed
    float16 features differ from the float32 ones trained on by rounding only)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.offline.train import (
        TrainSettings,
        evidence_matrix,
        label_scores,
        load_training_data,
        split_by_prompt,
    )
    from selfjudge_vllm.rules import JudgeHead

    with_hidden = any(r["features"] != "logits" for r in rows)  # a logits head needs no features stage
    data = load_training_data([args.run], with_hidden=with_hidden, allow_partial=args.allow_partial_run)
    settings = TrainSettings(tau=TAU, suffix_length=20)
    labels = (label_scores(data.records, settings) <= TAU).astype(int)
    ids = np.array([r["id"] for r in data.records])
    evidence = evidence_matrix(data.records)
    rows_kept = split_by_prompt(list(ids), settings.validation_share, settings.seed) & np.isfinite(evidence).all(1)
    hidden = data.substituted[torch.from_numpy(np.flatnonzero(rows_kept))] if with_hidden else None
    evidence_kept = torch.from_numpy(evidence[rows_kept])
    logits = {}
    for r in rows:
        if r["validation_mismatches"] != int(rows_kept.sum()):
            sys.exit(f"chat_judge_scaling: head {r['features']}-{r['size']} was compared on "
                     f"{r['validation_mismatches']} validation mismatches, the run's shards with features give "
                     f"{int(rows_kept.sum())}: train every head on the same shards")
        head = JudgeHead.from_artifact(JudgeArtifact.load(head_folder(args, r["features"], r["size"])))
        logit = head.judge_logits(hidden if head.reads_hidden else None,
                                  evidence_kept if head.logit_features else None).double().numpy()
        recomputed = roc_auc_score(labels[rows_kept], logit)
        if abs(recomputed - r["validation_mismatch_roc_auc"]) > 0.005:
            sys.exit(f"chat_judge_scaling: head {r['features']}-{r['size']}: ROC-AUC {recomputed:.4f} recomputed "
                     f"from its artifact, {r['validation_mismatch_roc_auc']:.4f} in its report")
        logits[r["features"], r["size"]] = logit
    return labels[rows_kept], ids[rows_kept], logits


def add_auroc_intervals(args, rows: list[dict]) -> None:
    """Adds to each row a 95% interval of its held-out ROC-AUC and, at each size, of its
    difference from the best feature set there (paired: the same validation mismatches),
    both by a percentile bootstrap over validation prompts (mismatches of one prompt are not
    independent, so whole prompts are resampled)."""
    import numpy as np
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    labels, prompt_of, logits = validation_logits(args, rows)
    prompts = sorted(set(prompt_of))
    rows_of = [np.flatnonzero(prompt_of == p) for p in prompts]

    def interval(logit, baseline=None) -> list[float] | None:
        """ROC-AUC of `logit`, or (with `baseline`) the baseline's ROC-AUC minus logit's; None
        where a resample drew only prompts of one label (too few validation prompts)."""
        def on_prompts(sample):
            picked = np.concatenate([rows_of[int(k)] for k in sample])
            if len(set(labels[picked])) < 2:
                return np.nan
            auc = roc_auc_score(labels[picked], logit[picked])
            return auc if baseline is None else roc_auc_score(labels[picked], baseline[picked]) - auc
        result = bootstrap((np.arange(len(prompts)),), on_prompts, vectorized=False, method="percentile",
                           n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95, random_state=0)
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        return [low, high] if np.isfinite([low, high]).all() else None

    for r in rows:
        mine = logits[r["features"], r["size"]]
        r["roc_auc_95"] = interval(mine)
        best = max((o for o in rows if o["size"] == r["size"]), key=lambda o: o["validation_mismatch_roc_auc"])
        r["best_at_size"] = best["features"]
        if best is not r:
            r["gap_to_best_95"] = interval(mine, baseline=logits[best["features"], best["size"]])


def served_heads(args) -> list[tuple[str, int]]:
    """(feature set, size) of each head the serve stage serves: --serve-heads, else the feature
    set with the best held-out ROC-AUC at the largest size trained, at every size."""
    if args.serve_heads:
        return [(name.rpartition("-")[0], int(name.rpartition("-")[2])) for name in args.serve_heads.split(",")]
    rows = auroc_rows(args)
    if not rows:
        sys.exit("chat_judge_scaling: no trained heads to serve; run the train stage first")
    largest = max(r["size"] for r in rows)
    best = max((r for r in rows if r["size"] == largest), key=lambda r: r["validation_mismatch_roc_auc"])["features"]
    return [(best, size) for size in sorted({r["size"] for r in rows if r["features"] == best})]


def serve_folder_name(features: str, size: int) -> str:
    """The serve stage's folder for a head, in the chat benchmark's OUT/<server>."""
    return f"scaling-{features}-{size}"


def serve_folder(features: str, size: int) -> Path:
    from benchmarks import chat_meaning

    return chat_meaning.linked_folder(SERVER, serve_folder_name(features, size))


def served_threshold(head: Path, point: str) -> float:
    """The head's threshold at its operating point `point`, as calibrate's judge grid rounds it."""
    from selfjudge_vllm.artifact import JudgeArtifact

    return round(JudgeArtifact.load(head).config.operating_points[point].threshold, 6)


def served_key(head: Path, point: str, folder: Path) -> str:
    """The calibrate point key of `head` at its operating point `point` in `folder`'s store."""
    from selfjudge_vllm.files import file_sha256

    tag = calibrate.store_head_tag(folder, file_sha256(head / "model.safetensors"))
    return calibrate.point_key("judge", served_threshold(head, point), tag)


def serve(args) -> None:
    from benchmarks import chat_meaning

    started = time.monotonic()
    for features, size in served_heads(args):
        head = head_folder(args, features, size)
        as_benchmark = argparse.Namespace(testbed=args.testbed, head=head, max_minutes=None)
        settings = dataclasses.replace(chat_meaning.calibrate_settings(as_benchmark, SERVER, *chat_meaning.MEASUREMENTS[0]),
                                       out=serve_folder(features, size), max_minutes=None)
        left = None if args.max_minutes is None else args.max_minutes - (time.monotonic() - started) / 60
        log(f"serve: the {features} head on at most {size} mismatches at {args.serve_point}")
        threshold = served_threshold(head, args.serve_point)
        if not chat_meaning.serve_in_full(settings, lambda store, ids, tag, t=threshold: {
                "judge": calibrate.point_key("judge", t, tag)}, llm=False, max_minutes=left, stage="serve"):
            log("serve: not finished; rerun the same command to continue")
            return


def served_rows(args) -> list[dict]:
    """Each served head's point on every benchmark prompt, as the chat benchmark reports a point
    (benchmarks/chat_meaning_report.point_row); a head not served on all of them yet is left out."""
    from benchmarks import chat_meaning, chat_meaning_report
    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.meaning import MeaningJudge, request_text
    from selfjudge_vllm.measurement import RequestStore, load_jsonl

    root = chat_meaning.OUT / chat_meaning.server_name(SERVER)
    heads = served_heads(args) if args.serve_heads or auroc_rows(args) else []
    folders = {(f, size): root / serve_folder_name(f, size) for f, size in heads}
    folders = {head: folder for head, folder in folders.items() if (folder / "settings.json").is_file()}
    if not folders:
        return []
    # what every head's row reads alike: the benchmark's store, its split, prompts and scorers
    store = RequestStore(root / "store")
    calibration_ids, test_ids = chat_meaning_report.prompt_splits(
        chat_meaning.OUT, store, chat_meaning_report.measurement_reports(root))
    requests = {r["id"]: request_text(r) for r in load_jsonl(chat_meaning.OUT / "prompts.jsonl")}
    judges = {label: MeaningJudge(s, store.folder / "scores.jsonl") for label, s in chat_meaning.scorer_settings().items()}
    rows = []
    for (features, size), folder in folders.items():
        head = head_folder(args, features, size)
        key = served_key(head, args.serve_point, folder)
        row = chat_meaning_report.point_row(store, key, calibration_ids + test_ids, requests, judges, {}, {})
        if row["complete"] and row["acceptance_vs_lossless"] is not None:  # counters cover every prompt too
            point = JudgeArtifact.load(head).config.operating_points[args.serve_point]
            rows.append({"features": features, "size": size, "point": args.serve_point,
                         "validation_accept_share": point.metrics.get("mismatch_accept_share"), **row})
    return rows


def report(args) -> None:
    rows = auroc_rows(args)
    if rows and (args.run / "run.json").is_file():
        add_auroc_intervals(args, rows)
    elif rows:
        log(f"report: no label run at {args.run}: ROC-AUC without intervals")
    served = served_rows(args)
    run_name = os.path.relpath(args.run.resolve(), ROOT)  # the same in every clone
    (args.out / "scaling.json").write_text(json.dumps({"run": run_name, "tau": TAU, "rows": rows,
                                                       "served": served}, indent=1) + "\n")
    lines = ["# SelfJudge heads by training-set size (held-out ROC-AUC on validation mismatches)", "",
             f"Label run `{run_name}`, tau {TAU} (N=20); the validation prompts are the same at every size and "
             "choose nothing (each head's C is chosen on a share of its training prompts). Intervals: approximate 95%, "
             f"percentile bootstrap over the validation prompts ({BOOTSTRAP_RESAMPLES} resamples; a prompt's "
             "mismatches are not independent); the gap is the best feature set's ROC-AUC at that size minus this "
             "one's, on the same mismatches (paired; the best is picked on these same mismatches, so the gap "
             "leans in its favour).", "",
             "| training mismatches (limit) | used | features | validation mismatches (prompts) | ROC-AUC (95%) "
             "| gap to the best at this size (95%) |",
             "|---:|---:|---|---:|---:|---:|"]

    def span(pair) -> str:
        return "n/a (too few validation prompts)" if pair is None else f"{pair[0]:.3f} to {pair[1]:.3f}"

    for r in rows:
        if "best_at_size" not in r:  # no label run here to recompute the heads on
            interval, gap = "n/a (no label run)", "n/a"
        else:
            interval = span(r["roc_auc_95"])
            gap = span(r["gap_to_best_95"]) if "gap_to_best_95" in r else "(the best)"
        lines.append(f"| {r['size']} | {r['training_mismatches']} | {r['features']} | {r['validation_mismatches']} "
                     f"({r['validation_prompts']}) | {r['validation_mismatch_roc_auc']:.3f} ({interval}) "
                     f"| {gap} |")
    if served:
        lines += ["", f"Served on the chat benchmark's {served[0]['n']} prompts (ngram k=8), each head at "
                  f"`{args.serve_point}` (the same validation mismatches, the share of them it accepts matched; its "
                  "served acceptance is what it is), paired with lossless on the same server's store; bounds 95% "
                  "one-sided, each for its point alone:", "",
                  "| head | threshold | validation mismatches accepted | acceptance vs lossless "
                  "| meaning changed (embedding) | texts changed | new loops |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in served:
            embedding = r["measures"]["embedding"]
            meaning = (f"{embedding['changes']}: {100 * embedding['rate']:.2f}% (<= {100 * embedding['upper95']:.2f}%)"
                       if embedding.get("upper95") is not None else "not scored")
            texts = r["text_changes"]
            share = r["validation_accept_share"]
            lines.append(f"| {r['features']}, at most {r['size']} | {r['knob']:g} "
                         f"| {'n/a' if share is None else f'{100 * share:.1f}%'} | {r['acceptance_vs_lossless']:.3f}x "
                         f"| {meaning} | {texts['changes']}: {100 * texts['rate']:.2f}% | {r['loops']} |")
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
    parser.add_argument("--prompts", type=int, default=400,
                        help="label prompts (default 400: 21,374 mismatches on the Qwen testbed, 53 per response)")
    parser.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[500, 1000, 2500, 5000, 10000])
    parser.add_argument("--features", type=lambda t: t.split(","), default=list(FEATURE_SETS))
    parser.add_argument("--allow-partial-run", action="store_true", help="train on a label run's complete shards")
    parser.add_argument("--serve-heads", help="FEATURES-SIZE,... to serve (default: the best feature set at every size)")
    parser.add_argument("--serve-point", default=SERVE_POINT, help=f"each head's operating point (default {SERVE_POINT})")
    parser.add_argument("--max-minutes", type=float, help="end the serve stage's sitting after this long (rerun continues)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.run = args.run or args.out / "label-run"
    for stage in args.stages.split(","):
        if stage in ("prompts", "label", "serve") and args.testbed is None:
            parser.error(f"the {stage} stage needs --testbed")
        {"prompts": write_prompts, "label": label, "train": train, "serve": serve, "report": report}[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
