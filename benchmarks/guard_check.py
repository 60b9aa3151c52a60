"""Guarded serving on a real pair: what the guard costs users, and whether it reports the
change rate the benchmark measured.

    cost  users' tokens/s with the guard off, on (sample_share, action report), and off again,
          one server at a time on the same items (A, B, A': A against A' shows the drift);
          each arm's wall time runs until its last shadow has finished, so the guard's extra
          generations are counted against it
    rate  every comparable request shadowed (sample_share 1.0): the guard's reported text and
          answer change rates and its anytime-valid bounds, beside the rate the benchmark
          measured for the same point on the same items (its store: relaxed vs lossless texts)

    python benchmarks/guard_check.py                      # tiny random models, a smoke run
    python benchmarks/guard_check.py --testbed testbed-qwen --head benchmarks/results/chat_judge/head \\
        --threshold 0.188512 --items 100 --json benchmarks/results/guard_check_qwen_ngram8.json

Every arm's responses are written to --work as they complete; the figures are printed and
written to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from benchmarks.runner import speculative_config  # noqa: E402
from selfjudge_vllm.measurement import Progress, PromptItem, append_jsonl, log, run_items  # noqa: E402
from selfjudge_vllm.server_process import Server, exit_cleanly_on_sigterm, free_port, parse_metric, serve_command  # noqa: E402


def guard_metrics(server) -> dict:
    text = server.get("/metrics")
    out = {}
    for name in ("shadows_sampled_total", "shadows_compared_total", "shadows_skipped_total",
                 "shadows_abandoned_total", "shadows_failed_total", "text_changed_total", "answer_changed_total",
                 "change_rate_lower", "change_rate_upper", "change_rate_fallback_bound", "shadows_in_flight",
                 "shadows_pending"):
        try:
            out[name] = parse_metric(text, f"vllm:selfjudge_guard_{name}")
        except KeyError:
            out[name] = None
    return out


def serve_arm(args, name: str, guard: dict | None, items: list[PromptItem]) -> dict:
    """One arm on its own server; its summary is kept in --work, so a rerun after a kill
    serves only the arms not yet finished (an arm is timed whole, so it is the unit)."""
    summary_path = args.work / f"{name}.summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("guard") == guard and summary.get("item_ids") == [i.id for i in items]:
            log(f"{name}: finished in an earlier sitting, kept")
            return summary
    section = {"head": str(args.head), "threshold": args.threshold} if args.head else {"rule": "top_alpha",
                                                                                       "alpha": args.alpha}
    if guard:
        section["guard"] = guard
    command = serve_command(args.target, free_port(), args.speculative_config, {"selfjudge": section},
                            model_name="target", dtype=args.dtype, max_model_len=args.max_model_len)
    log(f"{name}: starting the server")
    server = Server(command, args.work / f"server-{name}.log", startup_timeout=900,
                    env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "NUMBA_THREADING_LAYER": "workqueue"})
    try:
        out_path = args.work / f"{name}.jsonl"
        out_path.unlink(missing_ok=True)
        tokens, progress = [0], Progress(len(items))

        def on_done(item, result):
            tokens[0] += result["tokens"]
            append_jsonl(out_path, {"id": item.id, **result})
            progress.tick(label=name)

        start = time.monotonic()
        asyncio.run(run_items(server.base, items, None, args.concurrency, on_done))
        users_done = time.monotonic() - start
        metrics = guard_metrics(server) if guard else {}
        while guard and (metrics.get("shadows_pending") or 0) > 0:  # the shadows' work counts against the arm
            time.sleep(0.5)
            metrics = guard_metrics(server)
        wall = time.monotonic() - start
        summary = {"arm": name, "items": len(items), "user_tokens": tokens[0], "users_done_s": users_done,
                   "wall_s": wall, "user_tokens_per_s": tokens[0] / wall, "guard": guard, "metrics": metrics,
                   "item_ids": [i.id for i in items]}
        summary_path.write_text(json.dumps(summary))
        return summary
    finally:
        server.stop()


def benchmark_rate(args, ids: list[str]) -> dict | None:
    """The benchmark's paired change rates for the served point on these items, from its store."""
    if not args.store:
        return None
    from selfjudge_vllm.answers import numeric_answer
    from selfjudge_vllm.measurement import RequestStore

    store = RequestStore(args.store)
    relaxed, lossless = store.done(args.store_point), store.done(args.store_lossless)
    common = [i for i in ids if i in relaxed and i in lossless]
    if not common:
        return None
    text = sum(relaxed[i]["text"] != lossless[i]["text"] for i in common)
    answer = sum(numeric_answer(relaxed[i]["text"]) != numeric_answer(lossless[i]["text"]) for i in common)
    return {"point": args.store_point, "n": len(common), "text_change_rate": text / len(common),
            "answer_change_rate": answer / len(common)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, help="`selfjudge testbed --model qwen-coder` folder (default: tiny "
                        "random models)")
    parser.add_argument("--head", type=Path, help="judge artifact (default: top_alpha, no head)")
    parser.add_argument("--threshold", type=float, default=0.188512, help="the served judge point")
    parser.add_argument("--alpha", type=float, default=0.3, help="without --head: the served top_alpha")
    parser.add_argument("--items", type=int, default=100, help="GSM8K items (after the judge's training slice)")
    parser.add_argument("--parts", default="cost,rate")
    parser.add_argument("--sample-share", type=float, default=0.05, help="the cost arm's share")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=ROOT / "bench_work/guard_check")
    parser.add_argument("--store", type=Path, default=ROOT / "benchmarks/results/chat_tradeoff_store")
    parser.add_argument("--store-point", default="ngram-k8/judge-0.188512")
    parser.add_argument("--store-lossless", default="ngram-k8/lossless")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.speculative_config = speculative_config(("ngram", 8), None)  # the benchmark's ngram k=8 server
    if args.testbed:
        from benchmarks import chat_tasks

        args.target, args.dtype = str(args.testbed / "target"), "float32"
        template = chat_tasks.ChatTemplate(args.testbed / "target")
        items = [PromptItem(i.id, i.prompt, i.max_tokens, i.stop)
                 for i in chat_tasks.eval_items(template, families=("gsm8k",))[: args.items]]
    else:
        import torch

        from selfjudge_vllm.testing.load import make_requests
        from selfjudge_vllm.testing.tiny_models import build_target_and_draft, write_head

        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # tiny models need little
        models = Path(tempfile.mkdtemp(prefix="guard-check-"))
        target, _ = build_target_and_draft(models)
        args.target, args.dtype, args.store = str(target), "float32", None
        args.head = write_head(models / "head", target, torch.zeros(64), bias=0.5) if args.head is None else args.head
        args.threshold, args.max_model_len = 0.5, 256
        items = [PromptItem(f"t{i}", r["prompt"], 24) for i, r in enumerate(make_requests(args.items, seed=7))]
    report = {"target": args.target, "speculative_config": args.speculative_config, "items": len(items),
              "served_point": f"judge {args.threshold}" if args.head else f"top_alpha {args.alpha}"}
    parts = set(args.parts.split(","))
    budget = 0.5  # the guard only reports here; a budget is required, and none is tested
    if "cost" in parts:
        guard = {"sample_share": args.sample_share, "budget": budget, "action": "report", "seed": 0}
        arms = [serve_arm(args, "off", None, items), serve_arm(args, "on", guard, items),
                serve_arm(args, "off_again", None, items)]
        off = (arms[0]["user_tokens_per_s"] + arms[2]["user_tokens_per_s"]) / 2
        report["cost"] = {"arms": arms, "on_vs_off": arms[1]["user_tokens_per_s"] / off,
                          "drift_off_again_vs_off": arms[2]["user_tokens_per_s"] / arms[0]["user_tokens_per_s"]}
        log(f"cost: users' tokens/s off {arms[0]['user_tokens_per_s']:.2f}, on ({args.sample_share:g}) "
            f"{arms[1]['user_tokens_per_s']:.2f}, off again {arms[2]['user_tokens_per_s']:.2f}: on/off "
            f"{report['cost']['on_vs_off']:.3f}")
    if "rate" in parts:
        guard = {"sample_share": 1.0, "budget": budget, "action": "report", "measure": "answer",
                 "max_in_flight": args.concurrency}
        arm = serve_arm(args, "rate", guard, items)
        m = arm["metrics"]
        compared = m["shadows_compared_total"] or 0
        report["rate"] = {"arm": arm, "guard_text_change_rate": (m["text_changed_total"] or 0) / compared
                          if compared else None,
                          "guard_answer_change_rate": (m["answer_changed_total"] or 0) / compared if compared else None,
                          "guard_bounds": [m["change_rate_lower"], m["change_rate_upper"]],
                          "benchmark": benchmark_rate(args, [i.id for i in items])}
        log(f"rate: guard compared {compared:.0f}, text {report['rate']['guard_text_change_rate']}, answer "
            f"{report['rate']['guard_answer_change_rate']} (bounds {report['rate']['guard_bounds']}); "
            f"benchmark {report['rate']['benchmark']}")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    exit_cleanly_on_sigterm()
    sys.exit(main())
