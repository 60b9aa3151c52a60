"""Accepted tokens vs answer quality vs tokens/s: the trained judge against lossless SD and
the training-free rules, on the Gemma 3 270M testbed, through vLLM's OpenAI server.

    python benchmarks/tradeoff.py --testbed testbed               # the full sweep (~90 min here, 56 with a trained judge)
    python benchmarks/tradeoff.py --testbed testbed --quick       # ~9 min here, 5.5 with a trained judge
    python benchmarks/tradeoff.py --testbed testbed --report-only # the report from the points measured so far
                                                                  # (or, with no sweep here, from the committed report)

Steps (each resumable: rerun the same command after an interruption):
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
import asyncio
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from benchmarks import tasks  # noqa: E402
from selfjudge_vllm.measurement import load_jsonl, log, request_options, spec_counters  # noqa: E402
from selfjudge_vllm.rules import RULES  # noqa: E402

SWEEP = {
    "lossless": [None],
    "judge": [0.95, 0.85, 0.7, 0.5],  # for a head without `accepts_*` operating points (format 1)
    "top_alpha": [0.5, 0.2],
    "entropy": [2.0, 1.0],
}
QUICK_SWEEP = {"lossless": [None], "judge": [0.5], "top_alpha": [0.3], "entropy": [1.5]}
KNOB_NAMES = {name: spec.knob for name, spec in RULES.items()}
TAU = 0.1  # semantic-preservation score above which a substitution is labelled reject (N=20)
NGRAM = {"prompt_lookup_min": 2, "prompt_lookup_max": 5}  # the ngram servers' lookup settings


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
        "--ngram-k", str(ngram_k), "--ngram-min", str(NGRAM["prompt_lookup_min"]),
        "--ngram-max", str(NGRAM["prompt_lookup_max"]),
    ], check=True, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    subprocess.run(cli + ["train", "--run", str(folder / "label-run"), "--out", str(head),
                          "--tau", str(TAU), "--suffix-length", "20"], check=True)
    return head


def judge_thresholds(head: Path, fallback: list[float]) -> list[float]:
    """The head's `accepts_*` operating points (the share of validation mismatches it
    accepts), loosest last: they span each head's own score range, so heads whose scores
    are scaled differently are swept alike. `fallback` for a head without them."""
    from selfjudge_vllm.artifact import JudgeArtifact

    points = JudgeArtifact.load(head).config.operating_points
    named = sorted((p.threshold for name, p in points.items() if name.startswith("accepts_")), reverse=True)
    return [round(t, 6) for t in named] or fallback


# -- requests ----------------------------------------------------------------------------------


async def _complete(client, item, extra, results, index):
    start = time.monotonic()
    out = await client.completions.create(
        model="target", prompt=item.prompt, max_tokens=item.max_tokens, temperature=0.0,
        stop=list(item.stop) or None, extra_body=extra, timeout=600,
    )
    results[index] = {"text": out.choices[0].text, "tokens": out.usage.completion_tokens,
                      "latency_s": time.monotonic() - start}


async def run_pass(base_url: str, items, extra: dict | None, concurrency: int) -> tuple[list[dict], float]:
    """All items with at most `concurrency` in flight; returns per-item results and wall time."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    gate, results = asyncio.Semaphore(concurrency), [None] * len(items)
    body = {"vllm_xargs": extra} if extra else None

    async def bounded(i, item):
        async with gate:
            await _complete(client, item, body, results, i)

    start = time.monotonic()
    await asyncio.gather(*(bounded(i, item) for i, item in enumerate(items)))
    wall = time.monotonic() - start
    await client.close()
    return results, wall


def start_server(testbed: Path, spec: dict | None, plugin: dict | None, log_path: Path, args):
    from selfjudge_vllm.testing.load import Server, free_port, serve_command

    extra = ["--disable-hybrid-kv-cache-manager"] if spec and spec["method"] == "draft_model" else []
    command = serve_command(testbed / "target", free_port(), spec, plugin, model_name="target",
                            dtype=args.dtype, extra_args=extra, max_model_len=args.max_model_len)
    return Server(command, log_path, startup_timeout=600)


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
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the points measured so far; starts no server")
    parser.add_argument("--compare-with", type=Path,
                        help="JSON report of an earlier sweep (another head): its matched-quality judge points "
                             "are listed beside this sweep's")
    args = parser.parse_args(argv)

    tag = args.tag or ("tradeoff_quick" if args.quick else "tradeoff")
    previous = None
    if args.compare_with:
        if not args.compare_with.is_file():
            sys.exit(f"tradeoff: --compare-with {args.compare_with} does not exist")
        previous = json.loads(args.compare_with.read_text())
    committed = args.results / f"{tag}.json"
    if args.report_only and not (args.work / tag / "points.jsonl").is_file() and committed.is_file():
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
        for needed in (head / "config.json", work / "reference.json"):
            if not needed.is_file():
                sys.exit(f"tradeoff --report-only: {needed} missing; run the sweep (without --report-only) first")
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
    started = time.monotonic()

    # Step 2: the target alone.
    reference_path = work / "reference.json"
    if reference_path.is_file():
        reference = json.loads(reference_path.read_text())
    else:
        log(f"reference: target alone on {len(items)} eval items")
        server = start_server(args.testbed, None, None, work / "server-reference.log", args)
        try:
            results, wall = asyncio.run(run_pass(server.base, items, None, args.concurrency))
            b1_items = [i for i in items if i.family == "continuation"][: args.batch1_items]
            b1, b1_wall = asyncio.run(run_pass(server.base, b1_items, None, 1))
        finally:
            server.stop()
        code = [(i, r) for i, r in zip(items, results) if i.family == "code"]
        passed = [tasks.code_passes(i.problem, r["text"]) for i, r in code]
        reference = {
            "texts": {i.id: r["text"] for i, r in zip(items, results)},
            "solved": [i.id for (i, _), ok in zip(code, passed) if ok],
            "code_problems": len(code),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "tokens_per_s_batch1": sum(r["tokens"] for r in b1) / b1_wall,
        }
        reference_path.write_text(json.dumps(reference))
    solved = set(reference["solved"])
    log(f"reference: target solves {len(solved)} of {reference['code_problems']} eval HumanEval problems")
    items = [i for i in items if i.family != "code" or i.id in solved]
    b1_items = [i for i in items if i.family == "continuation"][: args.batch1_items]

    # Step 3: the sweep, one server per proposer and draft length.
    points_path = work / "points.jsonl"
    done = {(p["proposer"], p["k"], p["method"], p["knob"]) for p in load_jsonl(points_path)}
    plan = [(proposer, k, method, knob)
            for proposer in ("draft_model", "ngram") for k in draft_lengths
            for method, knobs in sweep.items() for knob in knobs]
    remaining = [p for p in plan if p not in done]
    log(f"sweep: {len(plan)} points, {len(remaining)} to run, {len(items)} items each")
    for proposer in () if args.report_only else ("draft_model", "ngram"):
        for k in draft_lengths:
            todo = [p for p in remaining if p[:2] == (proposer, k)]
            if not todo:
                continue
            spec = ({"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}
                    if proposer == "draft_model" else
                    {"method": "ngram", "num_speculative_tokens": k, **NGRAM})
            plugin = {"selfjudge": {"head": str(head), "rule": "judge", "request_rules": ["top_alpha", "entropy"]}}
            log(f"server: {proposer}, k={k}")
            server = start_server(args.testbed, spec, plugin, work / f"server-{proposer}-{k}.log", args)
            try:
                for _, _, method, knob in todo:
                    before = spec_counters(server)
                    options = request_options(method, knob)
                    results, wall = asyncio.run(run_pass(server.base, items, options, args.concurrency))
                    after = spec_counters(server)
                    b1, b1_wall = asyncio.run(run_pass(server.base, b1_items, request_options(method, knob), 1))
                    counts = {key: after[key] - before[key] for key in after}
                    point = {
                        "proposer": proposer, "k": k, "method": method, "knob": knob, **counts,
                        "measured": datetime.date.today().isoformat(),
                        "mean_acceptance_length": 1 + counts["accepted"] / max(counts["drafts"], 1),
                        "acceptance_rate": counts["accepted"] / max(counts["draft_tokens"], 1),
                        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
                        "tokens_per_s_batch1": sum(r["tokens"] for r in b1) / b1_wall,
                        "items": [{"id": i.id, "family": i.family, **r} for i, r in zip(items, results)],
                    }
                    with points_path.open("a") as f:
                        f.write(json.dumps(point) + "\n")
                    remaining.remove((proposer, k, method, knob))
                    elapsed = time.monotonic() - started
                    log(f"  {method} {KNOB_NAMES.get(method, '')}={knob}: acceptance length "
                        f"{point['mean_acceptance_length']:.2f}, {point['tokens_per_s']:.1f} tok/s "
                        f"({point['tokens_per_s_batch1']:.1f} at batch 1); {len(remaining)} points left, "
                        f"{elapsed / 60:.1f} min so far")
            finally:
                server.stop()

    # Step 4: quality and the report.
    from benchmarks import tradeoff_report
    from selfjudge_vllm.artifact import JudgeArtifact

    points = load_jsonl(points_path)
    tradeoff_report.write(
        points=points, reference=reference, items=items, results=args.results, tag=tag,
        setup={
            # The day the newest point was measured (a rebuilt report keeps it).
            "date": max((p.get("measured", "") for p in points), default="") or datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}",
            "vllm": _version("vllm-cpu") or _version("vllm"),
            "target": f"{args.testbed / 'target'}, {args.dtype}",
            "draft": f"its first {args.draft_layers} layers", "head": str(head),
            "head_features": list(JudgeArtifact.load(head).config.features),
            "concurrency": args.concurrency, "batch1_items": len(b1_items), "quick": args.quick,
            "points_missing": len(remaining), "points_planned": len(plan),
            "command": "python benchmarks/tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        previous=previous,
    )
    log(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def points_from_report(report: dict) -> list[dict]:
    """The points file's records, from a report `tradeoff_report.write` wrote: each point's
    counters and timings (its row) with its items' texts and quality scores."""
    rows = {(r["proposer"], r["k"], r["method"], r["knob"]): r for r in report["points"]}
    kept = ("drafts", "draft_tokens", "accepted", "mean_acceptance_length", "acceptance_rate", "tokens_per_s",
            "tokens_per_s_batch1")
    return [{**{key: rows[(p["proposer"], p["k"], p["method"], p["knob"])][key] for key in kept}, **p}
            for p in report["items"]]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    from selfjudge_vllm.testing.load import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()  # a killed run stops the servers it started
    sys.exit(main())
