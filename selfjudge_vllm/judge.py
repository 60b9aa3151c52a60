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

    def apply_(
        self,
        hidden: torch.Tensor,
        draft_token_ids: torch.Tensor,
        processed_logits: torch.Tensor,
        threshold_logit: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decide every draft token and force the accepted ones, in place.

        hidden: [n, H] target hidden state at each draft token's own position.
        draft_token_ids: [n] (padding is -1, never accepted).
        processed_logits: [n, V] target logits after penalties, bans, grammar masks and
            temperature/top-k/top-p; a draft token whose entry is -inf is never accepted.
            Each accepted row's draft entry becomes FORCED_LOGIT, which gives the token all
            of the row's probability: greedy verification sees argmax == draft, random
            verification sees p_target(draft) == 1 >= any draw. Other rows are untouched.
        threshold_logit: scalar or per-row [n] override of the head's threshold.

        Returns (accept, valid) boolean [n] masks. Ties (score == threshold) are accepted.
        One element is read and written per row, and the handful of kernels launched are
        shared between deciding and forcing (the step is launch-bound on GPUs).
        """
        limit = self.threshold_logit if threshold_logit is None else threshold_logit
        index = draft_token_ids.clamp(min=0).long().unsqueeze(1)
        draft_logit = processed_logits.gather(1, index)
        valid = draft_token_ids >= 0
        accept = (self.scores(hidden) >= limit) & valid & (draft_logit.squeeze(1) > float("-inf"))
        processed_logits.scatter_(1, index, torch.where(accept.unsqueeze(1), FORCED_LOGIT, draft_logit))
        return accept, valid
