"""Relaxed-acceptance rules and how a verification step applies them (plain torch, no vLLM).

Every draft token row of a step is decided by one rule with one knob:

    judge       the trained SelfJudge head: accept when head(hidden) >= threshold logit
    top_alpha   training-free: accept when p(draft) >= alpha * p(top-1), i.e.
                logit(draft) - max logit >= log(alpha)
    entropy     training-free, in the spirit of FLy (arXiv 2511.22972): accept a draft token
                when the target's entropy there is >= min_entropy nats (several continuations
                are plausible) and the target agrees with the next `window` draft tokens of
                the same request (it does not "correct" the substitution right away)
    fly         vLLM's own FLy verifier (0.33+, `rejection_sample_method="fly"`), decided here
                so it can be chosen per request and compared on one server: accept a draft
                token when the entropy of the target's top-`fly_top_k` probabilities there is
                >= fly_threshold nats and the next `fly_window` draft tokens (all of them must
                exist) are the target's own choices. Greedy decisions equal vLLM 0.34.0's
                kernel (tests/mrv2_verification_check.py); for sampled requests FLy's window
                uses the native random acceptance of the later drafts, which is drawn after
                this decision, so the window here uses the target's top choice instead.
    off         lossless: nothing accepted beyond standard verification

An accepted token is forced through verification by making it the only token with
probability mass in its row; all other rows are left untouched, so vLLM's standard
verification (greedy argmax match or rejection sampling, recovered token included) treats
them exactly as without the plugin. A draft token whose processed logit is -inf (banned,
outside top-k/top-p, forbidden by a grammar) is never accepted. Everything runs on the
model's device without host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

OFF, JUDGE, TOP_ALPHA, ENTROPY, FLY = 0, 1, 2, 3, 4
# Rules whose decision reads the later drafts of the same request.
WINDOW_RULES = frozenset({ENTROPY, FLY})


def _logit(threshold: float) -> float:
    """sigmoid(z) >= t  <=>  z >= log(t / (1 - t)); comparing logits skips the sigmoid."""
    return math.log(threshold) - math.log1p(-threshold)


@dataclass(frozen=True)
class RuleSpec:
    """One acceptance rule, as config validation, request admission, the step and the
    benchmarks all see it."""

    name: str  # in the config section, `selfjudge_rule` and the benchmarks
    rule_id: int  # what the step compares (RowRule.rule)
    knob: str  # its knob: config key and request key `selfjudge_<knob>`
    to_step: Callable[[float], float]  # knob -> the units the step compares against
    from_step: Callable[[float], float]  # and back, for messages
    request_keys: tuple[str, ...]  # request keys that belong to this rule
    description: str
    # Config key of the server's floor on the knob: a request may not loosen the rule below
    # it (every knob loosens the rule as it decreases); HTTP 400 at admission.
    floor: str = ""


RULES = {spec.name: spec for spec in (
    RuleSpec("judge", JUDGE, "threshold", _logit, lambda z: 1 / (1 + math.exp(-z)),
             ("threshold", "operating_point"), "the trained head: accept when P(keeps meaning) >= threshold",
             "min_threshold"),
    RuleSpec("top_alpha", TOP_ALPHA, "alpha", lambda a: math.log(a) if a > 0 else -math.inf, math.exp,
             ("alpha",), "accept when p(draft) >= alpha x p(top-1)", "min_alpha"),
    RuleSpec("entropy", ENTROPY, "min_entropy", float, float, ("min_entropy",),
             "accept when the target's entropy >= min_entropy nats and it agrees with the next drafts",
             "min_entropy_floor"),
    RuleSpec("fly", FLY, "fly_threshold", float, float, ("fly_threshold",),
             "FLy: accept when the target's top-k entropy >= fly_threshold nats and the next fly_window drafts "
             "are its own choices", "min_fly_threshold"),
)}
RULE_NAMES = tuple(RULES)
RULE_BY_ID = {spec.rule_id: spec for spec in RULES.values()}

# A logit so large that softmax gives its token probability exactly 1.0 in float32 (every
# other entry becomes exp(-1e30) == 0), yet finite, so `x - max` never computes inf - inf.
FORCED_LOGIT = 1e30


def forced_logit(dtype: torch.dtype) -> float:
    """FORCED_LOGIT as the logits' dtype can hold it. Model runner V2 verifies the model's own
    logits tensor when no request of a chunk needs processing (greedy, or temperature 1.0
    and nothing else), so it can be float16, where 1e30 is +inf and the kernels' float32
    `exp(x - max)` becomes exp(inf - inf) = NaN. float16's largest finite value (65504)
    still leaves every other entry exp(<= -65000) == 0 after the upcast."""
    return min(torch.finfo(dtype).max, FORCED_LOGIT)


@dataclass(frozen=True)
class RowRule:
    """One request's rule, with its knob in the units the step compares against:
    judge: threshold logit; top_alpha: log(alpha); entropy: minimum entropy in nats."""

    rule: int
    knob: float
    # Scope "reasoning": relaxed only inside the request's reasoning span, which ends at this
    # token id (and, when given, begins at `reasoning_start`); None: relaxed everywhere.
    reasoning_end: int | None = None
    reasoning_start: int | None = None

    @staticmethod
    def named(name: str, knob: float) -> "RowRule":
        """The rule `name` (RULES) with its knob in user units (threshold, alpha, nats)."""
        spec = RULES[name]
        return RowRule(spec.rule_id, spec.to_step(knob))

    @staticmethod
    def top_alpha(alpha: float) -> "RowRule":
        return RowRule.named("top_alpha", alpha)

    def describe(self) -> str:
        spec = RULE_BY_ID.get(self.rule)
        if spec is None:
            return "off (lossless)"
        return f"{spec.name} ({spec.knob} {spec.from_step(self.knob):.4f})"


LOSSLESS = RowRule(OFF, math.inf)


# Columns of a step's per-request table: one float32 row per request (token ids and draft
# counts are exact in float32 below 2**24), so a step stages one buffer and makes one copy.
RULE_COLUMN, KNOB_COLUMN, END_COLUMN, DRAFTS_COLUMN = range(4)
TABLE_COLUMNS = 4


def request_values(rule: RowRule) -> tuple[float, float, float]:
    """A request's rule, knob and reasoning end-marker id (-1: none) as table columns."""
    return float(rule.rule), rule.knob, -1.0 if rule.reasoning_end is None else float(rule.reasoning_end)


@dataclass
class StepRules:
    """The rules of one step's draft rows, expanded on the device from a per-request table.

    `uniform` is set when every request shares one rule (no per-row tensors, no copies);
    otherwise `rule_ids`/`knobs` hold one entry per draft row. When a window rule (entropy,
    fly) is used, `drafts_after` holds the number of draft tokens after each row in its
    request, and `entropy_rows` / `fly_rows` the draft rows of the requests using each
    (None: every row): the vocabulary-wide work is done on those rows only.
    """

    uniform: RowRule | None
    rule_ids: torch.Tensor | None = None
    knobs: torch.Tensor | None = None
    present: frozenset[int] = frozenset()
    drafts_after: torch.Tensor | None = None
    entropy_rows: torch.Tensor | None = None
    fly_rows: torch.Tensor | None = None
    # Requests with a reasoning scope: each row's end-marker id (-1: none) and the first row
    # of its request; a row at or after a drafted end marker is verified exactly.
    end_ids: torch.Tensor | None = None
    request_first_row: torch.Tensor | None = None

    @staticmethod
    def needs_table(rules: list[RowRule], counts: list[int]) -> bool:
        """Whether a step of these requests needs per-row tensors (else: `uniform` alone)."""
        return (len(set(rules)) > 1 or any(rule.reasoning_end is not None for rule in rules)
                or any(rule.rule in WINDOW_RULES for rule, count in zip(rules, counts) if count))

    @classmethod
    def expand(cls, rules: list[RowRule], counts: list[int], table: torch.Tensor | None) -> "StepRules":
        """The step's rules from its requests in batch order: `rules` and `counts` on the host
        (what the step needs to know without reading the device), `table` the same requests'
        [requests, TABLE_COLUMNS] values already on the device (None when `needs_table` is
        false). Rows are expanded there without a host synchronisation: every output size
        is known on the host."""
        present = frozenset(rule.rule for rule, count in zip(rules, counts) if count)
        distinct = set(rules)
        if table is None:
            return cls(next(iter(distinct), LOSSLESS), present=present)
        num_rows = sum(counts)
        device = table.device
        drafts = table[:, DRAFTS_COLUMN].long()
        request_of_row = torch.repeat_interleave(torch.arange(len(counts), device=device), drafts,
                                                 output_size=num_rows)
        first_row = (torch.cumsum(drafts, 0) - drafts).index_select(0, request_of_row)
        rule_ids = table[:, RULE_COLUMN].to(torch.int8).index_select(0, request_of_row)
        drafts_after = entropy_rows = fly_rows = None
        if present & WINDOW_RULES:
            row = torch.arange(num_rows, device=device)
            drafts_after = (drafts - 1).index_select(0, request_of_row) - (row - first_row)
            if len(distinct) > 1:
                def rows_using(rule_id):
                    # In order: a stable sort puts them first, and their number is known on
                    # the host (boolean indexing would wait for the device).
                    if rule_id not in present:
                        return None
                    count = sum(c for rule, c in zip(rules, counts) if rule.rule == rule_id)
                    return torch.argsort((rule_ids != rule_id).to(torch.int8), stable=True)[:count]

                entropy_rows, fly_rows = rows_using(ENTROPY), rows_using(FLY)
        end_ids = request_first_row = None
        if any(rule.reasoning_end is not None for rule in rules):
            end_ids = table[:, END_COLUMN].long().index_select(0, request_of_row)
            request_first_row = first_row
        if len(distinct) <= 1:
            return cls(next(iter(distinct), LOSSLESS), present=present, drafts_after=drafts_after,
                       end_ids=end_ids, request_first_row=request_first_row)
        knobs = table[:, KNOB_COLUMN].index_select(0, request_of_row)
        return cls(None, rule_ids, knobs, present, drafts_after, entropy_rows, fly_rows, end_ids, request_first_row)

    @classmethod
    def build(cls, rows: Iterable[tuple[RowRule, int]], device) -> "StepRules":
        """rows: (rule, number of draft tokens) per request, in batch order (tests and
        benchmarks; serving stages the table through RequestRuleTable)."""
        rows = list(rows)
        rules, counts = [rule for rule, _ in rows], [count for _, count in rows]
        table = None
        if cls.needs_table(rules, counts):
            table = torch.tensor([request_values(rule) + (float(count),) for rule, count in rows],
                                 dtype=torch.float32).to(device)
        return cls.expand(rules, counts, table)

    def selects(self, rule: int):
        """Rows using `rule`: a bool, or a [n] mask when rows differ."""
        if self.uniform is not None:
            return self.uniform.rule == rule
        return self.rule_ids == rule

    def knob(self):
        return self.uniform.knob if self.uniform is not None else self.knobs


class JudgeHead:
    """The trained head: score = hidden . weight + evidence . scalar_weight + bias (a logit).

    `weight` is None for a head that does not read the hidden state; `logit_features` names
    the columns of `evidence` (selfjudge_vllm/features.py) that `scalar_weight` multiplies."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor,
                 scalar_weight: torch.Tensor | None = None, logit_features: tuple[str, ...] = ()):
        self.weight = None if weight is None else weight.to(torch.float32).reshape(-1)
        self.bias = bias.to(torch.float32).reshape(())
        self.scalar_weight = None if scalar_weight is None else scalar_weight.to(torch.float32).reshape(-1)
        self.logit_features = tuple(logit_features)
        if (self.scalar_weight is None) != (not self.logit_features) or (
                self.scalar_weight is not None and self.scalar_weight.numel() != len(self.logit_features)):
            raise ValueError("scalar_weight needs one entry per logit feature")

    @classmethod
    def from_artifact(cls, artifact) -> "JudgeHead":
        return cls(artifact.weight, artifact.bias, artifact.scalar_weight, artifact.config.logit_features)

    @property
    def reads_hidden(self) -> bool:
        return self.weight is not None

    def to(self, device: torch.device) -> "JudgeHead":
        if self.bias.device != device:
            self.bias = self.bias.to(device)
            self.weight = None if self.weight is None else self.weight.to(device)
            self.scalar_weight = None if self.scalar_weight is None else self.scalar_weight.to(device)
        return self

    def judge_logits(self, hidden: torch.Tensor | None, evidence: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [n, H] (any float dtype) and/or evidence [n, len(logit_features)] -> [n]
        float32 logits."""
        rows = (hidden if hidden is not None else evidence).shape[0]
        out = self.bias.expand(rows)
        if self.weight is not None:
            out = torch.addmv(out, hidden.to(torch.float32), self.weight)
        if self.scalar_weight is not None:
            out = torch.addmv(out, evidence.to(torch.float32), self.scalar_weight)
        return out


def _per_row(logits: torch.Tensor, rows: torch.Tensor | None, reduce) -> torch.Tensor:
    """reduce(chunk [c, V]) -> [c] for each row of `logits` (or each row `rows` lists), a
    bounded chunk of rows at a time, so the float32 temporaries never span the batch."""
    from selfjudge_vllm.features import chunk_rows_for

    chunk_rows = chunk_rows_for(logits)
    count = logits.shape[0] if rows is None else rows.shape[0]
    out = torch.empty(count, dtype=torch.float32, device=logits.device)
    for start in range(0, count, chunk_rows):
        chunk = (logits[start : start + chunk_rows] if rows is None
                 else logits.index_select(0, rows[start : start + chunk_rows]))
        out[start : start + chunk_rows] = reduce(chunk)
    return out


def row_entropy(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of the softmax of each row of `logits` (or of the rows `rows` lists)."""
    return _per_row(logits, rows,
                    lambda chunk: torch.special.entr(torch.softmax(chunk, dim=-1, dtype=torch.float32)).sum(-1))


def topk_entropy(logits: torch.Tensor, rows: torch.Tensor | None = None, top_k: int = 3) -> torch.Tensor:
    """FLy's entropy (nats): -sum p log p over the `top_k` largest probabilities of each row's
    softmax (the rows `rows` lists, or all), in float32."""
    k = min(top_k, logits.shape[-1])

    def reduce(chunk):
        chunk = chunk.float()
        log_p = chunk.topk(k, dim=-1).values - chunk.logsumexp(-1, keepdim=True)
        p = log_p.exp()
        return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)

    return _per_row(logits, rows, reduce)


def entropy_gate(entropy: torch.Tensor, agrees: torch.Tensor, min_entropy, drafts_after, window: int,
                 full_window: bool = False):
    """A window rule's decision per row (see the module docstring), for rows that are every
    draft row of their requests, in order: `entropy` of the row, whether the target's top
    choice `agrees` with the row's draft, and the number of `drafts_after` it in its request.
    entropy: the window stops at the request's end, but needs one later draft; fly
    (`full_window`): all `window` later drafts must exist, and a window of 0 accepts nothing."""
    if full_window:
        confirmed = (drafts_after >= window) if window > 0 else torch.zeros_like(agrees)
    else:
        # Evidence needs at least one later draft token; the window stops at the request's end.
        confirmed = drafts_after > 0 if window > 0 else torch.ones_like(agrees)
    n = agrees.shape[0]
    for offset in range(1, min(window, n - 1) + 1):
        later = torch.zeros_like(agrees)
        later[: n - offset] = agrees[offset:]
        confirmed &= later | (drafts_after < offset)
    # Offsets past the step's rows have no later row to agree: only rows with fewer drafts
    # after them than the offset pass (the request ends first).
    for offset in range(max(1, n), window + 1):
        confirmed &= drafts_after < offset
    return (entropy >= min_entropy) & confirmed


def at_or_after_end_marker(draft_token_ids: torch.Tensor, end_ids: torch.Tensor,
                           request_first_row: torch.Tensor) -> torch.Tensor:
    """[n] rows whose request drafted its reasoning end marker at or before them in this
    step (a running count of end markers per request; no host synchronisation)."""
    seen = torch.cumsum((draft_token_ids == end_ids).to(torch.int32), 0)
    before = torch.cat([seen.new_zeros(1), seen])[request_first_row]
    return seen - before > 0


def decide_and_force_(
    step: StepRules,
    draft_token_ids: torch.Tensor,
    processed_logits: torch.Tensor,
    hidden: torch.Tensor | None = None,
    head: JudgeHead | None = None,
    entropy_window: int = 2,
    evidence: torch.Tensor | None = None,
    logit_rows: torch.Tensor | None = None,
    fly_window: int = 6,
    fly_top_k: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decide every draft row with its rule and force the accepted ones, in place.

    draft_token_ids: [n] (padding and placeholders are -1, never accepted).
    processed_logits: target logits after penalties, bans, grammar masks and
        temperature/top-k/top-p: [n, V], row i verifying draft i, or any [rows, V] with
        `logit_rows` [n] naming the row that verifies each draft (model runner V2 verifies
        the drafts and the bonus rows in one tensor), in any float dtype (V2 may hand in
        the model's own float16/bfloat16 tensor). Each accepted draft's entry becomes
        forced_logit(dtype): greedy verification sees argmax == draft, random verification sees
        p_target(draft) == 1 >= any draw. Other rows and entries are untouched. A caller
        that needs the logits afterwards (returned logprobs) writes back the draft entries
        it read before (draft_entries / set_draft_entries_).
    hidden: [n, H] target hidden state at each draft token's own position (judge rule).
    evidence: [n, k] the head's logit features of each draft row (features.py).

    Returns (accept, valid) boolean [n] masks. Ties (at the knob) are accepted. Work over
    the vocabulary happens only for rules present in the step, on the rows that use them.
    """
    draft_logit = draft_entries(processed_logits, draft_token_ids, logit_rows)
    valid = draft_token_ids >= 0
    accept = torch.zeros_like(valid)
    knob = step.knob()
    if JUDGE in step.present:
        if head is None or (head.reads_hidden and hidden is None) or (head.logit_features and evidence is None):
            raise ValueError("the judge rule needs the head and the features it reads")
        accept |= step.selects(JUDGE) & (head.judge_logits(hidden, evidence) >= knob)
    if TOP_ALPHA in step.present:
        row_max = processed_logits.amax(-1)
        margin = draft_logit - (row_max if logit_rows is None else row_max.index_select(0, logit_rows))
        accept |= step.selects(TOP_ALPHA) & (margin >= knob)
    if ENTROPY in step.present:
        accept |= _window_accepts(step, ENTROPY, processed_logits, draft_token_ids, logit_rows, entropy_window)
    if FLY in step.present:
        accept |= _window_accepts(step, FLY, processed_logits, draft_token_ids, logit_rows, fly_window, fly_top_k)
    if step.end_ids is not None:
        accept &= ~at_or_after_end_marker(draft_token_ids, step.end_ids, step.request_first_row)
        # Where the target itself would end the reasoning here, the decision to stop stays
        # the target's: the row is verified exactly (one argmax pass, scoped steps only).
        top1 = processed_logits.argmax(-1)
        accept &= (top1 if logit_rows is None else top1.index_select(0, logit_rows)) != step.end_ids
    accept &= valid & (draft_logit > float("-inf"))
    forced = torch.where(accept, forced_logit(processed_logits.dtype), draft_logit)
    set_draft_entries_(processed_logits, draft_token_ids, forced, logit_rows)
    return accept, valid


def draft_entries(processed_logits: torch.Tensor, draft_token_ids: torch.Tensor,
                  logit_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[n] each draft's entry in the row that verifies it (O(1) per row; -1 reads entry 0)."""
    index = draft_token_ids.clamp(min=0).long()
    if logit_rows is None:
        return processed_logits.gather(1, index.unsqueeze(1)).squeeze(1)
    return processed_logits[logit_rows, index]


def set_draft_entries_(processed_logits: torch.Tensor, draft_token_ids: torch.Tensor, values: torch.Tensor,
                       logit_rows: torch.Tensor | None = None) -> None:
    """Write each draft's entry in the row that verifies it (the inverse of draft_entries)."""
    index = draft_token_ids.clamp(min=0).long()
    if logit_rows is None:
        processed_logits.scatter_(1, index.unsqueeze(1), values.unsqueeze(1))
    else:
        processed_logits.index_put_((logit_rows, index), values)


def _window_accepts(step: StepRules, rule_id: int, processed_logits: torch.Tensor, draft_token_ids: torch.Tensor,
                    logit_rows: torch.Tensor | None, window: int, top_k: int = 3) -> torch.Tensor:
    """[n] a window rule's decisions (entropy or fly), computed over the vocabulary only on
    the rows of the requests that use it (None: every row)."""
    rows = step.entropy_rows if rule_id == ENTROPY else step.fly_rows
    if rows is None:
        drafts, at, knob, after = draft_token_ids, logit_rows, step.knob(), step.drafts_after
    else:
        drafts, knob = draft_token_ids.index_select(0, rows), step.knob().index_select(0, rows)
        after = step.drafts_after.index_select(0, rows)
        at = rows if logit_rows is None else logit_rows.index_select(0, rows)
    top1 = processed_logits.argmax(-1)
    agrees = (top1 if at is None else top1.index_select(0, at)) == drafts
    if rule_id == ENTROPY:
        gate = entropy_gate(row_entropy(processed_logits, at), agrees, knob, after, window)
    else:
        gate = entropy_gate(topk_entropy(processed_logits, at, top_k), agrees, knob, after, window, full_window=True)
    if rows is None:
        return gate
    return torch.zeros_like(draft_token_ids, dtype=torch.bool).index_put_((rows,), gate)
