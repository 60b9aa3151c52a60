"""Speed as users see it (issue 42, item 5): tokens/s of relaxed points against lossless,
measured in one sitting on one server, interleaved (lossless, relaxed A, lossless, relaxed B,
...), at batch 1 and at --concurrency requests in flight, repeated, with the spread over the
repeats. Acceptance alone is not speed: this prints what a client sees.

Each arm serves the same prompts (the chat benchmark's, held out from everything a judge
trained on), greedy, lossless or through per-request control; the ratio of each repeat is
relaxed over the lossless arm served just before it, so slow drifts of the machine cancel.

Resumable: each pair (a lossless arm and the relaxed arm after it) is appended to OUT/pairs.jsonl
as it completes; a rerun with the same settings measures only the pairs it lacks (after a
warm-up arm on its fresh server), and --max-minutes ends a sitting between pairs. The figures
(OUT/speed.json, printed) are rebuilt from the pairs.

    python benchmarks/chat_speed.py --testbed testbed-qwen --points judge=0.635765,fly=0.3 --repeats 3 --max-minutes 50
    python benchmarks/chat_speed.py --tiny --points top_alpha=0.0 --repeats 2     # tiny random models, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from selfjudge_vllm.measurement import (  # noqa: E402
    EVERY_CORE_ENV,
    Progress,
    PromptItem,
    append_jsonl,
    every_core_env,
    load_jsonl,
    log,
    request_options,
    run_items,
)

RESULTS = ROOT / "benchmarks" / "results"


def parse_points(text: str) -> list[tuple[str, float]]:
    """'judge=0.188512,fly=0.3' -> [('judge', 0.188512), ('fly', 0.3)]."""
    points = []
    for part in text.split(","):
        rule, _, knob = part.partition("=")
        points.append((rule.strip(), float(knob)))
    if len({point_key(*p) for p in points}) < len(points):
        raise argparse.ArgumentTypeError(f"a point is given twice in {text!r}")
    return points


def arm(base_url: str, items: list[PromptItem], extra: dict, concurrency: int) -> dict:
    """One arm: every item once at `concurrency` in flight; tokens/s over the arm's wall time."""
    results = []
    wall = asyncio.run(run_items(base_url, items, extra, concurrency, lambda item, r: results.append(r)))
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def point_key(rule: str, knob: float) -> str:
    return f"{rule}-{knob!r}"  # every digit: two knobs never share a key


def pair_plan(points: list[tuple[str, float]], concurrencies: list[int], repeats: int) -> list[dict]:
    """Every pair in serving order: each repeat takes every concurrency and every point in turn
    (a sitting cut short has measured every point at both batch sizes)."""
    return [{"key": f"c{c}/r{r}/{point_key(rule, knob)}", "concurrency": c, "repeat": r, "rule": rule, "knob": knob}
            for r in range(repeats) for c in concurrencies for rule, knob in points]


def measure(base_url: str, items: list[PromptItem], todo: list[dict], batch1_items: int, record,
            out_of_time=lambda: False) -> bool:
    """Serve the pairs of `todo` (pair_plan's rows), each a lossless arm then the relaxed arm,
    handing each finished pair to `record`; the first arm at each concurrency of a sitting is a
    warm-up on every prompt of the arm (not counted: afterwards every arm finds its prompts in
    the prefix cache, lossless and relaxed alike). False when out_of_time stopped it before the
    last pair."""
    progress, warmed = Progress(len(todo), unit="pairs"), set()
    for pair in todo:
        if progress.done and out_of_time():  # every sitting measures at least one pair
            log(f"--max-minutes reached: {progress.line()}; rerun to continue")
            return False
        concurrency = pair["concurrency"]
        subset = items[:batch1_items] if concurrency == 1 else items
        if concurrency not in warmed:
            arm(base_url, subset, request_options("lossless", None), concurrency)
            warmed.add(concurrency)
        before = arm(base_url, subset, request_options("lossless", None), concurrency)
        relaxed = arm(base_url, subset, request_options(pair["rule"], pair["knob"]), concurrency)
        record({**pair, "items": len(subset), "lossless": before, "relaxed": relaxed,
                "ratio": relaxed["tokens_per_s"] / before["tokens_per_s"]})
        progress.tick()
        log(f"  concurrency {concurrency}, repeat {pair['repeat'] + 1}, {point_key(pair['rule'], pair['knob'])}: "
            f"{relaxed['tokens_per_s']:.1f} vs lossless {before['tokens_per_s']:.1f} tokens/s ({progress.line()})")
    return True


def figures(pairs: list[dict]) -> dict:
    """Per concurrency and point: the tokens/s ratio of each repeat to the lossless arm just
    before it, with its median and range (from the pairs measured so far)."""
    out = {}
    for pair in pairs:
        table = out.setdefault(str(pair["concurrency"]), {"items": pair["items"], "lossless_tokens_per_s": [],
                                                          "points": {}})
        table["lossless_tokens_per_s"].append(pair["lossless"]["tokens_per_s"])
        table["points"].setdefault(point_key(pair["rule"], pair["knob"]), {"runs": []})["runs"].append(pair)
    for table in out.values():
        for point in table["points"].values():
            ratios = [run["ratio"] for run in point["runs"]]
            point.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return out


def main(argv=None) -> int:
    from benchmarks.chat_meaning import BENCHMARK_HEAD
    from benchmarks.runner import head_digest
    from selfjudge_vllm.server_process import Server, exit_cleanly_on_sigterm, free_port, serve_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, help="`selfjudge testbed --model qwen-coder` folder")
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead (a check that it runs)")
    parser.add_argument("--head", type=Path, default=BENCHMARK_HEAD, help="judge head (default: the chat benchmark's)")
    parser.add_argument("--points", type=parse_points, required=True, help="RULE=KNOB,... e.g. judge=0.188512,fly=0.3")
    parser.add_argument("--items", type=int, default=16, help="prompts per arm at --concurrency (default 16)")
    parser.add_argument("--batch1-items", type=int, default=2, help="prompts per arm at batch 1 (default 2)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, help="pairs and figures (default: RESULTS/chat_speed/ngram-k8; "
                                                 "a new temporary folder with --tiny)")
    parser.add_argument("--max-minutes", type=float,
                        help="start no new pair after this many minutes of serving (the server's start not counted)")
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    if args.tiny:
        import torch

        from selfjudge_vllm.testing.load import make_requests
        from selfjudge_vllm.testing.tiny_models import build_target_and_draft, write_head

        work = Path(tempfile.mkdtemp(prefix="chat-speed-"))
        target, _ = build_target_and_draft(work / "models")
        head = write_head(work / "head", target, torch.zeros(64), bias=0.0)
        prompts = [(f"tiny/{i}", r["prompt"]) for i, r in enumerate(make_requests(args.items, seed=3))]
        items = [PromptItem(pid, text, args.max_tokens) for pid, text in prompts]
        dtype, max_model_len, out = "float32", 512, args.out or work / "out"
    else:
        if args.testbed is None:
            parser.error("give --testbed (or --tiny)")
        from benchmarks import chat_tasks

        target, head = args.testbed / "target", args.head
        template = chat_tasks.ChatTemplate(target)
        items = [PromptItem(pid, template([{"role": "user", "content": text}]), args.max_tokens)
                 for pid, text in chat_tasks.sharegpt_split("benchmark", args.items)]
        dtype, max_model_len, out = "float32", 4096, args.out or RESULTS / "chat_speed" / "ngram-k8"
    from benchmarks.runner import speculative_config

    spec = speculative_config(("ngram", 8), None)  # the benchmarks' ngram lookup settings
    env = every_core_env()  # the model gets every core on a CPU machine, unless set otherwise
    # What the pairs depend on (the points and repeats only choose which pairs to measure).
    settings = {"target": "tiny" if args.tiny else str(Path(target).resolve()), "server": spec,
                "head": head_digest(Path(head)), "items": [item.id for item in items],
                "batch1_items": args.batch1_items, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                # the server's cores and threading layer (measured: up to 1.7x tokens/s on 2 cores)
                "environment": {k: env.get(k, os.environ.get(k)) for k in EVERY_CORE_ENV}}
    out.mkdir(parents=True, exist_ok=True)
    bound = out / "settings.json"
    if bound.is_file() and json.loads(bound.read_text()) != settings:
        earlier = json.loads(bound.read_text())
        changed = sorted(k for k in settings.keys() | earlier.keys() if settings.get(k) != earlier.get(k))
        print(f"chat_speed: {out} holds pairs measured with other settings ({', '.join(changed)}); "
              "give another --out", file=sys.stderr)
        return 2
    bound.write_text(json.dumps(settings, indent=1) + "\n")
    plan = pair_plan(args.points, [1, args.concurrency], args.repeats)
    pairs_file = out / "pairs.jsonl"
    done = {row["key"] for row in load_jsonl(pairs_file)}
    todo = [pair for pair in plan if pair["key"] not in done]
    log(f"chat_speed: {len(plan) - len(todo)} of {len(plan)} pairs measured earlier, {len(todo)} to measure")
    complete = True
    if todo:
        rules = sorted({r for r, _ in args.points} | {"top_alpha"})
        section = {"head": str(head), "rule": "judge", "request_rules": rules}
        server = Server(serve_command(target, free_port(), spec, {"selfjudge": section}, model_name="target",
                                      dtype=dtype, max_model_len=max_model_len),
                        out / "server.log", startup_timeout=900, env=env)
        serving_since = time.monotonic()  # the sitting's minutes count from here: a slow start still serves a pair

        def out_of_time() -> bool:
            return args.max_minutes is not None and (time.monotonic() - serving_since) / 60 > args.max_minutes

        try:
            complete = measure(server.base, items, todo, args.batch1_items,
                               lambda row: append_jsonl(pairs_file, row), out_of_time)
        finally:
            server.stop()
    measured = {row["key"]: row for row in load_jsonl(pairs_file)}
    table = figures([measured[pair["key"]] for pair in plan if pair["key"] in measured])
    result = {"server": spec, "points": [point_key(r, k) for r, k in args.points], "repeats": args.repeats,
              "max_tokens": args.max_tokens, "complete": complete, "figures": table,
              "date": datetime.date.today().isoformat(),
              "environment": settings["environment"]}
    for concurrency, by_point in table.items():
        for key, point in by_point["points"].items():
            print(f"concurrency {concurrency}: {key} {point['ratio_median']:.3f}x lossless tokens/s "
                  f"(range {point['ratio_min']:.3f}-{point['ratio_max']:.3f}, {len(point['runs'])} repeats)")
    (out / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if complete else 3


if __name__ == "__main__":
    sys.exit(main())
