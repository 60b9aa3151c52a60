"""The vLLM calls of the pipeline: greedy responses, batched prompt log-probabilities, and
final-norm hidden states from a pooling engine (the numbers the plugin sees at serving)."""

from __future__ import annotations

import gc
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import psutil

logger = logging.getLogger("selfjudge.label")

# On CPU, vLLM sizes the KV cache from a share of the node's memory, which fails on a shared
# machine (24 GiB here: it asked for 21.7 GiB with 21.3 free); labelling needs little: at
# most this, and at most half of the memory free when the engine starts.
CPU_KV_CACHE_GIB = 4.0
CPU_KV_CACHE_FREE_SHARE = 0.5


class EngineStartError(RuntimeError):
    """vLLM could not build an engine; the message says what to change in selfjudge terms."""


@dataclass(frozen=True)
class EngineSettings:
    dtype: str = "auto"
    max_model_len: int = 2048
    seed: int = 0
    enforce_eager: bool = True
    max_num_seqs: int = 64
    # KV block size; the prefix cache shares whole blocks, so smaller blocks let more of a
    # substituted window's prefix come from the cache. None: vLLM's default.
    block_size: int | None = None
    # KV cache size in GiB. None: CPU_KV_CACHE_GIB on CPU (unless VLLM_CPU_KVCACHE_SPACE is
    # set), vLLM's own sizing on GPUs.
    kv_cache_gib: float | None = None
    # Further LLM() arguments (`--engine-args` JSON), passed through as given.
    extra: dict | None = None


def cpu_has_native_bf16() -> bool:
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def engine_arguments(model: str, settings: EngineSettings, on_cpu: bool, native_bf16: bool,
                     free_gib: float = float("inf")) -> tuple[dict, list[str]]:
    """LLM() arguments for `settings`, with the CPU defaults filled in, and a note for each
    default chosen (logged). free_gib: memory free now."""
    kwargs = dict(model=model, dtype=settings.dtype, max_model_len=settings.max_model_len, seed=settings.seed,
                  enforce_eager=settings.enforce_eager, max_num_seqs=settings.max_num_seqs)
    notes = []
    if settings.block_size is not None:
        kwargs["block_size"] = settings.block_size
    if on_cpu and settings.dtype == "auto" and not native_bf16:
        # Without AVX512-BF16/AMX, bfloat16 matmuls fall back to plain torch, several times
        # slower than float32.
        kwargs["dtype"] = "float32"
        notes.append("CPU without native bfloat16 (no AVX512-BF16/AMX): models run in float32 (--dtype to change)")
    if settings.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * 2**30)
    elif on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        gib = round(min(CPU_KV_CACHE_GIB, CPU_KV_CACHE_FREE_SHARE * free_gib), 2)
        kwargs["kv_cache_memory_bytes"] = int(gib * 2**30)
        notes.append(f"CPU: KV cache bounded to {gib:g} GiB (--kv-cache-gib to change)")
    kwargs.update(settings.extra or {})
    return kwargs, notes


def start_failure_message(kwargs: dict, exc: BaseException) -> str:
    kv = kwargs.get("kv_cache_memory_bytes")
    kv_text = f"{kv / 2**30:g} GiB" if kv else "vLLM's own sizing"
    return (
        f"vLLM could not start an engine for {kwargs['model']} ({type(exc).__name__}: {exc}). "
        "vLLM's log above has the cause. Common ones: the KV cache does not fit in free memory "
        f"(now {kv_text}: --kv-cache-gib), the context is too long for it (--max-model-len), "
        "or an argument vLLM refuses (--engine-args)."
    )


@contextmanager
def engine(model: str, settings: EngineSettings, pooling: bool = False):
    """An LLM for the duration of one stage (stages never hold two at once)."""
    from vllm import LLM
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    free_gib = psutil.virtual_memory().available / 2**30
    kwargs, notes = engine_arguments(model, settings, on_cpu, on_cpu and cpu_has_native_bf16(), free_gib)
    for note in notes:
        logger.info("selfjudge: %s", note)
    if pooling:
        from vllm.config import PoolerConfig

        # token_embed with the activation off returns the per-token final-norm states.
        kwargs.update(
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(task="token_embed", use_activation=False),
        )
    else:
        kwargs.update(max_logprobs=1)
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # vLLM raises many types here; the message names what to change
        raise EngineStartError(start_failure_message(kwargs, exc)) from exc
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def tokens_prompt(ids):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def greedy_responses(llm, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, detokenize=False)
    outputs = llm.generate([tokens_prompt(p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@dataclass
class PositionLogprobs:
    """Entry i: log p(token i | tokens before i) and the top-1 token/log-prob there.
    Entry 0 has no logits before it and holds NaN / -1."""

    actual: np.ndarray  # [L] float64
    top1: np.ndarray  # [L] float64
    top1_id: np.ndarray  # [L] int64
    # Entries 1..cached_tokens came from the prefix cache and are NaN here (vLLM fills
    # them with garbage: cached positions compute no logits).
    cached_tokens: int = 0


def prompt_logprobs(llm, sequences: list[list[int]], read_prefix_cache: bool = False) -> list[PositionLogprobs]:
    """One batched prefill per sequence; no tokens are generated that matter.

    With `read_prefix_cache`, a sequence whose prefix is in vLLM's prefix cache (an earlier
    request shared it) skips computing it, and only entries after the cached tokens are
    returned.
    """
    from vllm import SamplingParams

    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False,
        skip_reading_prefix_cache=not read_prefix_cache,
    )
    outputs = llm.generate([tokens_prompt(s) for s in sequences], params, use_tqdm=False)
    result = []
    for seq, out in zip(sequences, outputs):
        n = len(seq)
        actual, top1 = np.full(n, np.nan), np.full(n, np.nan)
        top1_id = np.full(n, -1, dtype=np.int64)
        cached = (out.num_cached_tokens or 0) if read_prefix_cache else 0
        for i, entry in enumerate(out.prompt_logprobs):
            if entry is None or i <= cached:
                continue
            actual[i] = entry[seq[i]].logprob
            best = next(tok for tok, lp in entry.items() if lp.rank == 1)
            top1_id[i], top1[i] = best, entry[best].logprob
        result.append(PositionLogprobs(actual, top1, top1_id, cached))
    return result


def hidden_states(llm, sequences: list[list[int]], read_prefix_cache: bool = False):
    """Final-norm states per sequence (torch tensors, model dtype): [len(seq), hidden] rows.

    With `read_prefix_cache`, a sequence whose prefix is in vLLM's prefix cache (an earlier
    request shared it) skips computing it, and only the rows after the cached tokens are
    returned; the last row is always the sequence's last position. vLLM's own default
    for token_embed is to skip reading the cache, since it shortens the output.
    """
    from vllm import PoolingParams

    params = PoolingParams(task="token_embed", skip_reading_prefix_cache=not read_prefix_cache)
    outputs = llm.encode([tokens_prompt(s) for s in sequences], params, pooling_task="token_embed", use_tqdm=False)
    return [o.outputs.data for o in outputs]
