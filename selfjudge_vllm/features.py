"""What the judge head may read: one definition of each feature, for the offline pipeline
(from vLLM's prompt_logprobs) and the plugin (from the logits the verification step holds).
Plain torch, no vLLM import.

For a draft token d at response position m (offline/scores.py has the score; "row" = the target's
log-softmax over the vocabulary at one position, computed from the model's own logits,
before penalties, temperature, top-k/top-p):

    hidden             the final-norm hidden state at the position whose input is d (the
                       SelfJudge paper's feature)
    draft_logratio     l_{m-1}(d | y) - max_v l_{m-1}(v | y): the draft's log-probability
                       minus the top-1's in the row that verifies d (<= 0; 0 = no mismatch)
    verify_confidence  max_v l_{m-1}(v | y): the target's confidence in that row (its
                       uncertainty where the draft disagrees)
    next_confidence    max_v l_m(v | y[:m] + d): the target's confidence in the row after d
                       (the next draft's verifying row, or the bonus row for the last one):
                       the first suffix term of the "max" score

The logit features come from the raw logits, so a request gets the same values greedy or
sampled, and penalties or bans do not shift them; a banned draft is still never accepted
(rules.py checks the processed logits).
"""

from __future__ import annotations

import torch

HIDDEN = "hidden"
DRAFT_LOGRATIO = "draft_logratio"
VERIFY_CONFIDENCE = "verify_confidence"
NEXT_CONFIDENCE = "next_confidence"
LOGIT_FEATURES = (DRAFT_LOGRATIO, VERIFY_CONFIDENCE, NEXT_CONFIDENCE)
ALL_FEATURES = (HIDDEN,) + LOGIT_FEATURES
# Bumped whenever a feature's definition changes; artifacts record the version they use.
FEATURE_SET_VERSION = 1
# The named sets `selfjudge train --features` offers.
FEATURE_SETS = {"hidden": (HIDDEN,), "logits": LOGIT_FEATURES, "both": ALL_FEATURES}
# Elements per chunk of the vocabulary-wide reduction: bounds its float32 temporary (the
# chunk's log-softmax). On CPU a few rows that stay in cache are several times faster than
# large chunks (measured at 72 x 151,936: ~35 ms at 256 rows, ~11 ms at 4 rows); a GPU wants
# chunks large enough that kernel launches do not dominate.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def chunk_rows_for(logits: torch.Tensor) -> int:
    elements = CHUNK_ELEMENTS.get(logits.device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, elements // max(1, logits.shape[-1]))


def evidence_from_logprobs(draft_logprob: float, verify_top1_logprob: float,
                           next_top1_logprob: float | None) -> dict[str, float | None]:
    """The logit features of one mismatch from log-probabilities (offline: prompt_logprobs
    entry m of the substituted window, top-1 of the response at m, top-1 of the window at
    m+1, which is None when the response ends at m)."""
    return {
        DRAFT_LOGRATIO: float(draft_logprob - verify_top1_logprob),
        VERIFY_CONFIDENCE: float(verify_top1_logprob),
        NEXT_CONFIDENCE: None if next_top1_logprob is None else float(next_top1_logprob),
    }


def row_max_and_top1_logprob(logits: torch.Tensor, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [rows, V] logits (any float dtype): the max logit and the max log-probability
    (max of the float32 log-softmax, as vLLM computes logprobs), a chunk of rows at a time:
    one fused log-softmax plus one max per chunk."""
    rows = logits.shape[0]
    chunk_rows = chunk_rows or chunk_rows_for(logits)
    row_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
    top1_logprob = torch.empty_like(row_max)
    for start in range(0, rows, chunk_rows):
        chunk = logits[start : start + chunk_rows]
        row_max[start : start + chunk_rows] = chunk.amax(-1)
        top1_logprob[start : start + chunk_rows] = torch.log_softmax(chunk, -1, dtype=torch.float32).amax(-1)
    return row_max, top1_logprob


def evidence_from_logits(logits: torch.Tensor, verify_rows: torch.Tensor, draft_token_ids: torch.Tensor,
                         names=LOGIT_FEATURES) -> torch.Tensor:
    """[n, len(names)] float32 logit features of the n draft tokens, online.

    logits: [rows, V], the step's target logits before any sampling processing (vLLM's
        `execute_model_state.logits`), rows aligned with the sampled positions.
    verify_rows: [n] the row verifying each draft token (vLLM's target_logits_indices); the
        row after it is the next draft's verifying row or the request's bonus row.
    draft_token_ids: [n] (padding -1 gives finite garbage; the caller never accepts it).
    """
    row_max, top1_logprob = row_max_and_top1_logprob(logits)
    verify_max = row_max.index_select(0, verify_rows)
    columns = []
    for name in names:
        if name == DRAFT_LOGRATIO:
            draft_logit = logits[verify_rows, draft_token_ids.clamp(min=0).long()].float()
            columns.append(draft_logit - verify_max)
        elif name == VERIFY_CONFIDENCE:
            columns.append(top1_logprob.index_select(0, verify_rows))
        elif name == NEXT_CONFIDENCE:
            columns.append(top1_logprob.index_select(0, verify_rows + 1))
        else:
            raise ValueError(f"unknown logit feature {name!r}; known: {', '.join(LOGIT_FEATURES)}")
    return torch.stack(columns, 1)
