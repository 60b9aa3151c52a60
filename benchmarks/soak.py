"""Soak: drive a judged `vllm serve` with a mixed workload for a bounded time.

Starts two servers on 127.0.0.1 (the judge, and stock vLLM as the lossless reference),
sends rounds of mixed requests (streaming and not, judged and lossless, greedy and sampled,
some streams dropped by the client) until --duration-s has passed, then prints requests
served, errors, p50/p99 latency, the judge-accepted share of scored draft tokens, and the
lossless-mismatch count (lossless greedy responses that differ from stock vLLM; must be 0).

    python benchmarks/soak.py --duration-s 60                  # tiny random models
    python benchmarks/soak.py --target T --draft D --head H --dtype bfloat16 --duration-s 600
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main(argv=None) -> int:
    from selfjudge_vllm.testing.load import (
        LoadReport,
        Server,
        check_lossless,
        drive,
        free_port,
        lossless_greedy_indices,
        make_requests,
        reference_texts,
        serve_command,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path)
    parser.add_argument("--draft", type=Path)
    parser.add_argument("--head", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--round-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    if args.target is None:
        import torch

        from selfjudge_vllm.testing.tiny_models import build_target_and_draft, write_head

        args.target, args.draft = build_target_and_draft(work / "models")
        weight = torch.randn(64, generator=torch.Generator().manual_seed(0)) / 8
        args.head = write_head(work / "head", args.target, weight, bias=0.0)
    spec = {"method": "draft_model", "model": str(args.draft), "num_speculative_tokens": 4}
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    judge = Server(serve_command(args.target, free_port(), spec, {"selfjudge": {"head": str(args.head)}},
                                 dtype=args.dtype), work / "judge.log", env=env)
    stock = None
    try:
        stock = Server(serve_command(args.target, free_port(), spec, None, dtype=args.dtype),
                       work / "stock.log", env=dict(env, VLLM_PLUGINS="none-of-ours"))
        total = LoadReport()
        deadline = time.monotonic() + args.duration_s
        seed = 0
        while time.monotonic() < deadline:
            requests = make_requests(args.round_size, seed=seed)
            report, texts = asyncio.run(drive(judge.base, requests, args.concurrency))
            reference = asyncio.run(reference_texts(stock.base, requests, lossless_greedy_indices(requests, texts)))
            check_lossless(report, requests, texts, reference)
            for name in ("requests", "served", "dropped_streams", "lossless_greedy_checked", "lossless_mismatches"):
                setattr(total, name, getattr(total, name) + getattr(report, name))
            total.errors += report.errors
            total.latencies_s += report.latencies_s
            seed += 1
            print(f"round {seed}: {total.served} served, {len(total.errors)} errors", file=sys.stderr, flush=True)
        time.sleep(2.5)  # workers publish judge counters once a second
        scored = judge.metric("vllm:spec_decode_selfjudge_draft_tokens_total")
        accepted = judge.metric("vllm:spec_decode_selfjudge_judge_accepted_total")
    finally:
        judge.stop()
        if stock is not None:
            stock.stop()
    figures = {
        "duration_s": args.duration_s, "requests": total.requests, "served": total.served,
        "dropped_streams_by_client": total.dropped_streams, "errors": len(total.errors),
        "latency_p50_s": total.percentile(0.5), "latency_p99_s": total.percentile(0.99),
        "judge_accepted_share": accepted / scored if scored else 0.0,
        "lossless_greedy_checked": total.lossless_greedy_checked,
        "lossless_mismatches": total.lossless_mismatches,
    }
    print(json.dumps(figures, indent=2))
    for error in total.errors[:10]:
        print(error, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if not total.errors and total.lossless_mismatches == 0 else 1


if __name__ == "__main__":
    from selfjudge_vllm.testing.load import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()  # a killed run stops the servers it started
    sys.exit(main())
