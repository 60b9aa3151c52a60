"""The plugin in a vLLM 0.34 engine on a GPU (model runner V2), in one command.

Run it on a machine with an NVIDIA GPU and vLLM 0.34.0 (`pip install -e ".[gpu]"`); it loads
a small public instruct model (default Qwen/Qwen2.5-0.5B-Instruct, downloaded by vLLM) with
n-gram speculative decoding, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so its probes
see the worker), and takes a few minutes:

    python benchmarks/gpu_check.py [--model M] [--out gpu_check.json]

It asserts:
  config     async scheduling and CUDA graphs are on, and model runner V2's `sample` is wrapped;
  preempt    every request opted out, a KV cache small enough to preempt: zero drafts forced,
             and the output equals a lossless engine's with the same settings (same
             max_model_len and KV blocks, so the same preemptions);
  accept     in a batch with half the requests accept-all: vLLM's per-request accepted counts
             of the accept-all half (per_request_spec_decode_metrics) account for the drafts
             the judge forced (see "Counting" below);
  mixed      the opted-out half of that batch equals the lossless run;
  hidden     the hidden rows kept for each verification chunk give the logits' argmax;
  syncs      the judge's work in every chunk ran under torch.cuda.set_sync_debug_mode("error");
  float16    float16 at temperature 1.0 (vLLM verifies the model's own tensor), every request
             accept-all: vLLM's accepted count accounts for the drafts forced.
and prints one line per check, writes them to --out, exits non-zero on a failure.

Counting (accept, float16): with accept-all every valid draft of a judged request is forced,
so vLLM can accept at most the forced drafts. It accepts fewer when it discards a verified
step's output: under async scheduling the scheduler schedules a request's next step unless it
is sure the in-flight one ends it (vllm/v1/core/sched/scheduler.py, "Avoid scheduling an extra
step"), and update_from_output skips the output of a request already finished or preempted;
the judge forced that step's drafts all the same. At most one step per finished request and
per preemption is discarded, so the check is
    forced - k x (requests + preemptions) <= vLLM accepted <= forced, forced > 0.
A forced draft that vLLM rejected (the failure this looks for) shows as accepted below that.

Exact token comparisons (preempt, mixed) need runs whose batches differ to compute the same
logits: the script sets VLLM_BATCH_INVARIANT=1 before vLLM is imported (vllm/envs.py in
0.34; an attention backend with batch-invariant support, e.g. FlashAttention, on an SM80+
GPU; export VLLM_BATCH_INVARIANT=0 to run without it, when those two checks may fail on
near-ties that are not the plugin's). A failing comparison reports each differing request's
first divergent position. The preempt reference also has the judged run's engine settings.

What the probes cannot see: set_sync_debug_mode reports synchronizing CUDA calls, but a
non_blocking host-to-device copy from pageable (unpinned) memory waits for the device without
being reported. The judge's host-to-device copies go through runtime.host_to_device, which
stages them with pin_memory() on CUDA (its staging tensor never leaves it, so neither this
script nor the CPU tests, which have no CUDA to pin with, check its pinned-ness).

Not run in this project's workplace: vLLM is not installed on the lent GPU machines and its
wheel is too large to carry there (docs/vllm-integration.md). The parts that need no GPU and
no vLLM (arguments, the engines' settings, reading vLLM's counters, comparing outputs, the
report, the probes' bookkeeping) are unit-tested on CPU: tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import functools
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
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds the whole check may take")
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
                  disable_log_stats=False, gpu_memory_utilization=0.5,
                  # vLLM's accepted/drafted counts per request (RequestOutput.outputs[0].spec_decode_metrics)
                  per_request_spec_decode_metrics="summary")
    kwargs.update(overrides)
    return kwargs


def preempt_settings(args: argparse.Namespace) -> dict:
    """The preemption run's engine settings, given to its lossless reference too: a KV cache
    small enough to preempt (the same settings preempt the same requests at the same steps)."""
    return {"max_model_len": 512, "num_gpu_blocks_override": args.preempt_blocks}


def counter(metrics, name: str) -> int:
    """A counter of llm.get_metrics() (0 when absent)."""
    return int(sum(m.value for m in metrics if m.name == name))


def differing(a: list[list[int]], b: list[list[int]], indices=None) -> list[int]:
    """The requests (of `indices`, default all) whose token ids differ."""
    indices = range(len(a)) if indices is None else indices
    return [i for i in indices if a[i] != b[i]]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (None: equal)."""
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def divergences(a: list[list[int]], b: list[list[int]], indices=None) -> dict[int, int]:
    """Request -> first divergent position, for the requests (of `indices`) that differ."""
    return {i: first_divergence(a[i], b[i]) for i in differing(a, b, indices)}


def forced_accounted(forced: int, accepted: int, k: int, requests: int, preemptions: int) -> tuple[bool, int]:
    """Accept-all: vLLM accepted every draft the judge forced, but for the steps vLLM
    discarded (at most one per finished request and per preemption under async scheduling,
    k drafts each). Returns (ok, slack)."""
    slack = k * (requests + preemptions)
    return forced > 0 and forced - slack <= accepted <= forced, slack


def accepted_of(spec_metrics: list, indices) -> int:
    """vLLM's accepted draft tokens of the requests `indices` (their per-request metrics)."""
    missing = [i for i in indices if spec_metrics[i] is None]
    if missing:
        raise RuntimeError(f"vLLM reported no per-request spec-decode metrics for requests {missing}")
    return sum(sum(j * count for j, count in enumerate(spec_metrics[i].histogram)) for i in indices)


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
        @functools.wraps(original)
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
        # functools.wraps: the plugin's own wrap of `sample` (adapter_v2._wrap_sample) reads
        # vLLM's signature through __wrapped__, and finds its marker when it wrapped first.
        @functools.wraps(original)
        def sample(runner, *args, **kwargs):
            self.model_state = runner.model_state
            return original(runner, *args, **kwargs)

        return sample

    def release(self) -> None:
        """Between engines: drop the last engine's model state and runtimes (they hold its
        weights and device counters; the next engine's `sample` sets its own)."""
        self.model_state = None
        self.runtimes.clear()

    def argmax_mismatches(self) -> int:
        return int(sum(int(m) for m in self.mismatches))

    def counters(self):
        """judge counters summed over the runtimes seen (flush reads the device)."""
        from selfjudge_vllm.metrics import JudgeCounters

        total = JudgeCounters()
        for runtime in self.runtimes:
            total.add(runtime.flush())
        return total


def install_probes(runner_class=None, install_hooks=None) -> Probes:
    """The probes, on top of the plugin's wraps: those are installed first (what the judged
    engine's worker does at start-up; idempotent, so the worker's own call then keeps the
    probes). `runner_class` / `install_hooks` default to vLLM's GPUModelRunner and
    adapter_v2.install_step_hooks (tests pass stand-ins)."""
    from selfjudge_vllm import adapter_v2

    if runner_class is None:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as runner_class
    (install_hooks or adapter_v2.install_step_hooks)()
    probes = Probes()
    adapter_v2.VerifyStep.judge_chunk_ = probes.judge_chunk(adapter_v2.VerifyStep.judge_chunk_)
    runner_class.sample = probes.sample(runner_class.sample)
    return probes


@dataclass
class Run:
    tokens: list[list[int]]  # token ids per request
    metrics: list  # llm.get_metrics()
    config: object  # the engine's VllmConfig
    spec_metrics: list  # vLLM's per-request spec-decode metrics (None where not reported)


def generate(args, selfjudge, sampling: dict, options=None, **overrides) -> Run:
    """One engine run over the prompts."""
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args, selfjudge, **overrides))
    try:
        texts = prompts(args.prompts)
        params = [SamplingParams(max_tokens=args.max_tokens, seed=i, extra_args=(options or {}).get(i), **sampling)
                  for i in range(len(texts))]
        outputs = llm.generate(texts, params, use_tqdm=False)
        return Run([list(o.outputs[0].token_ids) for o in outputs], llm.get_metrics(), llm.llm_engine.vllm_config,
                   [getattr(o.outputs[0], "spec_decode_metrics", None) for o in outputs])
    finally:
        del llm
        gc.collect()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_BATCH_INVARIANT", "1")  # before vLLM reads its environment
    started = time.monotonic()
    import torch
    import vllm

    report = Report()
    report.check("environment", vllm.__version__.startswith("0.34") and torch.cuda.is_available(),
                 vllm=vllm.__version__, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 batch_invariant=os.environ["VLLM_BATCH_INVARIANT"])
    greedy = {"temperature": 0.0}
    lossless = generate(args, None, greedy)
    config = lossless.config
    report.check("config", config.scheduler_config.async_scheduling
                 and str(config.compilation_config.cudagraph_mode) not in ("NONE", "CUDAGraphMode.NONE"),
                 async_scheduling=config.scheduler_config.async_scheduling,
                 cudagraph_mode=str(config.compilation_config.cudagraph_mode),
                 breakable_cudagraph=getattr(config.compilation_config, "use_breakable_cudagraph", None))
    lossless_small = generate(args, None, greedy, **preempt_settings(args))
    probes = install_probes()
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    every_opted_out = {i: OPT_OUT for i in range(args.prompts)}
    run = generate(args, ACCEPT_ALL, greedy, every_opted_out, **preempt_settings(args))
    report.check("sample wrapped", getattr(GPUModelRunner.sample, "__selfjudge_original__", None) is not None
                 and probes.chunks > 0, chunks=probes.chunks)
    counts = probes.counters()
    preemptions = counter(run.metrics, "vllm:num_preemptions")
    report.check("preempt", counts.judge_accepted == 0 and not differing(run.tokens, lossless_small.tokens)
                 and preemptions > 0,
                 forced=counts.judge_accepted, differing=divergences(run.tokens, lossless_small.tokens),
                 preemptions=preemptions,
                 reference_preemptions=counter(lossless_small.metrics, "vllm:num_preemptions"))

    probes.release()
    half = {i: OPT_OUT for i in range(0, args.prompts, 2)}
    judged = [i for i in range(args.prompts) if i not in half]
    run = generate(args, ACCEPT_ALL, greedy, half)
    counts = probes.counters()
    accepted = accepted_of(run.spec_metrics, judged)
    preemptions = counter(run.metrics, "vllm:num_preemptions")
    ok, slack = forced_accounted(counts.judge_accepted, accepted, args.k, len(judged), preemptions)
    report.check("accept", ok, forced=counts.judge_accepted, vllm_accepted_judged=accepted, slack=slack,
                 vllm_accepted_opted_out=accepted_of(run.spec_metrics, list(half)), preemptions=preemptions)
    report.check("mixed", not differing(run.tokens, lossless.tokens, list(half)),
                 differing=divergences(run.tokens, lossless.tokens, list(half)))
    report.check("hidden", probes.argmax_mismatches() == 0 and probes.mismatches,
                 chunks_compared=len(probes.mismatches), mismatches=probes.argmax_mismatches())
    report.check("syncs", not probes.sync_errors, errors=probes.sync_errors[:3])

    probes.release()
    run = generate(args, ACCEPT_ALL, {"temperature": 1.0}, dtype="float16")
    counts = probes.counters()
    drafted = counter(run.metrics, "vllm:spec_decode_num_draft_tokens")
    accepted = counter(run.metrics, "vllm:spec_decode_num_accepted_tokens")
    preemptions = counter(run.metrics, "vllm:num_preemptions")
    # A forced draft rejected (the NaN of a forced +inf entry, say) leaves vLLM's count below
    # the forced one by more than the steps vLLM discarded.
    ok, slack = forced_accounted(counts.judge_accepted, accepted, args.k, args.prompts, preemptions)
    report.check("float16", ok, drafted=drafted, vllm_accepted=accepted, forced=counts.judge_accepted, slack=slack,
                 preemptions=preemptions)
    probes.release()
    report.check("time", time.monotonic() - started < args.time_limit, seconds=round(time.monotonic() - started))
    report.write(args.out)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
