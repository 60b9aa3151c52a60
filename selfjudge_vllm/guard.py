"""Guarded serving, the pure part (no vLLM import): the guard's configuration, its
anytime-valid confidence sequence for the live change rate, and its state.

The server re-runs a sample of relaxed requests lossless in the background and compares
(adapter_guard.py wraps the engine client for that). Each comparison is one Bernoulli draw,
"changed" or not. The guard watches the change rate r with a confidence sequence, valid
under continuous monitoring (Ville's inequality), not a fixed-n bound recomputed at every
look:

    for H0 "r <= b", the beta-mixture likelihood ratio over alternatives r' in (b, 1],
        M_t(b) = [int_b^1 r'^S (1 - r')^F dBeta(r') / Beta((b, 1])] / (b^S (1 - b)^F),
    after S changes and F unchanged comparisons, is a nonnegative supermartingale under any
    r <= b (each factor r'/b or (1 - r')/(1 - b) has mean <= 1 when r' > b >= r), so by
    Ville's inequality P(some t has M_t(b) >= 1/delta) <= delta.

The lower bound at t is the smallest b with M_t(b) < 1/delta (a 1 - delta one-sided bound,
valid simultaneously at every t); the upper bound is the mirror image (alternatives in
[0, b)). The two-sided interval the guard reports spends delta/2 on each side, so by a union
bound it covers at level 1 - delta (with delta on each side it would be a 1 - 2 delta
interval). The fallback is a one-sided test and spends all of delta: with `action: fallback`
the guard falls back when M_t(budget) >= 1/delta, i.e. when the one-sided 1 - delta lower
bound exceeds the budget; a server whose true change rate is within budget falls back with
probability at most delta over its whole life.

What the sequence is made of (issue 44): sampling is decided when a comparable request
arrives, before anything about its response is known. A sampled request that arrives while
max_pending sampled requests are pending is skipped: left out of the sequence, only counted.
Whether one is skipped depends on earlier requests alone (the pending count at its arrival),
never on its own response, so under the guard's assumption that the outcomes of sampled
requests are independent and identically distributed, the requests admitted are again an
i.i.d. sequence at the same rate (optional skipping) and the bounds and the fallback hold
for them. Counting skipped ones unchanged instead needs no such assumption but blinds the
fallback under sustained overload (the skipped share dilutes the rate the lower bound and
the test see); dropping them has its own cost when outcomes are not independent over time: a
burst of similar prompts whose long, changed responses fill max_pending has its later
requests skipped, so the rate then describes the admitted requests and under-represents such
bursts. Every admitted request ends as exactly one outcome: compared (changed or not), or
missing: abandoned (its response was cut off: client gone, aborted, failed) or failed (no
comparable result: its shadow could not be prepared, errored or was aborted). The sequence
is the admitted requests in sampling order, each one's outcome being whether its response,
had it run to its end, differs from the lossless one. At every look the statistics are over
all N requests admitted so far, every one without a comparison (still pending, or missing)
counted unchanged for the lower bounds and the fallback and changed for the upper bound.
M_t(b) depends on the counts alone and grows when an unchanged outcome is replaced by a
change (the mixture's integrand gains the factor r'(1 - b) / ((1 - r') b) > 1 for r' > b),
so at every look the observed statistic is at most the full-information one at the same N
(for the upper bound likewise, the mirror process with changed and unchanged swapped);
Ville's inequality bounds the full-information process at every N at once, so every look is
covered, whatever order outcomes arrive in and whatever made an outcome missing (it may
depend on the response: degenerate relaxed outputs are the likeliest to be cut off). So
nothing waits for an earlier outcome: a reorder buffer in sampling order would let one
stalled or very long response hold back every later outcome (and the fallback) for as long
as it runs. Only the pending requests' places are kept, at most max_pending.
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from selfjudge_vllm.meaning import DEFAULT_THRESHOLDS, LOOP_CHECK_VERSION, new_loop

# The mixing prior of the confidence sequence: uniform on the rate.
PRIOR_A, PRIOR_B = 1.0, 1.0


class GuardConfig(BaseModel):
    """The `guard` section of the `selfjudge` config (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Share of relaxed, comparable requests re-run lossless; 0 turns the guard off.
    sample_share: float = Field(default=0.0, ge=0.0, le=1.0)
    # What a change is: any token of the response (text); its answer: the last match of
    # `answer_pattern`, or without one the final number (the number after '####'); or its
    # meaning: a new repetition loop, or the embedding scorer's cosine (meaning.py) below
    # `meaning_threshold`. None: the certified operating point's measure (answer for
    # answer_changes, meaning for meaning_changes by the embedding scorer), else text.
    measure: Literal["text", "answer", "meaning"] | None = None
    answer_pattern: str | None = None
    # None: the certified point's embedding threshold, else the embedding scorer's default.
    meaning_threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    # Largest change rate promised; None: the certified operating point's own budget
    # (`selfjudge calibrate`), required otherwise.
    budget: float | None = Field(default=None, gt=0.0, lt=1.0)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    action: Literal["report", "fallback"] = "report"
    # Shadows running at once; a sampled request whose response ends beyond it waits its turn.
    max_in_flight: int = Field(default=4, ge=1)
    # Sampled requests awaiting their outcome at once (response running, shadow queued or
    # running); one sampled while max_pending are pending is skipped at arrival and counted.
    max_pending: int = Field(default=1000, ge=1)
    # A file the fallback is written to and read back from at start-up, so a restarted server
    # stays lossless; without it a restart starts relaxed again.
    state_file: str | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _pattern(self) -> "GuardConfig":
        if self.answer_pattern is not None:
            if self.measure != "answer":
                raise ValueError("guard.answer_pattern goes with measure 'answer'")
            try:
                re.compile(self.answer_pattern)
            except re.error as exc:
                raise ValueError(f"guard.answer_pattern is not a valid regex ({exc})") from None
        if self.meaning_threshold is not None and self.measure not in ("meaning", None):
            raise ValueError("guard.meaning_threshold goes with measure 'meaning'")
        return self

    @property
    def enabled(self) -> bool:
        return self.sample_share > 0.0


def _log_mixture_above(changes: int, kept: int, bound: float) -> float:
    """log M_t(bound) for H0 "rate <= bound" (mixture over rates above it)."""
    from scipy import special

    a, b = PRIOR_A + changes, PRIOR_B + kept
    tail = special.betaincc(a, b, bound)
    prior_tail = special.betaincc(PRIOR_A, PRIOR_B, bound)
    if tail <= 0.0:
        return -math.inf
    return (special.betaln(a, b) - special.betaln(PRIOR_A, PRIOR_B) + math.log(tail) - math.log(prior_tail)
            - changes * math.log(bound) - kept * math.log1p(-bound))


def _log_mixture_below(changes: int, kept: int, bound: float) -> float:
    """log of the mirror process for H0 "rate >= bound" (mixture over rates below it)."""
    return _log_mixture_above(kept, changes, 1.0 - bound)


def exceeds(changes: int, kept: int, budget: float, delta: float) -> bool:
    """Anytime-valid evidence that the change rate is above `budget` at level delta."""
    return _log_mixture_above(changes, kept, budget) >= math.log(1.0 / delta)


def _bisect(inside, lo=0.0, hi=1.0, tol=1e-6) -> float:
    """The boundary of a set of rates that is an interval ending at `hi` (inside(hi) True)."""
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if inside(mid) else (mid, hi)
    return hi


def lower_bound(changes: int, kept: int, delta: float) -> float:
    """The smallest rate not rejected as too low: a 1 - delta lower bound valid at every t."""
    if changes == 0:
        return 0.0
    target = math.log(1.0 / delta)
    return _bisect(lambda b: _log_mixture_above(changes, kept, b) < target, 1e-9, 1 - 1e-9)


def upper_bound(changes: int, kept: int, delta: float) -> float:
    """The largest rate not rejected as too high: a 1 - delta upper bound valid at every t."""
    if kept == 0:
        return 1.0
    return 1.0 - lower_bound(kept, changes, delta)


def comparisons_to_fall_back(budget: float, delta: float) -> int:
    """How many comparisons, all changed, it takes before the guard falls back."""
    t = 1
    while not exceeds(t, 0, budget, delta):
        t += 1
    return t


SKIPPED, ABANDONED, FAILED = "skipped", "abandoned", "failed"  # the missing outcomes


class Comparison(NamedTuple):
    """A compared request's outcome: what changed against its lossless shadow."""

    text_changed: bool
    answer_changed: bool
    meaning_changed: bool = False


class MeaningComparer:
    """The guard's meaning measure, decided as calibrate's meaning_changes decides with the
    embedding scorer: identical texts unchanged, else a new repetition loop in the relaxed
    response, else the embedding scorer's cosine below the threshold. The server loads the
    model at start-up (load(); the process's one model, which the comparisons then use); a
    model that fails to load then, or later, fails each
    comparison at once (counted failed, logged once by the caller), not a load per shadow."""

    def __init__(self, threshold: float, embedder_factory=None):
        self.threshold, self.embedder_factory, self.embedder = threshold, embedder_factory, None
        self.load_error: Exception | None = None
        self._lock = threading.Lock()  # shadows compare from worker threads, max_in_flight at once

    def load(self) -> None:
        with self._lock:
            if self.load_error is not None:
                raise self.load_error
            if self.embedder is None:
                from selfjudge_vllm.meaning import shared_sentence_embedder

                try:
                    self.embedder = (self.embedder_factory or shared_sentence_embedder)()
                except Exception as exc:
                    self.load_error = exc
                    raise

    def changed(self, lossless: str, relaxed: str) -> bool:
        if lossless == relaxed:
            return False
        if new_loop(lossless, relaxed) is not None:
            return True
        self.load()
        with self._lock:
            return self.embedder.cosine([relaxed], [lossless])[0] < self.threshold


@dataclass
class GuardState:
    """What the guard has seen; one per engine client, driven from its event loop.

    The statistics at every look are over every sampled request admitted so far (not skipped),
    the ones without a comparison (pending, abandoned, failed) counted conservatively
    (see the module docstring); nothing waits for an earlier outcome, and only the pending
    requests' places are kept (at most max_pending)."""

    config: GuardConfig
    budget: float
    measure: str = "text"
    answer_pattern: str | None = None
    meaning_threshold: float | None = None  # measure "meaning": the embedding scorer's threshold
    sampled: int = 0  # comparable requests sampled at arrival, skipped ones included
    compared: int = 0
    text_changed: int = 0
    answer_changed: int = 0
    meaning_changed: int = 0
    meaning_failure_logged: bool = False
    skipped: int = 0  # sampled while max_pending were pending: not in the sequence, only counted
    abandoned: int = 0  # the user's response did not run to its end: no shadow
    failed: int = 0  # no comparable result: the shadow could not be prepared, errored or was aborted
    in_flight: int = 0
    max_in_flight_seen: int = 0
    fell_back: bool = False
    explicit_after_fallback: int = 0
    reason: str = ""
    _rng: random.Random = field(default_factory=random.Random)
    _pending: set = field(default_factory=set)  # places of the sampled requests awaiting their outcome
    _ready: deque = field(default_factory=deque)  # shadows waiting for a slot, in readiness order

    def __post_init__(self):
        self._rng = random.Random(self.config.seed)
        self.meaning = MeaningComparer(self.meaning_threshold) if self.measure == "meaning" else None

    @property
    def delta(self) -> float:
        return 1.0 - self.config.confidence

    @property
    def changes(self) -> int:
        return {"answer": self.answer_changed, "meaning": self.meaning_changed}.get(self.measure, self.text_changed)

    @property
    def admitted(self) -> int:
        """Sampled requests not skipped: the sequence's length so far."""
        return self.sampled - self.skipped

    @property
    def missing(self) -> int:
        return self.abandoned + self.failed

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def unknown(self) -> int:
        """Admitted requests without a comparison, now or for good (pending and missing)."""
        return self.admitted - self.compared

    @property
    def queued(self) -> int:
        return len(self._ready)

    def admit(self) -> int | None:
        """At a comparable request's arrival: its place in the sampling order when sampled and
        admitted, else None (not sampled, or sampled and skipped: max_pending are pending)."""
        if not self._rng.random() < self.config.sample_share:
            return None
        seq, self.sampled = self.sampled, self.sampled + 1
        if len(self._pending) >= self.config.max_pending:
            self.skipped += 1  # decided from the past alone: left out of the sequence
            return None
        self._pending.add(seq)
        return seq

    def resolve(self, seq: int, outcome) -> str | None:
        """Sampled request `seq` ended: a Comparison (or its fields), or ABANDONED or FAILED.
        Counts it at once, whatever earlier requests are still pending; returns the fallback
        message when this look triggers it."""
        if seq not in self._pending:
            raise ValueError(f"sampled request {seq} resolved twice or never sampled")
        self._pending.discard(seq)
        if outcome in (ABANDONED, FAILED):
            setattr(self, outcome, getattr(self, outcome) + 1)
        else:
            comparison = Comparison(*outcome)
            self.compared += 1
            self.text_changed += comparison.text_changed
            self.answer_changed += comparison.answer_changed
            self.meaning_changed += comparison.meaning_changed
        if (self.config.action == "fallback" and not self.fell_back
                and exceeds(self.changes, self._kept_low, self.budget, self.delta)):
            self.fell_back = True
            others = (f", with {self.unknown} more sampled without a comparison (pending, abandoned or failed) "
                      "counted unchanged") if self.unknown else ""
            self.reason = (f"{self.measure} changed in {self.changes} of {self.compared} shadow comparisons{others}; "
                           f"the change rate's {100 * self.config.confidence:g}% one-sided anytime-valid lower "
                           f"bound {100 * self.fallback_bound():.2f}% exceeds the budget {100 * self.budget:g}%")
            return self.reason
        return None

    def queue_shadow(self, job) -> None:
        self._ready.append(job)

    def next_shadow(self):
        """The next queued shadow when a slot is free (the slot is taken), else None."""
        if not self._ready or self.in_flight >= self.config.max_in_flight:
            return None
        self.in_flight += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        return self._ready.popleft()

    def end_shadow(self) -> None:
        self.in_flight -= 1

    # Admitted requests without a comparison count unchanged below and changed above (see the
    # module docstring); skipped ones are not in the sequence.
    @property
    def _kept_low(self) -> int:
        return self.compared - self.changes + self.unknown

    # The reported interval: delta/2 per side, so that both ends hold together at 1 - delta.
    def lower(self) -> float:
        return lower_bound(self.changes, self._kept_low, self.delta / 2)

    def upper(self) -> float:
        return upper_bound(self.changes + self.unknown, self.compared - self.changes, self.delta / 2)

    def fallback_bound(self) -> float:
        """The one-sided 1 - delta lower bound the fallback compares with the budget."""
        return lower_bound(self.changes, self._kept_low, self.delta)


def answer_of(text: str, pattern: str | None) -> str | None:
    """The answer the guard compares under measure 'answer'."""
    from selfjudge_vllm.answers import numeric_answer, pattern_answer

    return numeric_answer(text) if pattern is None else pattern_answer(text, re.compile(pattern))


class GuardSettings(NamedTuple):
    budget: float
    measure: str  # "text", "answer" or "meaning"
    answer_pattern: str | None = None  # measure "answer"
    meaning_threshold: float | None = None  # measure "meaning"


def resolve(config, certified_evidence: dict | None) -> GuardSettings:
    """The guard's budget and measure: its own settings, else those of the certified operating
    point it serves (`selfjudge calibrate`'s evidence), else measure text. A certificate on
    accuracy, judged loss or code answers does not carry over: the guard compares responses,
    it has no references, tests or LLM judge; nor does one on meaning by the LLM scorer (the
    guard's meaning measure is the embedding scorer's)."""
    guard = config.guard
    evidence = certified_evidence or {}
    measure, pattern = guard.measure, guard.answer_pattern
    certified = evidence.get("measure")
    scorer = evidence.get("scorer") or {}
    if guard.budget is None or measure is None:
        kind = (evidence.get("answer") or {}).get("kind")
        code_answers = certified == "answer_changes" and kind == "code"  # only answer_changes reads answers
        if guard.budget is None and (certified not in ("answer_changes", "text_changes", "meaning_changes")
                                     or code_answers):
            raise ValueError(f"guard.budget is not set and operating point {config.operating_point!r} carries no "
                             "certified change budget the guard can watch (it needs answer_changes, "
                             f"text_changes or meaning_changes, not {certified or 'none'}"
                             f"{' on code' if code_answers else ''}); set guard.budget")
        if measure is None:
            if certified == "meaning_changes" and scorer.get("scorer") != "embedding":
                raise ValueError(f"operating point {config.operating_point!r} is certified on meaning changes by "
                                 f"{'the ' + scorer['scorer'] if scorer.get('scorer') else 'an unrecorded'} scorer; "
                                 "the guard compares meaning with the embedding scorer only: set guard.measure "
                                 "(and guard.budget for another promise)")
            if certified == "meaning_changes" and scorer.get("loop_check") != LOOP_CHECK_VERSION:
                raise ValueError(f"operating point {config.operating_point!r} was certified with the loop check "
                                 f"{scorer.get('loop_check') or 'of before loop checks were versioned'}, the guard's "
                                 f"is {LOOP_CHECK_VERSION}: calibrate again, or set guard.measure")
            measure = ("meaning" if certified == "meaning_changes"
                       else "answer" if certified == "answer_changes" and kind != "code" else "text")
            if measure == "answer" and pattern is None and kind == "pattern":
                pattern = (evidence.get("answer") or {}).get("pattern")
    budget = guard.budget if guard.budget is not None else evidence["budget"]
    threshold = None
    if guard.meaning_threshold is not None and measure != "meaning":
        raise ValueError(f"guard.meaning_threshold goes with measure 'meaning'; the guard's measure is {measure!r}")
    if measure == "meaning":
        certified_threshold = (scorer.get("threshold") if certified == "meaning_changes"
                               and scorer.get("scorer") == "embedding" else None)
        threshold = next(t for t in (guard.meaning_threshold, certified_threshold, DEFAULT_THRESHOLDS["embedding"])
                         if t is not None)
    return GuardSettings(float(budget), measure, pattern, threshold)
