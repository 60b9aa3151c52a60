"""What the judge costs inside a vLLM engine step.

One engine, one process, the same prompts, alternating rounds:
  judge:      the head with its threshold (accepts some draft tokens)
  reject-all: the same head with threshold +inf (same computation, accepts nothing)
Per engine step (GPUModelRunner.execute_model + sample_tokens: target forward, verification
and drafting) it records wall time, and separately the time of the judge itself and of
vLLM's RejectionSampler.forward. Prints the step-time ratio of the two modes (measured side
by side in one run) and the judge's time as a share of the step and of rejection sampling.

    python benchmarks/judge_cost.py                    # tiny random models, built locally
    python benchmarks/judge_cost.py --target T --draft D --head H --rounds 6

CPU timings (torch runs synchronously there). Instrumentation wraps methods in this
process only; it is not part of the plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # instrument in-process
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

PROMPTS = [
    "def fibonacci(n):\n    ",
    "The capital of France is",
    "Once upon a time, in a small village,",
    "import numpy as np\n\ndef normalize(x):\n",
    "Question: what is 12 plus 30?\nAnswer:",
    "The three primary colours are",
    "for i in range(10):\n    print(",
    "A haiku about the sea:\n",
]


class Timers:
    def __init__(self):
        self.mode = None
        self.samples: dict[str, dict[str, list[float]]] = {}

    def add(self, what: str, seconds: float) -> None:
        if self.mode is not None:
            self.samples.setdefault(self.mode, {}).setdefault(what, []).append(seconds)


def _timed(timers: Timers, what: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers.add(what, time.perf_counter() - start)

    return wrapper


def instrument(timers: Timers) -> None:
    """Time whole engine steps and vLLM's rejection sampler (class level, this process)."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    step_start = {}
    execute, sample = GPUModelRunner.execute_model, GPUModelRunner.sample_tokens

    def execute_model(self, *args, **kwargs):
        step_start["t"] = time.perf_counter()
        return execute(self, *args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        try:
            return sample(self, *args, **kwargs)
        finally:
            if "t" in step_start:
                timers.add("step", time.perf_counter() - step_start.pop("t"))

    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    RejectionSampler.forward = _timed(timers, "rejection_sampler", RejectionSampler.forward)


def _judge_timer(timers: Timers):
    """A function for collective_rpc: in the worker (this process, single-process mode),
    time every runtime.judge_ call; returns the server's threshold logit."""

    def install(worker):
        runtime = worker.model_runner._selfjudge_runtime
        runtime.judge_ = _timed(timers, "judge", runtime.judge_)
        return runtime.default_rule.knob

    return install


def _set_threshold(worker, threshold_logit):
    from selfjudge_vllm.rules import JUDGE, RowRule

    runtime = worker.model_runner._selfjudge_runtime
    runtime.default_rule, runtime.request_rule = RowRule(JUDGE, threshold_logit), None


def _tiny_setup(root: Path):
    import torch

    from selfjudge_vllm.testing.tiny_models import build_target_and_draft, write_head

    target, draft = build_target_and_draft(root / "models")
    weight = torch.randn(64, generator=torch.Generator().manual_seed(0)) / 8
    head = write_head(root / "head", target, weight, bias=0.0)
    return target, draft, head


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, help="target model dir (default: tiny random)")
    parser.add_argument("--draft", type=Path, help="draft model dir")
    parser.add_argument("--head", type=Path, help="judge artifact dir")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode, alternating")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--engine-args", type=json.loads, default={},
        help='extra LLM() arguments as JSON, e.g. \'{"disable_hybrid_kv_cache_manager": true}\' '
        "(needed for a layer-truncated Gemma 3 draft, whose layers span two KV cache groups)",
    )
    args = parser.parse_args(argv)

    if args.target is None:
        target, draft, head = _tiny_setup(Path(tempfile.mkdtemp(prefix="judge-cost-")))
        dtype = "float32"
    else:
        if args.draft is None or args.head is None:
            parser.error("--target needs --draft and --head")
        target, draft, head, dtype = args.target, args.draft, args.head, args.dtype

    from vllm import LLM, SamplingParams

    timers = Timers()
    instrument(timers)
    llm = LLM(
        model=str(target),
        dtype=dtype,
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        max_num_seqs=args.batch,
        speculative_config={
            "method": "draft_model",
            "model": str(draft),
            "num_speculative_tokens": args.num_speculative_tokens,
        },
        additional_config={"selfjudge": {"head": str(head), "log_interval_s": 0}},
        **args.engine_args,
    )
    threshold_logit = llm.collective_rpc(_judge_timer(timers))[0]
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[: args.batch]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up, not recorded

    modes = {"judge": threshold_logit, "reject-all": float("inf")}
    for round_index in range(args.rounds):
        for mode, limit in modes.items():
            llm.collective_rpc(_set_threshold, args=(limit,))
            timers.mode = mode
            llm.generate(prompts, params, use_tqdm=False)
            timers.mode = None
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    figures = {}
    for mode in modes:
        s = timers.samples[mode]
        figures[mode] = {
            "steps": len(s["step"]),
            "step_ms_median": 1e3 * statistics.median(s["step"]),
            "step_ms_mean": 1e3 * statistics.fmean(s["step"]),
            "rejection_sampler_ms_mean": 1e3 * statistics.fmean(s["rejection_sampler"]),
            "judge_ms_mean": 1e3 * statistics.fmean(s["judge"]),
            "judge_share_of_step": sum(s["judge"]) / sum(s["step"]),
            "judge_share_of_rejection_sampler": sum(s["judge"]) / sum(s["rejection_sampler"]),
        }
    j, r = figures["judge"], figures["reject-all"]
    figures["step_time_ratio_judge_over_reject_all"] = j["step_ms_median"] / r["step_ms_median"]
    figures["setup"] = {
        "target": str(target), "draft": str(draft), "head": str(head), "batch": args.batch,
        "num_speculative_tokens": args.num_speculative_tokens, "max_tokens": args.max_tokens,
        "rounds": args.rounds,
    }

    print(f"\nmodel {target}, batch {args.batch} x {args.num_speculative_tokens} drafts, "
          f"{args.rounds} rounds per mode")
    print(f"{'mode':<12}{'steps':>7}{'step ms (median)':>18}{'rej. sampler ms':>17}"
          f"{'judge ms':>10}{'judge/step':>12}{'judge/rej.':>12}")
    for mode in modes:
        f = figures[mode]
        print(f"{mode:<12}{f['steps']:>7}{f['step_ms_median']:>18.3f}"
              f"{f['rejection_sampler_ms_mean']:>17.3f}{f['judge_ms_mean']:>10.3f}"
              f"{100 * f['judge_share_of_step']:>11.2f}%"
              f"{100 * f['judge_share_of_rejection_sampler']:>11.2f}%")
    print(f"step time ratio judge / reject-all (median): "
          f"{figures['step_time_ratio_judge_over_reject_all']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
