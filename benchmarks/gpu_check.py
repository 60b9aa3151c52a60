"""The plugin in a vLLM 0.34 engine on a GPU (model runner V2), in one command.

Run it on a machine with an NVIDIA GPU and vLLM 0.34.0 (`pip install -e ".[gpu]"`); it loads
a small public instruct model (default Qwen/Qwen2.5-0.5B-Instruct, downloaded by vLLM) with
n-gram speculative decoding, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so its probes
see the worker), and takes a few minutes:

    python benchmarks/gpu_check.py [--model M] [--out gpu_check.json]

It asserts:
  config     async scheduling and CUDA graphs are on, and model runner V2's `sample` is wrapped;
  preempt    every request opted out, a KV cache small enough to preempt: zero drafts forced,
             and the output equals a lossless engine's (preempted requests resumed correctly);
  accept     accept-all: vLLM's accepted-token count is at least the number of drafts forced;
  mixed      in a batch with half the requests opted out, those equal the lossless run;
  hidden     the hidden rows kept for each verification chunk give the logits' argmax;
  syncs      the judge's work in every chunk ran under torch.cuda.set_sync_debug_mode("error");
  float16    float16 at temperature 1.0 (vLLM verifies the model's own tensor): accept-all
             accepts (nearly) every draft.
and prints one line per check, writes them to --out, exits non-zero on a failure.

Not run in this project's workplace: vLLM is not installed on the lent GPU machines and its
wheel is too large to carry there (docs/vllm-integration.md). The parts that need no GPU and
no vLLM (arguments, the engines' settings, reading vLLM's counters, comparing outputs, the
report, the probes' bookkeeping) are unit-tested on CPU: tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

OPT_OUT = {"selfjudge_enabled": False}
ACCEPT_ALL = {"rule": "top_alpha", "alpha": 0.0, "min_alpha": 0.0,
              # No engine had run the plugin on 0.34 when this script was written.
              "allow_unsupported_vllm": True}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="a small public instruct model")
    parser.add_argument("--prompts", type=int, default=16, help="requests per engine run")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens (n-gram)")
    parser.add_argument("--preempt-blocks", type=int, default=48,
                        help="num_gpu_blocks_override of the preemption run (16-token blocks; it needs 32 for "
                             "one 512-token request, and the requests need far more together)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    return parser.parse_args(argv)


def prompts(n: int) -> list[str]:
    """Prompts whose answers repeat their own text, so n-gram drafting has drafts to verify."""
    subjects = ["the water cycle", "binary search", "photosynthesis", "a hash table", "the French revolution",
                "TCP handshakes", "compound interest", "plate tectonics"]
    return [f"Write the sentence '{subjects[i % len(subjects)]} explained in steps' three times, then explain "
            f"{subjects[i % len(subjects)]} in numbered steps (request {i})." for i in range(n)]


def engine_kwargs(args: argparse.Namespace, selfjudge: dict | None, **overrides) -> dict:
    """LLM(...) arguments of one run: n-gram speculative decoding, CUDA graphs and async
    scheduling on, the judge's section (None: the plugin off, the lossless reference)."""
    kwargs = dict(model=args.model, seed=0, max_model_len=1024, enforce_eager=False, async_scheduling=True,
                  speculative_config={"method": "ngram", "num_speculative_tokens": args.k,
                                      "prompt_lookup_min": 2, "prompt_lookup_max": 4},
                  additional_config={"selfjudge": selfjudge} if selfjudge is not None else {},
                  disable_log_stats=False, gpu_memory_utilization=0.5)
    kwargs.update(overrides)
    return kwargs


def counter(metrics, name: str) -> int:
    """A counter of llm.get_metrics() (0 when absent)."""
    return int(sum(m.value for m in metrics if m.name == name))


def differing(a: list[list[int]], b: list[list[int]], indices=None) -> list[int]:
    """The requests (of `indices`, default all) whose token ids differ."""
    indices = range(len(a)) if indices is None else indices
    return [i for i in indices if a[i] != b[i]]


@dataclass
class Report:
    checks: list[dict] = field(default_factory=list)

    def check(self, name: str, ok: bool, **detail) -> bool:
        self.checks.append({"check": name, "ok": bool(ok), **detail})
        print(f"{'ok    ' if ok else 'FAILED'} {name}: {json.dumps(detail, default=str)}", flush=True)
        return ok

    @property
    def failed(self) -> list[str]:
        return [c["check"] for c in self.checks if not c["ok"]]

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"checks": self.checks, "failed": self.failed}, indent=2, default=str))


@dataclass
class Probes:
    """Wraps on top of the plugin's, in this process: the runner's model state and the
    judge's runtimes (sample), and per verification chunk (VerifyStep.judge_chunk_) the
    argmax of logits recomputed from the kept hidden rows against vLLM's own logits, and the
    judge's work under torch.cuda.set_sync_debug_mode("error")."""

    model_state: object = None
    runtimes: list = field(default_factory=list)
    chunks: int = 0
    mismatches: list = field(default_factory=list)  # device scalars, read after the run
    sync_errors: list = field(default_factory=list)

    def judge_chunk(self, original):
        def judge_chunk_(step, processed_logits, draft_sampled):
            import torch

            self.chunks += 1
            if step.runtime not in self.runtimes:
                self.runtimes.append(step.runtime)
            lo, hi = step.rows_verified, step.rows_verified + processed_logits.shape[0]
            if step.raw_logits is not None and self.model_state is not None:
                hidden = step.hidden_states.index_select(0, step.logits_indices[lo:hi])
                recomputed = self.model_state.compute_sample_logits(hidden)
                self.mismatches.append((recomputed.argmax(-1) != step.raw_logits[lo:hi].argmax(-1)).sum())
            cuda = processed_logits.is_cuda
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                return original(step, processed_logits, draft_sampled)
            except RuntimeError as exc:
                self.sync_errors.append(str(exc))
                raise
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

        return judge_chunk_

    def sample(self, original):
        def sample(runner, *args, **kwargs):
            self.model_state = runner.model_state
            return original(runner, *args, **kwargs)

        return sample

    def argmax_mismatches(self) -> int:
        return int(sum(int(m) for m in self.mismatches))

    def counters(self):
        """judge counters summed over the runtimes seen (flush reads the device)."""
        from selfjudge_vllm.metrics import JudgeCounters

        total = JudgeCounters()
        for runtime in self.runtimes:
            total.add(runtime.flush())
        return total


def install_probes() -> Probes:
    from vllm.v1.worker.gpu import model_runner

    from selfjudge_vllm import adapter_v2

    probes = Probes()
    adapter_v2.VerifyStep.judge_chunk_ = probes.judge_chunk(adapter_v2.VerifyStep.judge_chunk_)
    model_runner.GPUModelRunner.sample = probes.sample(model_runner.GPUModelRunner.sample)
    return probes


def generate(args, selfjudge, sampling: dict, options=None, **overrides):
    """One engine: (token ids per request, vLLM's metrics, the engine's config)."""
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args, selfjudge, **overrides))
    try:
        texts = prompts(args.prompts)
        params = [SamplingParams(max_tokens=args.max_tokens, seed=i, extra_args=(options or {}).get(i), **sampling)
                  for i in range(len(texts))]
        outputs = llm.generate(texts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], llm.get_metrics(), llm.llm_engine.vllm_config
    finally:
        del llm
        gc.collect()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    started = time.monotonic()
    import torch
    import vllm

    report = Report()
    report.check("environment", vllm.__version__.startswith("0.34") and torch.cuda.is_available(),
                 vllm=vllm.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    greedy = {"temperature": 0.0}
    lossless, _, config = generate(args, None, greedy)
    report.check("config", config.scheduler_config.async_scheduling
                 and str(config.compilation_config.cudagraph_mode) not in ("NONE", "CUDAGraphMode.NONE"),
                 async_scheduling=config.scheduler_config.async_scheduling,
                 cudagraph_mode=str(config.compilation_config.cudagraph_mode))
    probes = install_probes()
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    every_opted_out = {i: OPT_OUT for i in range(args.prompts)}
    tokens, metrics, _ = generate(args, ACCEPT_ALL, greedy, every_opted_out, max_model_len=512,
                                  num_gpu_blocks_override=args.preempt_blocks)
    report.check("sample wrapped", getattr(GPUModelRunner.sample, "__selfjudge_original__", None) is not None
                 and probes.chunks > 0, chunks=probes.chunks)
    counts = probes.counters()
    report.check("preempt", counts.judge_accepted == 0 and not differing(tokens, lossless)
                 and counter(metrics, "vllm:num_preemptions") > 0,
                 forced=counts.judge_accepted, differing=differing(tokens, lossless),
                 preemptions=counter(metrics, "vllm:num_preemptions"))

    probes.runtimes.clear()
    half = {i: OPT_OUT for i in range(0, args.prompts, 2)}
    tokens, metrics, _ = generate(args, ACCEPT_ALL, greedy, half)
    counts = probes.counters()
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    report.check("accept", counts.judge_accepted > 0 and accepted >= counts.judge_accepted,
                 forced=counts.judge_accepted, vllm_accepted=accepted)
    report.check("mixed", not differing(tokens, lossless, list(half)), differing=differing(tokens, lossless, list(half)))
    report.check("hidden", probes.argmax_mismatches() == 0 and probes.mismatches,
                 chunks_compared=len(probes.mismatches), mismatches=probes.argmax_mismatches())
    report.check("syncs", not probes.sync_errors, errors=probes.sync_errors[:3])

    probes.runtimes.clear()
    _, metrics, _ = generate(args, ACCEPT_ALL, {"temperature": 1.0}, dtype="float16")
    counts = probes.counters()
    drafted = counter(metrics, "vllm:spec_decode_num_draft_tokens")
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    # Forced drafts rejected (the NaN of a forced +inf entry) would leave vLLM's count below the
    # forced one; placeholders of async scheduling are never accepted, hence 0.9.
    report.check("float16", accepted >= counts.judge_accepted > 0 and accepted >= 0.9 * drafted,
                 drafted=drafted, vllm_accepted=accepted, forced=counts.judge_accepted)
    report.check("time", time.monotonic() - started < 600, seconds=round(time.monotonic() - started))
    report.write(args.out)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
