"""Draft tokens a served proposer would offer along a greedy response, for labelling.

The draft model's are its teacher-forced greedy tokens (label.py, from prompt_logprobs).
vLLM's `ngram` proposer (prompt lookup) is replayed here in numpy: vLLM's own lookup
(`vllm.v1.spec_decode.ngram_proposer._find_longest_matched_ngram_and_propose_tokens`) is
numba code, and once numba is imported, vLLM 0.32 crashes building any later engine in the
same process (the labeller builds several). tests/test_offline_units.py checks this copy
against vLLM's function in a separate interpreter, and an engine test checks the replayed
decode against vLLM's speculative-decoding counters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NgramSettings:
    """vLLM's `ngram` proposer as served (speculative config `num_speculative_tokens`,
    `prompt_lookup_min`, `prompt_lookup_max`)."""

    k: int = 8
    min_n: int = 2
    max_n: int = 5


def ngram_proposal(tokens: np.ndarray, settings: NgramSettings, max_model_len: int) -> np.ndarray:
    """The tokens vLLM's ngram proposer drafts after `tokens`: find the longest n in
    [min_n, max_n] whose last-n tokens occur earlier (ending before the last token), take its
    earliest occurrence, and propose up to k of the tokens that followed it."""
    total = len(tokens)
    k = min(settings.k, max_model_len - total)
    if total < settings.min_n or k <= 0:
        return tokens[:0]
    for n in range(min(settings.max_n, total - 1), settings.min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: total - 1], n)
        hits = np.flatnonzero((windows == tokens[total - n :]).all(axis=1))
        if len(hits):
            start = int(hits[0]) + n
            return tokens[start : start + min(k, total - start)]
    return tokens[:0]


@dataclass(frozen=True)
class NgramStep:
    position: int  # the response position of the first draft token
    proposed: int  # draft tokens proposed
    accepted: int  # of them, accepted by lossless greedy verification


def replay_ngram_decode(sequence: list[int], prompt_len: int, settings: NgramSettings,
                        max_model_len: int) -> list[NgramStep]:
    """The steps of serving this greedy response losslessly with the ngram proposer: the
    first response token comes from prefill; each later step proposes from the tokens so
    far, accepts while the proposal matches, and ends with the target's own token (at the
    first rejected position, or the bonus token)."""
    tokens = np.asarray(sequence, dtype=np.int64)
    steps = []
    position = prompt_len + 1
    while position < len(tokens):
        proposal = ngram_proposal(tokens[:position], settings, max_model_len)
        accepted = 0
        for draft in proposal.tolist():
            if position + accepted >= len(tokens) or draft != tokens[position + accepted]:
                break
            accepted += 1
        steps.append(NgramStep(position, len(proposal), accepted))
        position += accepted + 1
    return steps


def ngram_mismatches(sequence: list[int], prompt_len: int, settings: NgramSettings,
                     max_model_len: int) -> list[tuple[int, int]]:
    """(m, draft) of every draft token the ngram proposer offers where lossless verification
    rejects it: the position the judge decides when serving with ngram."""
    tokens = np.asarray(sequence, dtype=np.int64)
    out = []
    for step in replay_ngram_decode(sequence, prompt_len, settings, max_model_len):
        m = step.position + step.accepted
        if step.accepted < step.proposed and m < len(tokens):
            proposal = ngram_proposal(tokens[: step.position], settings, max_model_len)
            out.append((m, int(proposal[step.accepted])))
    return out
