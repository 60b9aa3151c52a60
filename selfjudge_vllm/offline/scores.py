"""Semantic preservation scores from per-position log-probabilities (pure numpy).

Notation (the SelfJudge paper's semantic preservation score): y is prompt + greedy response, m a response position where
the draft's teacher-forced argmax d_m differs from y_m, y' = y[:m] + [d_m] + y[m+1:], and
"entry i" of a sequence is log p(token i | tokens before i), i.e. the target's log-softmax at
position i-1 (vLLM's prompt_logprobs[i]).

    S_orig = mean(entry i of y, actual token,             i = m .. m+N)
    S_sub  = mean(entry m of y', actual token (= d_m),
                  entry i of y', suffix term,              i = m+1 .. m+N)
    score  = S_orig - S_sub          (large: the substitution hurts; "reject" if > tau)

suffix term: "max" = the target's top-1 log-probability at that position (the authors'
released code, and this package's default), "kept" = the log-probability of the kept token
y_i (the paper's text). Windows are cut at the end of the sequence, identically in both
means.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

SuffixMode = Literal["max", "kept"]
SUFFIX_MODES: tuple[SuffixMode, ...] = ("max", "kept")
DEFAULT_SUFFIX_MODE: SuffixMode = "max"


def window_end(m: int, n: int, seq_len: int) -> int:
    """One past the last entry index a window of suffix length n uses (cut at the end)."""
    return min(m + n + 1, seq_len)


def semantic_preservation_scores(
    m: int,
    seq_len: int,
    orig_actual: Sequence[float],
    sub_actual: Sequence[float],
    sub_top1: Sequence[float],
    suffix_lengths: Sequence[int],
) -> dict[str, dict[int, float]]:
    """Scores for one mismatch at every suffix length and both suffix modes.

    orig_actual[j]: entry m+j of y (actual token), j = 0 .. W-1
    sub_actual[j], sub_top1[j]: entry m+j of y' (actual token / top-1), j = 0 .. W-1
    where W = window_end(m, max(suffix_lengths), seq_len) - m.
    Returns {mode: {n: score}}.
    """
    orig = np.asarray(orig_actual, dtype=np.float64)
    kept = np.asarray(sub_actual, dtype=np.float64)
    top1 = np.asarray(sub_top1, dtype=np.float64)
    out: dict[str, dict[int, float]] = {mode: {} for mode in SUFFIX_MODES}
    for n in suffix_lengths:
        width = window_end(m, n, seq_len) - m
        if width > len(orig) or width > len(kept):
            raise ValueError(f"window of {width} entries needs more log-probabilities")
        s_orig = orig[:width].mean()
        prefix = kept[0]  # log p(d_m | y[:m]): the same entry in both modes
        for mode, suffix in (("kept", kept[1:width]), ("max", top1[1:width])):
            s_sub = (prefix + suffix.sum()) / width
            out[mode][n] = float(s_orig - s_sub)
    return out
