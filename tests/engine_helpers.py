"""Run vLLM engines on the tiny models and collect what the tests compare."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from selfjudge_vllm.testing.tiny_models import PROMPTS

# Repetitive prompts give the n-gram proposer something to match.
NGRAM_PROMPTS = [p + " " + p + " " + p.split()[0] for p in PROMPTS]


@dataclass
class EngineResult:
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    judge: dict | None  # worker-side JudgeCounters, None when the judge is off
    judge_ranks: list | None = None  # every worker's (tensor-parallel ranks)


# What the calibrate tests serve the tiny float32 models in, as every other engine test does.
# calibrate's own default (auto) is bfloat16 on a CPU with native bfloat16, where vLLM 0.32's
# engine died at the first requests in 3 calibrate test runs of two suite runs on an AMX
# machine, the one with a stack of SIGILL in vLLM's CPU attention kernel
# (cpu_attention_with_kv_cache; docs/serving.md): not what these tests are about.
CALIBRATE_TEST_DTYPE = ("--dtype", "float32")


def spec_config(kind: str, draft_dir: Path | None, k: int = 4, **extra) -> dict:
    """draft_dir: the draft model (draft_model), or the EAGLE head (eagle, eagle3)."""
    if kind in ("draft_model", "eagle", "eagle3"):
        return {"method": kind, "model": str(draft_dir), "num_speculative_tokens": k, **extra}
    if kind == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": k,
            "prompt_lookup_min": 1,
            "prompt_lookup_max": 3,
        }
    raise ValueError(kind)


def _worker_counters(worker):
    runtime = getattr(worker.model_runner, "_selfjudge_runtime", None)
    if runtime is None:
        return None
    import os
    from dataclasses import asdict

    return dict(asdict(runtime.flush()), pid=os.getpid(), publishes=runtime.sink is not None)


def run_engine(
    target: Path,
    speculative_config: dict | None,
    prompts: list[str],
    sampling: dict,
    additional_config: dict | None = None,
    max_model_len: int = 256,
    engine_args: dict | None = None,
) -> EngineResult:
    """Build an LLM in this process, generate, read vLLM's and the judge's counters."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(target),
        dtype="float32",
        max_model_len=max_model_len,
        enforce_eager=True,
        seed=0,
        speculative_config=speculative_config,
        additional_config=additional_config or {},
        disable_log_stats=False,
        max_num_seqs=64,
        **(engine_args or {}),
    )
    try:
        params = SamplingParams(**sampling)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        token_ids = [list(o.outputs[0].token_ids) for o in outputs]
        prompt_token_ids = [list(o.prompt_token_ids) for o in outputs]
        metrics = {m.name: m for m in llm.get_metrics()}

        def value(name):
            m = metrics.get(name)
            return int(m.value) if m is not None else 0

        ranks = llm.collective_rpc(_worker_counters)
        judge = ranks[0]
        return EngineResult(
            token_ids,
            prompt_token_ids,
            value("vllm:spec_decode_num_drafts"),
            value("vllm:spec_decode_num_draft_tokens"),
            value("vllm:spec_decode_num_accepted_tokens"),
            judge,
            ranks,
        )
    finally:
        # No gc.collect() here: vLLM's shutdown has just collected the whole heap (unfrozen),
        # the engine's memory is back once `llm` goes, and the next engine's build collects
        # again before it freezes the heap (conftest); a third full pass freed nothing.
        del llm


def run_engine_subprocess(spec: dict, env: dict | None = None, timeout: float = 300) -> EngineResult:
    """Same as run_engine, in a fresh interpreter (stock-vLLM baselines, multi-process mode)."""
    return run_engines_subprocess([spec], env, timeout)[0]


def run_engines_subprocess(specs: list[dict], env: dict | None = None, timeout: float = 300) -> list[EngineResult]:
    """run_engine for each spec in turn, in one fresh interpreter (one vLLM import for them all).
    An `ngram` engine comes last: this interpreter has none of tests/conftest.py's patches, and
    vLLM 0.32 cannot build an engine after one that imported numba."""
    import os

    methods = [(s.get("speculative_config") or {}).get("method") for s in specs]
    if "ngram" in methods[:-1]:
        raise ValueError(f"an ngram engine must be the last of the interpreter's engines: {methods}")
    full_env = dict(os.environ)
    full_env.update(env or {})
    for attempt in (1, 2):
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(specs)],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout * len(specs),
        )
        # Seen once in CI: the CPU engine aborted natively while starting, after loading the
        # weights and before any step ("terminate called without an active exception"; the
        # same test then passed 6 of 6 times). Start it once more for that abort only; any
        # other failure, or the same abort twice, fails the test.
        native_abort = proc.returncode == -signal.SIGABRT and "terminate called" in proc.stderr
        if not (native_abort and "RESULT " not in proc.stdout and attempt == 1):
            break
        print(f"engine subprocess aborted natively while starting; starting it again:\n{proc.stderr[-1000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"engine subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = [json.loads(out[len("RESULT "):]) for out in proc.stdout.splitlines() if out.startswith("RESULT ")]
    assert len(results) == len(specs), proc.stdout[-2000:]
    return [EngineResult(**r) for r in results]


if __name__ == "__main__":
    from dataclasses import asdict

    for args in json.loads(sys.argv[1]):
        result = run_engine(**dict(args, target=Path(args["target"])))
        print("RESULT " + json.dumps(asdict(result)), flush=True)
