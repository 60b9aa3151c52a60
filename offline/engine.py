"""The vLLM calls of the pipeline: greedy responses, batched prompt log-probabilities, and
final-norm hidden states from a pooling engine (the numbers the plugin sees at serving)."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


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


@contextmanager
def engine(model: str, settings: EngineSettings, pooling: bool = False):
    """An LLM for the duration of one stage (stages never hold two at once)."""
    from vllm import LLM

    kwargs = dict(
        model=model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        seed=settings.seed,
        enforce_eager=settings.enforce_eager,
        max_num_seqs=settings.max_num_seqs,
    )
    if settings.block_size is not None:
        kwargs["block_size"] = settings.block_size
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
    llm = LLM(**kwargs)
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


def hidden_states(llm, sequences: list[list[int]]):
    """[len(seq), hidden] final-norm states per sequence (torch tensors, model dtype)."""
    outputs = llm.encode([tokens_prompt(s) for s in sequences], pooling_task="token_embed", use_tqdm=False)
    return [o.outputs.data for o in outputs]
