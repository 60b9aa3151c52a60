"""The judge's acceptance rule, in plain torch (no vLLM import).

Given the target's post-norm hidden state at each draft token's own position, the head
scores the token; a token whose score clears the threshold, and which the processed target
distribution does not forbid, is forced through verification by making it the only token
with probability mass in its row. All other rows are left untouched, so vLLM's standard
verification (greedy argmax match or rejection sampling, recovered token included) treats
them exactly as without the judge.

Everything here runs on the model's device without host synchronisation.
"""

from __future__ import annotations

import torch

# A logit so large that softmax gives its token probability exactly 1.0 in float32 (every
# other entry becomes exp(-1e30) == 0), yet finite, so `x - max` never computes inf - inf.
FORCED_LOGIT = 1e30


class JudgeHead:
    """Logistic-regression head: score = hidden . weight + bias (a logit)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, threshold_logit: float):
        self.weight = weight.to(torch.float32).reshape(-1)
        self.bias = bias.to(torch.float32).reshape(())
        self.threshold_logit = float(threshold_logit)

    def to(self, device: torch.device) -> "JudgeHead":
        if self.weight.device != device:
            self.weight = self.weight.to(device)
            self.bias = self.bias.to(device)
        return self

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] (any float dtype) -> [n] float32 logits."""
        return torch.addmv(self.bias.expand(hidden.shape[0]), hidden.to(torch.float32), self.weight)

    def accept_mask(
        self,
        hidden: torch.Tensor,
        draft_token_ids: torch.Tensor,
        processed_logits: torch.Tensor,
        threshold_logit: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Which draft tokens the judge accepts. Ties (score == threshold) are accepted.

        hidden: [n, H] target hidden state at each draft token's own position.
        draft_token_ids: [n] (padding is -1, never accepted).
        processed_logits: [n, V] target logits after penalties, bans, grammar masks and
            temperature/top-k/top-p; a draft token whose entry is -inf is never accepted.
        threshold_logit: scalar or per-row [n] override of the head's threshold.
        """
        limit = self.threshold_logit if threshold_logit is None else threshold_logit
        valid = draft_token_ids >= 0
        draft_logit = processed_logits.gather(1, draft_token_ids.clamp(min=0).long().unsqueeze(1))
        allowed = draft_logit.squeeze(1) > float("-inf")
        return (self.scores(hidden) >= limit) & valid & allowed


def force_accept_(
    processed_logits: torch.Tensor, draft_token_ids: torch.Tensor, accept: torch.Tensor
) -> None:
    """In place: give each accepted row's draft token all of the row's probability mass.

    One element written per row (O(rows), not O(rows x vocab)). Greedy verification then
    sees argmax == draft; random verification sees p_target(draft) == 1 >= any draw.
    """
    index = draft_token_ids.clamp(min=0).long().unsqueeze(1)
    current = processed_logits.gather(1, index)
    forced = torch.where(accept.unsqueeze(1), torch.full_like(current, FORCED_LOGIT), current)
    processed_logits.scatter_(1, index, forced)
