"""The judge step on CUDA at serving sizes (torch level; vLLM is not needed).

Times the judge's step (`JudgeRuntime.begin_step/judge_/end_step`: features, head, -inf
check, one scatter per row, device counters) with CUDA events at e.g. 256 requests x 8 draft
tokens, hidden 4096, vocabulary 128,256 (Llama 3 8B sizes), for each head kind (hidden only,
logit features only, both) and for a mixed step (requests split over judge, top_alpha,
entropy and lossless), and compares it with a torch proxy of the work vLLM's RejectionSampler
does on the same rows before its kernels run (gather target rows, cast to float32, clone;
greedy: argmax; random: temperature + softmax). Also, per step kind:
  - runs it under torch.cuda.set_sync_debug_mode("error"): any host sync raises;
  - its peak device memory beyond the tensors it is handed;
  - the judge's decisions against a float64 CPU computation of the head's score.

    python benchmarks/judge_step_cuda.py [--requests 256 --drafts 8 --hidden 4096 --vocab 128256]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch

from selfjudge_vllm.features import LOGIT_FEATURES, evidence_from_logits
from selfjudge_vllm.rules import ENTROPY, FORCED_LOGIT, JUDGE, LOSSLESS, JudgeHead, RowRule
from selfjudge_vllm.runtime import JudgeRuntime, RequestRuleTable

# Peak HBM bandwidth by device name (vendor figures), for the achieved/peak ratio.
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}


def _peak(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def _time(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs, CUDA events (wall clock on CPU)."""
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
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
    parser.add_argument("--cpu-check", action="store_true",
                        help="no CUDA device: run the decision checks on the CPU (no sync or memory figures)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_check:
        print("judge_step_cuda: no CUDA device (--cpu-check runs the decision checks on the CPU)", file=sys.stderr)
        return 2

    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    n_drafts = args.requests * args.drafts
    n_rows = n_drafts + args.requests  # target rows + one bonus row per request
    hidden = torch.randn(n_rows, args.hidden, device=device, dtype=torch.bfloat16, generator=gen)
    logits = (torch.randn(n_rows, args.vocab, device=device, generator=gen) * 3).to(torch.bfloat16)
    # vLLM's layout: request r's rows are [r*(k+1), ..., r*(k+1)+k-1] then its bonus row.
    per_request = torch.arange(args.drafts, device=device)
    target_idx = (torch.arange(args.requests, device=device)[:, None] * (args.drafts + 1)
                  + per_request).flatten()
    drafts = torch.randint(0, args.vocab, (n_drafts,), device=device, generator=gen).int()
    weight = torch.randn(args.hidden, device=device, generator=gen) / args.hidden**0.5
    scalar_weight = torch.tensor([1.0, 0.5, 1.5], device=device)
    heads = {
        "hidden": JudgeHead(weight, torch.zeros(1, device=device)),
        "logits": JudgeHead(None, torch.zeros(1, device=device), scalar_weight, LOGIT_FEATURES),
        "both": JudgeHead(weight, torch.zeros(1, device=device), scalar_weight, LOGIT_FEATURES),
    }
    for head in heads.values():  # bias at the median score: decisions on both sides get checked
        head.bias = -reference_scores(head, hidden, logits, target_idx, drafts).median().float().to(device)
    # A mixed step: the requests split evenly over judge (both features), top_alpha, entropy
    # and lossless, in an interleaved order.
    mixed_rules = [RowRule(JUDGE, 0.0), RowRule.top_alpha(0.3), RowRule(ENTROPY, 2.0), LOSSLESS]
    mixed_rows = [(mixed_rules[r % len(mixed_rules)], args.drafts) for r in range(args.requests)]

    def step_fn(head, rules_of_step):
        runtime = JudgeRuntime(head, None, 0, RowRule(JUDGE, 0.0))

        def judge_step(target_logits):
            runtime.begin_step(hidden, drafts, target_idx, rules_of_step(), logits=logits)
            # Forced entries stay forced (the decision check reads them); the adapters write
            # them back with runtime.unforce_() once vLLM's verification has read them.
            runtime.judge_(drafts, target_logits)
            runtime.end_step()

        return judge_step

    def uniform_judge():
        return None  # JudgeRuntime's default rule: judge at threshold logit 0 for every row

    steps = {f"judge_{name}": step_fn(head, uniform_judge) for name, head in heads.items()}
    # The serving path: rules in the persistent request table, one staged copy per step.
    table = RequestRuleTable(device)
    mixed_ids = [f"request-{r}" for r in range(len(mixed_rows))]
    for req_id, (rule, _) in zip(mixed_ids, mixed_rows):
        table.set(req_id, rule)
    mixed_counts = [count for _, count in mixed_rows]
    steps["mixed_4_rules"] = step_fn(heads["both"], lambda: table.step(mixed_ids, mixed_counts))

    def verify_greedy_proxy():
        rows = logits[target_idx].to(torch.float32).clone()
        rows.argmax(dim=-1)

    def verify_random_proxy():
        rows = logits[target_idx].to(torch.float32).clone()
        rows.div_(0.8).softmax(dim=-1)

    processed = logits[target_idx].float()  # what vLLM hands to rejection_sample
    figures = {"device": torch.cuda.get_device_name() if cuda else "cpu (decision check only)",
               "requests": args.requests, "drafts": args.drafts,
               "hidden": args.hidden, "vocab": args.vocab, "steps": {}}
    greedy_ms = _time(verify_greedy_proxy, args.repeats)
    random_ms = _time(verify_random_proxy, args.repeats)
    figures["verify_greedy_proxy_ms"] = greedy_ms
    figures["verify_random_proxy_ms"] = random_ms
    failures = 0
    for name, judge_step in steps.items():
        work = processed.clone()
        judge_step(work)
        ms = _time(functools.partial(judge_step, work), args.repeats)
        entry = {"ms": ms, "share_of_greedy_verify": ms / greedy_ms, "share_of_random_verify": ms / random_ms}
        if cuda:
            entry.update(device_checks(functools.partial(judge_step, work)))
        if name.startswith("judge_"):
            head = heads[name.removeprefix("judge_")]
            fresh = processed.clone()
            judge_step(fresh)
            got = (fresh.gather(1, drafts.long()[:, None]).squeeze(1) == FORCED_LOGIT).cpu()
            scores = reference_scores(head, hidden, logits, target_idx, drafts)
            clear = scores.abs() > 1e-3
            entry["decision_mismatches_vs_cpu_float64"] = int((got[clear] != (scores[clear] >= 0)).sum())
            entry["decisions_checked"] = int(clear.sum())
            entry["accepted_share"] = float(got.float().mean())
            failures += entry["decision_mismatches_vs_cpu_float64"]
        figures["steps"][name] = entry
    # The evidence reduction alone (the one vocabulary-wide pass the logit features need).
    figures["logit_evidence_ms"] = _time(lambda: evidence_from_logits(logits, target_idx, drafts), args.repeats)
    # Bytes the hidden-only judge moves: feature rows (bf16) + weight + gathered/scattered logits.
    judge_bytes = n_drafts * args.hidden * 2 + args.hidden * 4 + n_drafts * 4 * 3
    bandwidth = judge_bytes / (figures["steps"]["judge_hidden"]["ms"] * 1e-3)
    peak = _peak(figures["device"])
    figures["judge_hidden_bandwidth_GBps"] = bandwidth / 1e9
    figures["judge_hidden_bandwidth_share_of_peak"] = (bandwidth / peak) if peak else None
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if failures == 0 else 1


def device_checks(judge_step) -> dict:
    """Host syncs (none: set_sync_debug_mode("error") raises on one) and the step's peak
    device memory beyond the tensors it is handed. The mixed step's rule tensors are built on
    the host before the step, as the adapter does, so they are outside the checked region."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        judge_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    judge_step()
    torch.cuda.synchronize()
    return {"host_syncs": 0, "peak_extra_memory_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20}


_LOGPROBS: dict[int, torch.Tensor] = {}


def _cpu_logprobs(logits: torch.Tensor) -> torch.Tensor:
    if id(logits) not in _LOGPROBS:
        _LOGPROBS[id(logits)] = torch.log_softmax(logits.double().cpu(), -1)
    return _LOGPROBS[id(logits)]


def reference_scores(head, hidden, logits, target_idx, drafts) -> torch.Tensor:
    """The head's score of every draft row in float64 on the CPU, from the definitions (an
    independent computation of features.py's logit features)."""
    rows = target_idx.cpu()
    score = head.bias.double().cpu().expand(len(rows)).clone()
    if head.weight is not None:
        score += hidden[rows + 1].double().cpu() @ head.weight.double().cpu()
    if head.logit_features:
        logprobs = _cpu_logprobs(logits)
        top1 = logprobs.max(-1).values
        values = {"draft_logratio": logprobs[rows, drafts.long().cpu()] - top1[rows],
                  "verify_confidence": top1[rows], "next_confidence": top1[rows + 1]}
        for name, w in zip(head.logit_features, head.scalar_weight.double().cpu()):
            score += w * values[name]
    return score


if __name__ == "__main__":
    sys.exit(main())
