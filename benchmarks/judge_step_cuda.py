"""The judge step on CUDA at serving sizes (torch level; vLLM is not needed).

Times `JudgeRuntime.judge_` (feature gather, dot product, -inf check, one scatter per row,
device counters) with CUDA events at e.g. 256 requests x 8 draft tokens, hidden 4096,
vocabulary 128,256 (Llama 3 8B sizes), and compares it with a torch proxy of the work vLLM's
RejectionSampler does on the same rows before its kernels run (gather target rows, cast to
float32, clone; greedy: argmax; random: temperature + softmax). Also:
  - runs the judge under torch.cuda.set_sync_debug_mode("error"): any host sync raises;
  - checks the device's decisions against a float64 CPU computation;
  - reports achieved memory bandwidth of the judge step.

    python benchmarks/judge_step_cuda.py [--requests 256 --drafts 8 --hidden 4096 --vocab 128256]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from selfjudge_vllm.rules import JUDGE, JudgeHead, RowRule
from selfjudge_vllm.runtime import JudgeRuntime

# Peak HBM bandwidth by device name (vendor figures), for the achieved/peak ratio.
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}


def _peak(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def _time(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs, CUDA events."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--drafts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("judge_step_cuda: no CUDA device", file=sys.stderr)
        return 2

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    n_drafts = args.requests * args.drafts
    n_rows = n_drafts + args.requests  # target rows + one bonus row per request
    hidden = torch.randn(n_rows, args.hidden, device=device, dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(n_rows, args.vocab, device=device, dtype=torch.bfloat16, generator=gen)
    # vLLM's layout: request r's rows are [r*(k+1), ..., r*(k+1)+k-1] then its bonus row.
    per_request = torch.arange(args.drafts, device=device)
    target_idx = (torch.arange(args.requests, device=device)[:, None] * (args.drafts + 1)
                  + per_request).flatten()
    drafts = torch.randint(0, args.vocab, (n_drafts,), device=device, generator=gen).int()
    weight = torch.randn(args.hidden, device=device, generator=gen) / args.hidden**0.5
    runtime = JudgeRuntime(JudgeHead(weight, torch.zeros(1, device=device)), None, 0, RowRule(JUDGE, 0.0))

    processed = logits[target_idx].float()  # what vLLM hands to rejection_sample

    def judge_step():
        runtime.begin_step(hidden, drafts, target_idx)
        runtime.judge_(drafts, processed)
        runtime.end_step()

    def verify_greedy_proxy():
        rows = logits[target_idx].to(torch.float32).clone()
        rows.argmax(dim=-1)

    def verify_random_proxy():
        rows = logits[target_idx].to(torch.float32).clone()
        rows.div_(0.8).softmax(dim=-1)

    for fn in (judge_step, verify_greedy_proxy, verify_random_proxy):
        fn()
    torch.cuda.synchronize()

    # No host synchronisation on the judge's path.
    torch.cuda.set_sync_debug_mode("error")
    try:
        judge_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # Decisions equal a float64 CPU computation (on rows away from the threshold).
    fresh = logits[target_idx].float()
    runtime.begin_step(hidden, drafts, target_idx)
    runtime.judge_(drafts, fresh)
    runtime.end_step()
    got = (fresh.gather(1, drafts.long()[:, None]).squeeze(1) == 1e30).cpu()
    scores = hidden[target_idx + 1].double().cpu() @ weight.double().cpu()
    clear = scores.abs() > 1e-3
    mismatches = int((got[clear] != (scores[clear] >= 0)).sum())

    judge_ms = _time(judge_step, args.repeats)
    greedy_ms = _time(verify_greedy_proxy, args.repeats)
    random_ms = _time(verify_random_proxy, args.repeats)
    # Bytes the judge moves: feature rows (bf16) + weight + gathered/scattered logits.
    judge_bytes = n_drafts * args.hidden * 2 + args.hidden * 4 + n_drafts * 4 * 3
    bandwidth = judge_bytes / (judge_ms * 1e-3)
    name = torch.cuda.get_device_name()
    peak = _peak(name)
    figures = {
        "device": name,
        "requests": args.requests, "drafts": args.drafts, "hidden": args.hidden,
        "vocab": args.vocab,
        "judge_ms": judge_ms,
        "verify_greedy_proxy_ms": greedy_ms,
        "verify_random_proxy_ms": random_ms,
        "judge_share_of_greedy_verify": judge_ms / greedy_ms,
        "judge_share_of_random_verify": judge_ms / random_ms,
        "judge_bandwidth_GBps": bandwidth / 1e9,
        "judge_bandwidth_share_of_peak": (bandwidth / peak) if peak else None,
        "decision_mismatches_vs_cpu_float64": mismatches,
        "decisions_checked": int(clear.sum()),
        "host_syncs_in_judge_step": 0,  # set_sync_debug_mode("error") would have raised
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
