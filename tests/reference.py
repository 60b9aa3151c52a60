"""Independent reference of judge-then-standard greedy speculative decoding.

A plain transformers loop in float32 over the same target and draft models: the draft
proposes k tokens greedily, the target scores them in one forward pass, and each draft token
is kept if the judge accepts it (sigmoid(h . w + b) >= threshold on the target's final-norm
hidden state at the draft token's position) or if it equals the target's argmax; the first
token kept by neither is replaced by the target's argmax, and a fully accepted block gets the
target's bonus token. The first token comes from a plain prefill step, as in vLLM. Written without any selfjudge_vllm code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ReferenceTrace:
    # |score - threshold logit| of every judged mismatch, and the top-1/top-2 logit gap of
    # every position whose argmax decided a token: how close the run came to a tie.
    judge_margins: list[float] = field(default_factory=list)
    argmax_gaps: list[float] = field(default_factory=list)
    judged_mismatches: int = 0
    judge_accepted_mismatches: int = 0


def load(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def _forward(model, ids):
    out = model(torch.tensor([ids]), output_hidden_states=True)
    # hidden_states[-1] is the final-norm output in HF Llama (what lm_head reads).
    return out.logits[0], out.hidden_states[-1][0]


def _prefill(target, prompt_ids, gaps: list[float]) -> list[int]:
    """As in vLLM, the prefill step emits the target's own first token; drafting starts after."""
    logits, _ = _forward(target, list(prompt_ids))
    gaps.append(_gap(logits[-1]))
    return [int(logits[-1].argmax())]


def _propose(draft, ids: list[int], k: int) -> list[int]:
    """k greedy draft tokens after ids."""
    proposal: list[int] = []
    for _ in range(k):
        logits, _ = _forward(draft, ids + proposal)
        proposal.append(int(logits[-1].argmax()))
    return proposal


def _gap(row: torch.Tensor) -> float:
    top = torch.topk(row, 2).values
    return float(top[0] - top[1])


@torch.no_grad()
def _greedy_sd(target, propose, prompt_ids, max_tokens, argmax_gaps: list[float], keep_mismatch) -> list[int]:
    """Greedy SD: `propose(ids)` drafts a block after ids; a draft token equal to the target's
    argmax is kept, a mismatch is kept when `keep_mismatch(block_logits, block_hidden, i,
    token, proposal)` says so (row i of the block predicts draft token i; hidden row i is that
    token's own position), the first token kept by neither is replaced by the argmax, and a
    fully kept block gets the bonus token."""
    out = _prefill(target, prompt_ids, argmax_gaps)
    ids = list(prompt_ids) + out
    while len(out) < max_tokens:
        proposal = propose(ids)
        logits, hidden = _forward(target, ids + proposal)
        n = len(ids)
        block_logits, block_hidden = logits[n - 1:], hidden[n:]
        emitted: list[int] = []
        for i, token in enumerate(proposal):
            row = block_logits[i]
            argmax_gaps.append(_gap(row))
            if token == int(row.argmax()) or keep_mismatch(block_logits, block_hidden, i, token, proposal):
                emitted.append(token)
                continue
            emitted.append(int(row.argmax()))
            break
        else:
            argmax_gaps.append(_gap(block_logits[len(proposal)]))
            emitted.append(int(block_logits[len(proposal)].argmax()))
        ids += emitted
        out += emitted
    return out[:max_tokens]


def _judge_keeps(weight, bias, threshold, trace: ReferenceTrace):
    w = torch.as_tensor(weight, dtype=torch.float64)
    limit = float(torch.logit(torch.tensor(threshold, dtype=torch.float64)))

    def judge_keeps(block_logits, block_hidden, i, token, proposal) -> bool:
        score = float(block_hidden[i].double() @ w + bias)
        trace.judged_mismatches += 1
        trace.judge_margins.append(abs(score - limit))
        if score >= limit:
            trace.judge_accepted_mismatches += 1
            return True
        return False

    return judge_keeps


def judged_greedy_sd(
    target, draft, prompt_ids, max_tokens, k, weight, bias, threshold, trace: ReferenceTrace
) -> list[int]:
    return _greedy_sd(target, lambda ids: _propose(draft, ids, k), prompt_ids, max_tokens, trace.argmax_gaps,
                      _judge_keeps(weight, bias, threshold, trace))


def judged_greedy_replay(
    target, proposals: list[list[int]], prompt_ids, max_tokens, weight, bias, threshold, trace: ReferenceTrace
) -> list[int]:
    """The same verification of given draft blocks, in order (one per verification step):
    for proposers whose drafting is not re-implemented here (EAGLE). A block drafted for
    another context than the reference reached shows up as a different output."""
    blocks = iter(proposals)

    def propose(ids):
        block = next(blocks, None)
        if block is None:
            raise AssertionError("the recorded draft blocks ran out before max_tokens")
        return list(block)

    return _greedy_sd(target, propose, prompt_ids, max_tokens, trace.argmax_gaps,
                      _judge_keeps(weight, bias, threshold, trace))


def hidden_states_of(target, prompt_ids, continuation) -> torch.Tensor:
    """Final-norm hidden states of prompt+continuation, one row per token."""
    _, hidden = _forward(target, list(prompt_ids) + list(continuation))
    return hidden


@dataclass
class RelaxedTrace:
    # |statistic - knob| of every mismatch a rule decided (closeness to a tie).
    margins: list[float] = field(default_factory=list)
    statistics: list[float] = field(default_factory=list)
    argmax_gaps: list[float] = field(default_factory=list)
    mismatches: int = 0
    accepted_mismatches: int = 0


def relaxed_greedy_sd(target, draft, prompt_ids, max_tokens, k, rule, knob, window, trace: RelaxedTrace) -> list[int]:
    """Greedy SD where a mismatched draft token is also kept when a training-free rule says so:

    top_alpha: p_target(token) >= knob * max p_target (knob = alpha);
    entropy:   target entropy at the position >= knob (nats) and the target's argmax equals
               the draft at each of the next `window` draft positions that exist in the
               block, with at least one such position (window 0: the entropy alone).
    Computed in float64 from the target's float32 logits."""

    def rule_keeps(block_logits, block_hidden, i, token, proposal) -> bool:
        probs = torch.softmax(block_logits[i].double(), 0)
        if rule == "top_alpha":
            statistic = float(probs[token] / probs.max())
            keep = statistic >= knob
        else:
            statistic = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
            later = range(i + 1, min(i + window, k - 1) + 1)
            keep = statistic >= knob and (
                window == 0 or len(later) > 0 and all(int(block_logits[j].argmax()) == proposal[j] for j in later)
            )
        trace.mismatches += 1
        trace.statistics.append(statistic)
        trace.margins.append(abs(statistic - knob))
        trace.accepted_mismatches += int(keep)
        return keep

    return _greedy_sd(target, lambda ids: _propose(draft, ids, k), prompt_ids, max_tokens, trace.argmax_gaps,
                      rule_keeps)
