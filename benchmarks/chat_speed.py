"""Speed as users see it (issue 42, item 5): tokens/s of relaxed points against lossless,
measured in one sitting on one server, interleaved (lossless, relaxed A, lossless, relaxed B,
...), at batch 1 and at --concurrency requests in flight, repeated, with the spread over the
repeats. Acceptance alone is not speed: this prints what a client sees.

Each arm serves the same prompts (the chat benchmark's, held out from everything a judge
trained on), greedy, lossless or through per-request control; the ratio of each repeat is
relaxed over the lossless arm served just before it, so slow drifts of the machine cancel.

    python benchmarks/chat_speed.py --testbed testbed-qwen --points judge=0.188512,fly=0.3 --repeats 3
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from selfjudge_vllm.measurement import (  # noqa: E402
    EVERY_CORE_ENV,
    PromptItem,
    every_core_env,
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
    return points


def arm(base_url: str, items: list[PromptItem], extra: dict, concurrency: int) -> dict:
    """One arm: every item once at `concurrency` in flight; tokens/s over the arm's wall time."""
    results = []
    wall = asyncio.run(run_items(base_url, items, extra, concurrency, lambda item, r: results.append(r)))
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def measure(base_url: str, items: list[PromptItem], points: list[tuple[str, float]], concurrencies: list[int],
            repeats: int, batch1_items: int) -> dict:
    """Per concurrency and point: the tokens/s ratio to the lossless arm just before it, per
    repeat, with its median and range."""
    out = {}
    for concurrency in concurrencies:
        subset = items[:batch1_items] if concurrency == 1 else items
        arm(base_url, subset[:2], request_options("lossless", None), concurrency)  # warm-up, not counted
        runs = {f"{r}-{k:g}": [] for r, k in points}
        lossless = []
        for repeat in range(repeats):
            for rule, knob in points:
                before = arm(base_url, subset, request_options("lossless", None), concurrency)
                relaxed = arm(base_url, subset, request_options(rule, knob), concurrency)
                lossless.append(before["tokens_per_s"])
                runs[f"{rule}-{knob:g}"].append({"lossless": before, "relaxed": relaxed,
                                                 "ratio": relaxed["tokens_per_s"] / before["tokens_per_s"]})
                log(f"  concurrency {concurrency}, repeat {repeat + 1}/{repeats}, {rule} {knob:g}: "
                    f"{relaxed['tokens_per_s']:.1f} vs lossless {before['tokens_per_s']:.1f} tokens/s")
        out[str(concurrency)] = {
            "items": len(subset), "lossless_tokens_per_s": lossless,
            "points": {key: {"runs": rs, "ratio_median": statistics.median(r["ratio"] for r in rs),
                             "ratio_min": min(r["ratio"] for r in rs), "ratio_max": max(r["ratio"] for r in rs)}
                       for key, rs in runs.items()},
        }
    return out


def main(argv=None) -> int:
    from selfjudge_vllm.server_process import Server, exit_cleanly_on_sigterm, free_port, serve_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, help="`selfjudge testbed --model qwen-coder` folder")
    parser.add_argument("--tiny", action="store_true", help="tiny random models instead (a check that it runs)")
    parser.add_argument("--head", type=Path, default=RESULTS / "chat_judge" / "head")
    parser.add_argument("--points", type=parse_points, required=True, help="RULE=KNOB,... e.g. judge=0.188512,fly=0.3")
    parser.add_argument("--items", type=int, default=16, help="prompts per arm at --concurrency (default 16)")
    parser.add_argument("--batch1-items", type=int, default=2, help="prompts per arm at batch 1 (default 2)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, help="where to write the figures")
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
        dtype, max_model_len = "float32", 512
    else:
        if args.testbed is None:
            parser.error("give --testbed (or --tiny)")
        from benchmarks import chat_tasks

        target, head = args.testbed / "target", args.head
        template = chat_tasks.ChatTemplate(target)
        items = [PromptItem(pid, template([{"role": "user", "content": text}]), args.max_tokens)
                 for pid, text in chat_tasks.sharegpt_split("benchmark", args.items)]
        dtype, max_model_len = "float32", 4096
    from benchmarks.runner import speculative_config

    spec = speculative_config(("ngram", 8), None)  # the benchmarks' ngram lookup settings
    rules = sorted({r for r, _ in args.points} | {"top_alpha"})
    section = {"head": str(head), "rule": "judge", "request_rules": rules}
    env = every_core_env()  # the model gets every core on a CPU machine, unless set otherwise
    log_path = Path(tempfile.mkdtemp(prefix="chat-speed-log-")) / "server.log"
    server = Server(serve_command(target, free_port(), spec, {"selfjudge": section}, model_name="target", dtype=dtype,
                                  max_model_len=max_model_len), log_path, startup_timeout=900, env=env)
    try:
        figures = measure(server.base, items, args.points, [1, args.concurrency], args.repeats, args.batch1_items)
    finally:
        server.stop()
    result = {"server": spec, "points": [f"{r}-{k:g}" for r, k in args.points], "repeats": args.repeats,
              "max_tokens": args.max_tokens, "figures": figures, "date": datetime.date.today().isoformat(),
              "environment": {k: env.get(k, os.environ.get(k)) for k in EVERY_CORE_ENV}}
    for concurrency, table in figures.items():
        for key, point in table["points"].items():
            print(f"concurrency {concurrency}: {key} {point['ratio_median']:.3f}x lossless tokens/s "
                  f"(range {point['ratio_min']:.3f}-{point['ratio_max']:.3f}, {args.repeats} repeats)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
