"""`selfjudge calibrate`: the fastest acceptance rule that provably meets an operator's
quality budget on their own prompts (Learn then Test; the statistics are in certify.py).

One `vllm serve` engine with the operator's target and speculative config serves every
candidate point through per-request control, so every point is paired with the lossless run
of the same engine on the same prompts. Prompts are split, seeded and by prompt id, into a
calibration part (where points are certified) and a test part (where the certified points'
risk is measured again, for the report). Greedy decoding throughout: the certificate is for
greedy serving.

    stage       what it serves
    lossless    every prompt (calibration and test), `selfjudge_enabled=false`
    certify     per rule family, its grid strictest first, on the calibration prompts; a family
                stops at its first point not certified (fixed-sequence testing), and a point
                stops early once the changes it already made rule out its certification
    test        the certified point of each family on the test prompts

Every response is persisted as it completes (OUT/store); a rerun of the same command after a
kill serves only what is missing. The first run to read a candidate binds the folder's
certificate (CERTIFICATE_BINDING); a rerun that changes it is exploratory. A store shared
between folders (a link) is bound to its response settings too, and lists every certificate
computed on it (STORE_CERTIFICATES_FILE), which each report names. Nothing here imports
vLLM: the engine is a subprocess, talked to over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfjudge_vllm import certify
from selfjudge_vllm.answers import AnswerKind
from selfjudge_vllm.files import file_sha256
from selfjudge_vllm.meaning import MEANING_MEASURES, MeaningJudge, Pair, ScorerSettings, request_text
from selfjudge_vllm.measurement import (
    Progress,
    PromptItem,
    RequestStore,
    append_jsonl,
    every_core_env,
    load_jsonl,
    log,
    measure_point,
    point_summary,
    request_options,
)
from selfjudge_vllm.rules import RULES

# Knobs per rule family, strictest first (every knob loosens its rule as it decreases). The
# judge's default grid is its artifact's `accepts_*` operating points (each accepts a share of
# the validation mismatches), which span the head's own score range.
DEFAULT_GRIDS = {
    "judge": (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1),
    "top_alpha": (0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05),
    "entropy": (4.0, 3.0, 2.0, 1.5, 1.0, 0.5),
    # vLLM's FLy default is 0.3 nats of top-3 entropy (at most ln 3 = 1.10).
    "fly": (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1),
}
LOSSLESS = "lossless"
# Exit statuses: what a script can branch on.
EXIT_RELAXED_CERTIFIED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ONLY_LOSSLESS, EXIT_INCOMPLETE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
EXIT_EXPLORATORY = 5  # the folder's certificate was computed with other settings: nothing certified
# What the served responses depend on: a rerun into the same folder must match on all of it.
BOUND_SETTINGS = ("target", "speculative_config", "selfjudge_settings", "head_sha256", "prompts_sha256",
                  "max_tokens", "dtype", "max_model_len", "test_share", "seed", "vllm_args")
# What a certificate is computed with (the experiment, as opposed to the responses): recorded in
# OUT/certificate.json before any candidate's outcome is read. A later run into the folder that
# changes any of it tests again on responses whose results were seen (a narrower --rules after a
# family failed, a grid without the point that stopped a sequence, another budget), which the
# family-wise guarantee does not cover: its result is exploratory. A measure with settings of its
# own binds them by adding an entry: key -> its value from (settings, grids).
CERTIFICATE_BINDING = {
    "measure": lambda settings, grids: settings.measure,
    "budget": lambda settings, grids: settings.budget,
    "confidence": lambda settings, grids: settings.confidence,
    "families": lambda settings, grids: sorted(grids),
    "grids": lambda settings, grids: {f: list(g) for f, g in grids.items()},
    # how answers are read decides the outcomes; text and meaning measures read no answer
    "answer": lambda settings, grids: (None if settings.measure in ("text_changes",) + MEANING_MEASURES
                                       else asdict(settings.answer)),
    # the meaning measures' scorer, its model, threshold and prompt version decide their outcomes
    "scorer": lambda settings, grids: settings.scorer_settings and settings.scorer_settings.as_dict(),
}
CERTIFICATE_FILE = "certificate.json"
# In OUT/store: the response settings the store was served with (BOUND_SETTINGS), and every
# certificate binding computed on its responses, one line each ({"folder", "binding", "date",
# "exploratory"}): a store shared by several folders shows each report the others.
STORE_SETTINGS_FILE, STORE_CERTIFICATES_FILE = "settings.json", "certificates.jsonl"
# What a shared store does not bind: each head's judge points have keys of their own
# (point_key), so one store, and its lossless responses, serves every head an operator trains.
# Its settings.json keeps the head it was begun with, whose judge points keep the plain keys.
STORE_UNBOUND_SETTINGS = ("head_sha256",)
# Server settings of the `selfjudge` section an operator may calibrate under (--selfjudge-config):
# they change what the rules decide (where relaxed acceptance applies, FLy's and the entropy
# rule's windows), so the certificate holds for them only and the served config carries them.
# The rule, its knob, the head and the floors are calibrate's to set.
SERVER_SETTINGS = ("scope", "reasoning_start_token_id", "reasoning_end_token_id", "entropy_window", "fly_window",
                   "fly_top_k")


# On a GPU, the share of its memory the judge model's `vllm serve` (--scorer-model) is given: it
# runs beside calibrate's own engine, which then needs --gpu-memory-utilization below 1 minus it.
SCORER_GPU_SHARE = 0.2


class CalibrateError(ValueError):
    """Bad input or configuration; the message says what to change."""


@dataclass
class CalibrateSettings:
    target: str
    speculative_config: dict
    prompts: Path
    out: Path
    measure: str
    budget: float
    confidence: float = 0.95
    answer: AnswerKind = field(default_factory=AnswerKind)
    head: Path | None = None
    rules: tuple[str, ...] = ()  # families; () = every rule the setup can serve
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)  # overrides of the defaults
    test_share: float = 0.3
    seed: int = 0
    max_tokens: int = 256
    concurrency: int = 16
    max_model_len: int = 2048
    dtype: str = "auto"
    vllm_args: tuple[str, ...] = ()
    selfjudge_settings: dict = field(default_factory=dict)  # SERVER_SETTINGS given
    # meaning_changes / judged_loss: who decides (meaning.py); None = the measure's defaults
    scorer: str | None = None
    scorer_model: str | None = None
    scorer_threshold: float | None = None
    max_minutes: float | None = None
    startup_timeout_s: float = 1800.0

    @property
    def delta(self) -> float:
        return 1.0 - self.confidence

    @property
    def scorer_settings(self) -> ScorerSettings | None:
        """The meaning measures' scorer, model, threshold and prompt version (None for the others)."""
        if self.measure not in MEANING_MEASURES:
            return None
        return ScorerSettings.make(self.measure, self.scorer, self.scorer_model, self.scorer_threshold)


# -- inputs ---------------------------------------------------------------------------------------


def check_settings(settings: CalibrateSettings) -> None:
    if settings.measure not in certify.MEASURES:
        raise CalibrateError(f"unknown measure {settings.measure!r}; choose one of {', '.join(certify.MEASURES)}")
    if not 0.0 < settings.budget < 1.0:
        raise CalibrateError(f"--budget must lie strictly between 0 and 1 (a share of prompts), got {settings.budget}")
    if not 0.0 < settings.confidence < 1.0:
        raise CalibrateError(f"--confidence must lie strictly between 0 and 1, got {settings.confidence}")
    if not 0.0 <= settings.test_share < 1.0:
        raise CalibrateError(f"--test-share must lie in [0, 1), got {settings.test_share}")
    answerless = ("text_changes",) + MEANING_MEASURES
    if settings.measure not in answerless and settings.answer.kind == "text":
        raise CalibrateError(f"--measure {settings.measure} needs answers: give --answer numeric, pattern or code "
                             "(or measure text_changes, meaning_changes or judged_loss)")
    if settings.measure in MEANING_MEASURES:
        try:
            settings.scorer_settings  # noqa: B018 (validates)
        except ValueError as exc:
            raise CalibrateError(str(exc)) from None
    elif (settings.scorer, settings.scorer_model, settings.scorer_threshold) != (None, None, None):
        raise CalibrateError(f"--scorer, --scorer-model and --scorer-threshold apply to --measure "
                             f"{' or '.join(MEANING_MEASURES)}, not {settings.measure}")
    unknown = [r for r in settings.rules if r not in RULES]
    if unknown:
        raise CalibrateError(f"unknown rule {unknown[0]!r}; rules: {', '.join(RULES)}")
    if "judge" in settings.rules and settings.head is None:
        raise CalibrateError("the judge family needs --head (a judge artifact from `selfjudge train`)")
    for family, grid in settings.grids.items():
        if family not in RULES:
            raise CalibrateError(f"--grid for unknown rule {family!r}; rules: {', '.join(RULES)}")
        if not grid or list(grid) != sorted(grid, reverse=True) or len(set(grid)) != len(grid):
            raise CalibrateError(f"--grid {family}: give distinct knobs strictest (largest) first, got {list(grid)}")
        for knob in grid:  # a point's store key keeps 6 significant digits: longer knobs would share keys
            if float(f"{knob:g}") != knob:
                raise CalibrateError(f"--grid {family}: {knob!r} has more significant digits than a point's key keeps "
                                     f"(6; its responses would be stored as {point_key(family, knob)}): give {knob:g}")
    if not isinstance(settings.speculative_config, dict) or "method" not in settings.speculative_config:
        raise CalibrateError("--speculative-config must be a JSON object with a 'method', as `vllm serve` takes it")
    check_selfjudge_settings(settings.selfjudge_settings)


def check_selfjudge_settings(given) -> None:
    """Only SERVER_SETTINGS, with values the plugin accepts."""
    from selfjudge_vllm.config import ConfigError, parse_section

    if not isinstance(given, dict):
        raise CalibrateError("--selfjudge-config must be a JSON object, e.g. '{\"scope\": \"reasoning\"}'")
    other = sorted(set(given) - set(SERVER_SETTINGS))
    if other:
        raise CalibrateError(f"--selfjudge-config may set {', '.join(SERVER_SETTINGS)}; not {', '.join(other)} "
                             "(calibrate chooses the rule, its knob and the head)")
    try:
        parse_section({"selfjudge": {"rule": "top_alpha", **given}})
    except ConfigError as exc:
        raise CalibrateError(f"--selfjudge-config: {exc}") from None


def prompt_rows(settings: CalibrateSettings) -> list[dict]:
    """The prompt file's rows; every row must carry what the measure needs."""
    from selfjudge_vllm.offline.prompts import PromptFileError, read_prompt_file

    try:
        rows = read_prompt_file(settings.prompts)
    except PromptFileError as exc:
        raise CalibrateError(str(exc)) from None
    needed = settings.answer.reference_field if settings.measure == "accuracy" else None
    if settings.answer.kind == "code":
        needed = "tests"  # a code answer is pass/fail: every measure but text needs the tests
    if needed:
        missing = [r["id"] for r in rows if r.get(needed) is None]
        if missing:
            raise CalibrateError(f"--measure {settings.measure} with --answer {settings.answer.kind} needs {needed!r} "
                                 f"in every prompt; {len(missing)} of {len(rows)} lack it (first: {missing[0]!r})")
    return rows


def without_label_prompts(settings: CalibrateSettings, rows: list[dict]) -> list[dict]:
    """The rows less any prompt the head was labelled on (its provenance's digests of the text
    each prompt is served as: offline/prompts.prompt_digests), each drop said: a head's errors
    on its own training prompts are not those of traffic, so they would bias its certificate."""
    if settings.head is None:
        return rows
    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.offline.prompts import PROMPT_DIGESTS_KEY, TEXT_DIGEST_PREFIX, prompt_digests

    labelled = JudgeArtifact.load(settings.head).config.provenance.get(PROMPT_DIGESTS_KEY)
    if labelled is None:
        log(f"calibrate: warning: {settings.head} records no digests of the prompts it was labelled on (trained "
            "before they were recorded); make sure --prompts holds none of them")
        return rows
    labelled = set(labelled)
    if not any(d.startswith(TEXT_DIGEST_PREFIX) for d in labelled):
        log(f"calibrate: warning: {settings.head} records its label prompts by their exact content only (labelled "
            "before the digests of their served text): the same prompt given otherwise here (a rendered 'prompt' "
            "for 'messages', other whitespace, extra message keys) is not caught; make sure --prompts holds none "
            "of them")
    tokenizer = target_tokenizer(settings.target) if any("messages" in r for r in rows) else None
    seen = [r for r in rows if not labelled.isdisjoint(prompt_digests(r, tokenizer))]
    kept = [r for r in rows if labelled.isdisjoint(prompt_digests(r, tokenizer))]
    if seen:
        log(f"calibrate: warning: dropped {len(seen)} of {len(rows)} prompts the head was labelled on "
            f"(first: {seen[0]['id']!r}); the certificate holds for prompts it was not trained on")
    if not kept:
        raise CalibrateError(f"every prompt in {settings.prompts} is one {settings.head} was labelled on: "
                             "calibrate on prompts the head has not seen")
    return kept


@functools.lru_cache(maxsize=2)
def target_tokenizer(target: str):
    """The target's tokenizer (its chat template renders `messages` prompts)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target)


def render_items(rows: list[dict], target: str, max_tokens: int) -> list[PromptItem]:
    """Prompt text per row: `prompt` as given, `messages` through the target's chat template
    (as `selfjudge label` renders them), so the served token ids are the labelled ones."""
    items = []
    for row in rows:
        text = row.get("prompt")
        if text is None:
            tokenizer = target_tokenizer(target)
            if not getattr(tokenizer, "chat_template", None):
                raise CalibrateError(f"prompt {row['id']!r} uses 'messages' but the target has no chat template")
            text = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
        stop = row.get("stop") or ()
        items.append(PromptItem(row["id"], text, int(row.get("max_tokens", max_tokens)),
                                tuple([stop] if isinstance(stop, str) else stop)))
    return items


def split_ids(ids: list[str], test_share: float, seed: int) -> tuple[list[str], list[str]]:
    """(calibration, test): a prompt is in the test part when the hash of (seed, id) falls
    below test_share; the split of a prompt never depends on the other prompts."""
    def unit(i):
        return int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:12], 16) / 16**12

    test = {i for i in ids if unit(i) < test_share}
    return [i for i in ids if i not in test], [i for i in ids if i in test]


def candidate_grids(settings: CalibrateSettings) -> dict[str, tuple[float, ...]]:
    """Per rule family, its knobs strictest first."""
    families = settings.rules or tuple(r for r in RULES if r != "judge" or settings.head is not None)
    grids = {}
    for family in families:
        grid = settings.grids.get(family)
        if grid is None and family == "judge":
            grid = judge_operating_grid(settings.head)
        grids[family] = tuple(grid if grid is not None else DEFAULT_GRIDS[family])
    return grids


def judge_operating_grid(head: Path) -> tuple[float, ...] | None:
    """The head's `accepts_*` operating points' thresholds, strictest first (None: it has none)."""
    from selfjudge_vllm.artifact import JudgeArtifact

    points = JudgeArtifact.load(head).config.operating_points
    thresholds = sorted({round(p.threshold, 6) for n, p in points.items() if n.startswith("accepts_")}, reverse=True)
    return tuple(thresholds) or None


def point_key(family: str, knob: float | None, head_tag: str = "") -> str:
    """A point's name in the store: lossless, rule-knob, or judge@HEAD-knob for the judge
    points of a head other than the one its store was begun with (store_head_tag)."""
    if family == LOSSLESS:
        return LOSSLESS
    return f"{family}@{head_tag}-{knob:g}" if family == "judge" and head_tag else f"{family}-{knob:g}"


def parse_point_key(key: str) -> tuple[str, float | None]:
    """(family, knob) of a point_key."""
    if key == LOSSLESS:
        return key, None
    family, _, knob = key.partition("-")  # no family has a "-"; a knob may (1e-05)
    return family.partition("@")[0], float(knob)


def point_head_tag(key: str) -> str:
    """The head tag of a judge point_key ("" for the store's own head and every other point)."""
    return key.partition("-")[0].partition("@")[2]


def store_head_tag(out: Path, head: str | None) -> str:
    """The tag of the judge point keys of `head` (its SHA-256, as bound_settings records it) in
    OUT's store: none for the head the store was begun with (or no head), else its first 12 hex
    digits."""
    begun_with = json.loads((out / "store" / STORE_SETTINGS_FILE).read_text()).get("head_sha256")
    return "" if head is None or head == begun_with else head[:12]


# -- the paired statistics ---------------------------------------------------------------------------


@dataclass
class PairedRisk:
    n: int
    changes: int  # items whose answer (text, for text_changes) differs from lossless
    lost: int  # lossless right, candidate wrong
    gained: int

    def observed(self, measure: str) -> float:
        if measure in certify.NET_LOSS_MEASURES:
            return (self.lost - self.gained) / self.n
        return self.changes / self.n

    def p_value(self, measure: str, budget: float, level: float) -> float:
        return certify.p_value(measure, self.n, budget, changes=self.changes, lost=self.lost, gained=self.gained,
                               level=level)


class CachedOutcomes:
    """{"answer", "correct"} per (item id, response text), computed once each (code answers run
    a subprocess); `outcome(item_id, text)` computes one."""

    def __init__(self, outcome):
        self.outcome, self.cache = outcome, {}

    def __call__(self, item_id: str, text: str) -> dict:
        key = (item_id, text)
        if key not in self.cache:
            self.cache[key] = self.outcome(item_id, text)
        return self.cache[key]


class Judgement(CachedOutcomes):
    """Outcomes of a prompt file's responses under one answer kind; `meaning` decides the
    meaning measures (a meaning.MeaningJudge, or None)."""

    def __init__(self, answer: AnswerKind, rows: dict[str, dict], meaning: MeaningJudge | None = None):
        super().__init__(lambda item_id, text: answer.outcome(text, rows[item_id]))
        self.rows, self.meaning = rows, meaning


def paired_risk(judgement: Judgement, measure: str, mine: dict, lossless: dict, ids: list[str]) -> PairedRisk:
    """The point's risk against lossless on the `ids` both have served."""
    common = [i for i in ids if i in mine and i in lossless]
    if measure in MEANING_MEASURES:
        return _meaning_risk(judgement, measure, mine, lossless, common)
    changes = lost = gained = 0
    for i in common:
        a, b = mine[i]["text"], lossless[i]["text"]
        if measure == "text_changes":
            changes += a != b
            continue
        oa, ob = (judgement(i, a), judgement(i, b)) if a != b else (judgement(i, a),) * 2
        changes += oa["answer"] != ob["answer"]
        if oa["correct"] is not None and ob["correct"] is not None:
            lost += ob["correct"] and not oa["correct"]
            gained += oa["correct"] and not ob["correct"]
    return PairedRisk(len(common), changes, lost, gained)


def _meaning_risk(judgement: Judgement, measure: str, mine: dict, lossless: dict, common: list[str]) -> PairedRisk:
    """meaning_changes: changes are the scorer's "meaning changed" (or a new loop); judged_loss:
    lost / gained by the LLM judge's verdict, changes the prompts not kept."""
    pairs = [Pair(i, request_text(judgement.rows[i]), lossless[i]["text"], mine[i]["text"]) for i in common]
    judgement.meaning.score(pairs)  # the missing scores, persisted as they come
    if measure == "meaning_changes":
        return PairedRisk(len(pairs), sum(judgement.meaning.changed(p) for p in pairs), 0, 0)
    verdicts = [judgement.meaning.verdict(p) for p in pairs]
    lost, gained = verdicts.count("lost"), verdicts.count("gained")
    return PairedRisk(len(pairs), lost + gained, lost, gained)


@functools.lru_cache(maxsize=4096)  # pure; asked after every segment of a point
def largest_certifiable_count(n: int, budget: float, level: float) -> int:
    """For a change measure: the most changes among n items that still certify (-1: none)."""
    from scipy import stats

    count = int(stats.binom.ppf(level, n, budget))
    while count >= 0 and certify.binomial_p_value(count, n, budget) > level:
        count -= 1
    while certify.binomial_p_value(count + 1, n, budget) <= level:
        count += 1
    return count


def largest_certifiable_loss(n: int, budget: float, level: float, gained: int = 0) -> int:
    """For accuracy: the most items lost (lossless right, candidate wrong) among n that still
    certify when `gained` items went the other way (-1: none). Gains offset losses only in
    part: every discordant item adds variance."""
    lost = -1
    gamma = certify.berger_boos_gamma(level)
    while lost + 1 + gained <= n and certify.accuracy_p_value(lost + 1, gained, n, budget, gamma) <= level:
        lost += 1  # the p-value only grows with the losses
    return lost


def zero_risk_certifies(measure: str, n: int, budget: float, level: float) -> bool:
    """Whether a point that changes nothing on n prompts would be certified: below that n a
    budget is out of reach for every point (for accuracy, for every point that does not gain
    more than it loses)."""
    return certify.p_value(measure, n, budget, level=level) <= level  # no change, nothing lost or gained


def prompts_for_zero_risk(measure: str, budget: float, level: float) -> int:
    """The fewest calibration prompts on which a point that changes nothing is certified."""
    n = max(1, math.ceil(math.log(level) / math.log(1.0 - budget)))  # exact for the change measures
    high = n
    while not zero_risk_certifies(measure, high, budget, level):  # accuracy: a little more
        n, high = high + 1, 2 * high
    while n < high:  # bisection: certification only gets easier with more prompts
        middle = (n + high) // 2
        n, high = (n, middle) if zero_risk_certifies(measure, middle, budget, level) else (middle + 1, high)
    return high


def resolution(settings: CalibrateSettings, n_cal: int, level: float) -> dict:
    """What these many calibration prompts can certify, said before anything is served."""
    enough = zero_risk_certifies(settings.measure, n_cal, settings.budget, level)
    needed = None if enough else prompts_for_zero_risk(settings.measure, settings.budget, level)
    note = None if enough else (
        f"with {n_cal} calibration prompts and each rule family tested at {level:.4g}, not even a point that "
        f"changes nothing can be certified within {100 * settings.budget:g}%"
        + (" (only one that gains more than it loses)" if settings.measure in certify.NET_LOSS_MEASURES else "")
        + f"; that takes at least {needed} calibration prompts (about "
        f"{math.ceil(needed / (1.0 - settings.test_share))} in all at --test-share {settings.test_share:g}), "
        "fewer --rules, or a larger --budget")
    return {"zero_risk_certifies": enough, "prompts_needed_for_zero_risk": needed, "note": note}


def acceptance(store: RequestStore, key: str, ids: set[str]) -> dict:
    """vLLM's counters over the point's segments on `ids`: mean acceptance length (tokens per
    speculative step: 1 + accepted / drafts) and tokens/s; None unless they cover every id."""
    summary = point_summary(store, key, ids)
    covered = summary["timed_items"] == len(ids)
    return {name: summary[name] if covered else None for name in ("mean_acceptance_length", "tokens_per_s")}


# -- the run ---------------------------------------------------------------------------------------------


def bound_settings(settings: CalibrateSettings) -> dict:
    return {
        "target": str(settings.target), "speculative_config": settings.speculative_config,
        # None when not given: folders written before the option bind as they did
        "selfjudge_settings": settings.selfjudge_settings or None,
        "head_sha256": file_sha256(settings.head / "model.safetensors") if settings.head else None,
        "prompts_sha256": file_sha256(settings.prompts), "max_tokens": settings.max_tokens, "dtype": settings.dtype,
        "max_model_len": settings.max_model_len, "test_share": settings.test_share, "seed": settings.seed,
        "vllm_args": list(settings.vllm_args),
    }


def bind_folder(settings: CalibrateSettings) -> dict:
    """Record what the responses depend on at the first run; refuse a rerun that differs. The
    store (OUT/store, which a link may share between folders) records the settings it was
    served with too, and a folder bound to others is refused it: its certificate would be on
    another target's (or prompt file's, ...) responses. Another head is not refused the store
    (STORE_UNBOUND_SETTINGS). A store begun before it recorded them adopts the folder's."""
    settings.out.mkdir(parents=True, exist_ok=True)
    store = settings.out / "store"
    store.mkdir(exist_ok=True)
    now = bound_settings(settings)
    paths = {"folder": settings.out / "settings.json", "store": store / STORE_SETTINGS_FILE}
    for where, path in paths.items():
        if not path.is_file():
            continue
        before = json.loads(path.read_text())
        differ = [k for k in BOUND_SETTINGS if before.get(k) != now[k]
                  and not (where == "store" and k in STORE_UNBOUND_SETTINGS)]
        if differ and where == "folder":
            another_head = (" (with its store a link to this folder's, it serves only the new head's judge points)"
                            if differ == ["head_sha256"] else "")
            raise CalibrateError(f"{settings.out} holds responses served with other settings ({', '.join(differ)}); "
                                 f"use another --out{another_head}, or the original settings")
        if differ:
            raise CalibrateError(f"{settings.out}'s store ({store.resolve()}) holds responses served with other "
                                 f"settings ({', '.join(differ)}): it is shared with a folder calibrated on them. "
                                 "Give this --out a store of its own, or use the store's settings")
    if not paths["store"].is_file():
        adopted = dict(now)
        if not paths["folder"].is_file() and any(parse_point_key(k)[0] == "judge" for k in RequestStore(store).requests):
            # judge points served before the store recorded its head, by a head a new folder
            # cannot vouch for: no head is given their plain keys (each gets its own)
            adopted["head_sha256"] = None
        paths["store"].write_text(json.dumps(adopted, indent=1) + "\n")
    if not paths["folder"].is_file():
        paths["folder"].write_text(json.dumps(now, indent=1) + "\n")
    return now


def certificate_binding(settings: CalibrateSettings, grids: dict[str, tuple[float, ...]]) -> dict:
    """CERTIFICATE_BINDING's values for this run, as JSON stores them."""
    return json.loads(json.dumps({key: value(settings, grids) for key, value in CERTIFICATE_BINDING.items()}))


def certificate_changes(out: Path, binding: dict) -> list[str]:
    """What this run changes in the settings the folder's certificate was computed with, one
    "key (before -> now)" each; [] when it changes nothing or no certificate was begun."""
    path = out / CERTIFICATE_FILE
    if path.is_file():
        before = json.loads(path.read_text())
    else:  # a folder calibrated before the binding was recorded: its report has the same keys
        report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
        if not report.get("points"):
            return []
        before = report
    return [f"{key} ({json.dumps(before.get(key))} -> {json.dumps(value)})" for key, value in binding.items()
            if before.get(key) != value]


def record_certificate_binding(out: Path, binding: dict) -> None:
    """Bind the folder's certificate to these settings, once (before any candidate is read)."""
    path = out / CERTIFICATE_FILE
    if not path.is_file():
        path.write_text(json.dumps(binding, indent=1) + "\n")


def record_store_certificate(settings: CalibrateSettings, binding: dict, exploratory: bool, head: str | None) -> None:
    """Add this folder's binding to its store's list of the certificates computed on its
    responses (once per folder and binding), when the first candidate is about to be read.
    `head`: the folder's head SHA-256 (folders with other heads share lossless and the
    training-free rules' responses, not the judge's)."""
    path = settings.out / "store" / STORE_CERTIFICATES_FILE
    folder = str(settings.out.resolve())
    if any(r.get("folder") == folder and r.get("binding") == binding for r in load_jsonl(path)):
        return
    append_jsonl(path, {"folder": folder, "binding": binding, "date": datetime.date.today().isoformat(),
                        "exploratory": exploratory, "head_sha256": head})


def other_certificates(settings: CalibrateSettings, binding: dict) -> list[dict]:
    """The certificates (and exploratory runs) computed on this folder's store's responses
    other than this one, in the order they were first computed; `this_folder` marks those
    computed in this folder with other settings (an exploratory rerun, or the run of a folder
    since removed and begun again)."""
    folder = str(settings.out.resolve())
    return [dict(r, this_folder=r.get("folder") == folder)
            for r in load_jsonl(settings.out / "store" / STORE_CERTIFICATES_FILE)
            if not (r.get("folder") == folder and r.get("binding") == binding)]


def describe_binding(binding: dict) -> str:
    """A certificate binding in a few words, e.g. "meaning_changes within 5% at 95% confidence
    (embedding scorer below 0.9; rules fly, top_alpha)"."""
    scorer = binding.get("scorer")
    by = ""
    if isinstance(scorer, dict) and scorer.get("scorer"):
        by = f"{scorer['scorer']} scorer" + (f" ({scorer.get('model')})" if scorer["scorer"] == "llm" else "") + (
            f" below {scorer['threshold']:g}" if scorer.get("threshold") is not None else "") + "; "
    elif scorer:
        by = f"scorer {json.dumps(scorer)}; "
    return (f"{binding.get('measure')} within {100 * binding.get('budget', 0):g}% at "
            f"{100 * binding.get('confidence', 0):g}% confidence ({by}rules {', '.join(binding.get('families', []))})")


def other_certificates_line(report: dict) -> str | None:
    others = report.get("other_certificates") or []
    if not others:
        return None
    mine = (report.get("settings") or {}).get("head_sha256")

    def head_note(r: dict) -> str:
        if r.get("head_sha256") and r["head_sha256"] != mine:
            return f" (head {r['head_sha256'][:12]}: its judge points are its own)"
        # (entries written before heads were recorded have no head_sha256; a rules-only run's is None)
        return " (its head not recorded)" if mine and "head_sha256" not in r else ""

    listed = "; ".join(("this folder, with other settings" if r.get("this_folder") else r["folder"])
                       + f": {describe_binding(r['binding'])}{head_note(r)}"
                       + (" (exploratory)" if r.get("exploratory") else "") for r in others)
    return (f"{len(others)} other certificate{'s were' if len(others) > 1 else ' was'} computed on these responses: "
            f"{listed}. Choosing among them after seeing them is not covered by any one certificate")


def server_command(settings: CalibrateSettings, port: int) -> tuple[list[str], dict]:
    """`vllm serve` for the operator's target and speculative config with every candidate rule
    open to requests; CPU defaults as `selfjudge label` chooses them."""
    from selfjudge_vllm.server_process import serve_command

    rules = [r for r in RULES if r != "judge" or settings.head]  # the judge needs a head
    section = {"rule": rules[0], "request_rules": rules, **settings.selfjudge_settings}
    if settings.head:
        section["head"] = str(settings.head)
    dtype, env = server_environment(settings)
    command = serve_command(settings.target, port, settings.speculative_config, {"selfjudge": section},
                            model_name="target", dtype=dtype, extra_args=settings.vllm_args,
                            max_model_len=settings.max_model_len)
    return command, env


def server_environment(settings: CalibrateSettings) -> tuple[str, dict]:
    """(dtype, environment) of a server calibrate starts: on a CPU machine float32 unless
    bfloat16 is native, a capped KV cache and every core for the model, unless the operator
    set those variables."""
    if _has_cuda():
        return settings.dtype, {}
    from selfjudge_vllm.offline.engine import CPU_KV_CACHE_GIB, cpu_has_native_bf16

    dtype = settings.dtype
    if dtype == "auto" and not cpu_has_native_bf16():
        dtype = "float32"  # bfloat16 without native support is several times slower
    env = every_core_env()
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{CPU_KV_CACHE_GIB:g}"
    return dtype, env


def judge_memory_note(settings: CalibrateSettings) -> str | None:
    """What to say before serving when a judge model other than the target will be served on
    the GPU beside the target's engine and --vllm-args leaves the target vLLM's default share
    (0.9 of the GPU's memory: no room for the judge); None otherwise."""
    scorer = settings.scorer_settings
    if scorer is None or scorer.scorer != "llm" or scorer.model == "target":
        return None
    if any(a == "--gpu-memory-utilization" or a.startswith("--gpu-memory-utilization=") for a in settings.vllm_args):
        return None
    if not _has_cuda():
        return None
    room = round(1.0 - SCORER_GPU_SHARE - 0.1, 2)
    return (f"the judge model {scorer.model} is served on this GPU beside the target, with "
            f"--gpu-memory-utilization {SCORER_GPU_SHARE:g}; the target's engine takes vLLM's default 0.9 of the GPU's "
            f"memory unless told otherwise, which leaves the judge no room: give the target less, e.g. "
            f"--vllm-args=\"--gpu-memory-utilization {room:g}\" (from the first run into a folder: --vllm-args is bound "
            "to it)")


def start_server(what: str, command: list[str], log_path: Path, settings: CalibrateSettings, env: dict,
                 hint: str | None = None):
    """A server_process.Server, whose start failure names `what` and its own log."""
    from selfjudge_vllm.server_process import Server

    try:
        return Server(command, log_path, settings.startup_timeout_s, env)
    except (RuntimeError, TimeoutError) as exc:
        raise type(exc)(f"{what} did not start; its log is {log_path}" + (f" ({hint})" if hint else "")
                        + f". {exc}") from None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Session:
    """The engine, started only once something has to be served."""

    def __init__(self, settings: CalibrateSettings):
        self.settings, self.server = settings, None

    def get(self):
        if self.server is None:
            from selfjudge_vllm.server_process import free_port

            command, env = server_command(self.settings, free_port())
            log(f"calibrate: starting vllm serve for {self.settings.target} "
                f"({self.settings.speculative_config.get('method')}; log in {self.settings.out / 'server.log'})")
            self.server = start_server(f"the target's vllm serve ({self.settings.target})", command,
                                       self.settings.out / "server.log", self.settings, env)
        return self.server

    def close(self):
        if self.server is not None:
            self.server.stop()


class ScorerSession:
    """The LLM judge of the meaning measures: the calibrate engine itself when the judge model
    is the target (its requests go lossless), else a plain `vllm serve` of the judge model,
    started on the first score."""

    def __init__(self, settings: CalibrateSettings, session: Session):
        self.settings, self.session, self.server, self._client = settings, session, None, None

    def client(self):
        from selfjudge_vllm.meaning import LLMJudgeClient

        if self._client is None:
            model = self.settings.scorer_settings.model
            if model == "target":
                self._client = LLMJudgeClient(self.session.get().base, "target", str(self.settings.target),
                                              self.settings.concurrency, self.settings.max_model_len,
                                              self.settings.out / "server.log")
            else:
                from selfjudge_vllm.server_process import free_port, serve_command

                dtype, env = server_environment(self.settings)
                # On a GPU it shares it with calibrate's engine, which is up: a share of its own
                share = ("--gpu-memory-utilization", f"{SCORER_GPU_SHARE:g}") if _has_cuda() else ()
                command = serve_command(model, free_port(), None, None, model_name="judge", dtype=dtype,
                                        max_model_len=self.settings.max_model_len, extra_args=share)
                log_path = self.settings.out / "scorer-server.log"
                log(f"calibrate: starting vllm serve for the judge model {model} (log in {log_path})")
                self.server = start_server(f"the judge model's vllm serve ({model})", command, log_path,
                                           self.settings, env, judge_memory_note(self.settings))
                self._client = LLMJudgeClient(self.server.base, "judge", model, self.settings.concurrency,
                                              self.settings.max_model_len, log_path)
        return self._client

    def close(self):
        if self.server is not None:
            self.server.stop()


def run(settings: CalibrateSettings) -> tuple[int, dict]:
    """Serves what is missing, certifies, writes the report; (exit status, report)."""
    check_settings(settings)
    all_rows = prompt_rows(settings)
    rows = without_label_prompts(settings, all_rows)
    bound = bind_folder(settings)
    head_tag = store_head_tag(settings.out, bound["head_sha256"])
    by_id = {r["id"]: r for r in rows}
    items = render_items(rows, settings.target, settings.max_tokens)
    item_by_id = {i.id: i for i in items}
    calibration_ids, test_ids = split_ids([i.id for i in items], settings.test_share, settings.seed)
    if not calibration_ids:
        raise CalibrateError("no calibration prompts: lower --test-share or give more prompts")
    grids = candidate_grids(settings)
    level = settings.delta / len(grids)  # Bonferroni over the families
    binding = certificate_binding(settings, grids)
    changed = certificate_changes(settings.out, binding)
    if changed:
        log(f"calibrate: exploratory run, nothing will be certified: {settings.out}'s certificate was computed "
            f"with other settings: {'; '.join(changed)}")
    reach = resolution(settings, len(calibration_ids), level)
    if reach["note"]:
        log(f"calibrate: warning: {reach['note']}")
    memory = judge_memory_note(settings)
    if memory:
        log(f"calibrate: warning: {memory}")
    store = RequestStore(settings.out / "store")
    session = Session(settings)
    scorer_session = ScorerSession(settings, session)
    meaning = (MeaningJudge(settings.scorer_settings, settings.out / "store" / "scores.jsonl",
                            llm_client=scorer_session.client) if settings.scorer_settings else None)
    judgement = Judgement(settings.answer, by_id, meaning)
    started = time.monotonic()

    def out_of_time() -> bool:
        return settings.max_minutes is not None and (time.monotonic() - started) / 60 > settings.max_minutes

    def serve(key, ids, extra, hopeless=lambda: None) -> bool:
        """True when every item of `ids` has a response and counters (or the point stopped
        early); False when --max-minutes ran out first."""
        todo = [item_by_id[i] for i in ids if i not in store.done(key)]
        uncounted = store.uncounted(key, set(ids) & set(store.done(key)))
        if not todo and not uncounted:
            return True
        if out_of_time():
            return False
        if hopeless():  # decided already: no engine start for it
            return True
        progress = Progress(len(todo) + len(uncounted))
        log(f"calibrate: {key} on {len(ids)} prompts ({len(todo)} to serve)")
        return measure_point(session.get(), store, key, [item_by_id[i] for i in ids], extra, settings.concurrency,
                             progress, out_of_time, hopeless, record_stop=False)

    complete = True
    try:
        # Calibration prompts first, then the test prompts: vLLM's counters are read per segment,
        # and a segment mixing both would leave the calibration prompts' acceptance unknown.
        complete &= (serve(LOSSLESS, calibration_ids, request_options(LOSSLESS, None))
                     and serve(LOSSLESS, calibration_ids + test_ids, request_options(LOSSLESS, None)))
        lossless = store.done(LOSSLESS)
        if complete and not changed:
            record_certificate_binding(settings.out, binding)
        if complete:  # candidates are read from here on
            record_store_certificate(settings, binding, exploratory=bool(changed), head=bound["head_sha256"])
        evaluated: dict[str, list[dict]] = {}
        n_cal = len(calibration_ids)
        for family, grid in grids.items():
            evaluated[family] = []
            for knob in grid:
                if not complete:
                    break
                key = point_key(family, knob, head_tag)
                hopeless = lambda key=key: _hopeless(settings, judgement, store, key, lossless, calibration_ids, level)  # noqa: E731
                complete &= serve(key, calibration_ids, request_options(family, knob), hopeless)
                # The scope is every calibration prompt unless the point stopped early.
                risk = paired_risk(judgement, settings.measure, store.done(key), lossless, calibration_ids)
                stopped = risk.n < n_cal and complete
                p = 1.0 if stopped else risk.p_value(settings.measure, settings.budget, level) if risk.n else 1.0
                row = {"family": family, "knob": knob, "key": key, "n": risk.n, "changes": risk.changes,
                       "lost": risk.lost, "gained": risk.gained, "observed_risk": risk.observed(settings.measure)
                       if risk.n else None, "p_value": p, "stopped_early": stopped,
                       # cut by --max-minutes: the prompts that finished first (likely the short ones)
                       "partial": risk.n < n_cal and not complete,
                       **acceptance(store, key, set(calibration_ids) & set(store.done(key)))}
                evaluated[family].append(row)
                if not complete or p > level:
                    break  # fixed-sequence testing: the first point not certified ends its family
        lossless_row = {"family": LOSSLESS, "knob": None, "key": LOSSLESS, "n": n_cal, "changes": 0, "lost": 0,
                        "gained": 0, "observed_risk": 0.0, "p_value": 0.0, "stopped_early": False,
                        **acceptance(store, LOSSLESS, set(calibration_ids))}
        passing = _certified(evaluated, settings.delta) if complete else []
        certified = [] if changed else passing  # an exploratory run certifies nothing
        best = max(certified, key=lambda r: r["mean_acceptance_length"] or 0.0, default=None)
        family_best = {f: max((r for r in certified if r["family"] == f),
                              key=lambda r: r["mean_acceptance_length"] or 0.0) for f in {r["family"] for r in certified}}
        if complete and test_ids:
            for row in family_best.values():
                complete &= serve(row["key"], test_ids, request_options(row["family"], row["knob"]))
            for row in family_best.values():
                risk = paired_risk(judgement, settings.measure, store.done(row["key"]), lossless, test_ids)
                row["test"] = {"n": risk.n, "changes": risk.changes, "lost": risk.lost, "gained": risk.gained,
                               "observed_risk": risk.observed(settings.measure) if risk.n else None}
    finally:
        scorer_session.close()
        session.close()
    report = _report(settings, bound, grids, level, reach, calibration_ids, test_ids, lossless_row, evaluated, certified,
                     best, complete)
    # the prompts of the file left out as the head's label prompts: the split is of the others
    report["label_prompts_dropped"] = [r["id"] for r in all_rows if r["id"] not in by_id]
    if changed:
        _mark_exploratory(report, changed, passing)
    _write(settings, report)
    if not complete:
        return EXIT_INCOMPLETE, report
    if changed:
        return EXIT_EXPLORATORY, report
    return (EXIT_RELAXED_CERTIFIED if best else EXIT_ONLY_LOSSLESS), report


def _mark_exploratory(report: dict, changed: list[str], passing: list[dict]) -> None:
    """Say why the run certifies nothing, and which points would pass were it not reusing seen
    results (for exploring only: they are not certified)."""
    keys = {r["key"] for r in passing}
    for row in report["points"]:
        row["passes_exploratory"] = row["key"] in keys
    report["exploratory"] = {"changed": changed, "passing": sorted(keys)}
    if report["complete"]:
        report["verdict"] = (
            f"exploratory, nothing certified: this folder's certificate was computed with other settings "
            f"({'; '.join(changed)}); these responses' results were seen under them, so the family-wise guarantee "
            f"does not cover a new test on them. Passing here: {', '.join(sorted(keys)) or 'none'}. To certify these "
            "settings, calibrate on fresh prompts in another --out")


def report_stem(report: dict) -> str:
    """report.* for a run under the folder's certificate; exploratory.* otherwise (so the
    certificate's report is kept)."""
    return "exploratory" if report.get("exploratory") else "report"


def _hopeless(settings, judgement, store, key, lossless, calibration_ids, level) -> str | None:
    """Why the point can no longer be certified (None while it can): for a change measure,
    its changes so far already exceed the most that certify on all calibration prompts; more
    prompts can only add changes. (Accuracy: gains can offset losses, so no early stop.)"""
    if settings.measure in certify.NET_LOSS_MEASURES:
        return None
    risk = paired_risk(judgement, settings.measure, store.done(key), lossless, calibration_ids)
    most = largest_certifiable_count(len(calibration_ids), settings.budget, level)
    if risk.changes > most:
        return f"{risk.changes} changes in {risk.n} prompts; at most {most} of {len(calibration_ids)} certify"
    return None


def _certified(evaluated: dict[str, list[dict]], delta: float) -> list[dict]:
    """The certified rows (certify.certify: fixed sequence per family, Bonferroni over them);
    every family has its first point evaluated once the calibration is complete."""
    assert all(evaluated.values()), "a family without an evaluated point would change the Bonferroni split"
    candidates = [certify.Candidate(f, r["key"], r["p_value"]) for f, rows in evaluated.items() for r in rows]
    keys = {c.point for c in certify.certify(candidates, delta)}
    return [r for rows in evaluated.values() for r in rows if r["key"] in keys]


# -- the report -------------------------------------------------------------------------------------------


def served_config(family: str | None, knob: float | None, head: Path | None, operating_point: str | None,
                  selfjudge_settings: dict | None = None) -> dict:
    """The `--additional-config` that serves a point, with the server settings it was
    calibrated under."""
    if family is None:
        return {"selfjudge": {"enabled": False}}
    if family == "judge":
        return {"selfjudge": {"head": str(head), "rule": "judge", "operating_point": operating_point,
                              **(selfjudge_settings or {})}}
    return {"selfjudge": {"rule": family, RULES[family].knob: knob, **(selfjudge_settings or {})}}


def operating_point_name(measure: str, budget: float, scorer: ScorerSettings | None = None) -> str:
    """certified_<measure>[_<scorer>]_<budget in percent>pct, e.g. certified_accuracy_2pct,
    _2p5pct, certified_meaning_changes_llm_5pct (the scorer, so certificates by two scorers
    do not overwrite each other)."""
    by = f"_{scorer.scorer}" if scorer is not None and scorer.measure == "meaning_changes" else ""
    return f"certified_{measure}{by}_{f'{100 * budget:g}'.replace('.', 'p')}pct"


def _report(settings, bound, grids, level, reach, calibration_ids, test_ids, lossless_row, evaluated, certified, best,
            complete) -> dict:
    point_name = operating_point_name(settings.measure, settings.budget, settings.scorer_settings)
    head_out = settings.out / "head" if best and best["family"] == "judge" else None
    for rows in evaluated.values():
        for row in rows:
            row["certified"] = any(row["key"] == c["key"] for c in certified)
            row["upper_bound"] = (certify.risk_upper_bound(settings.measure, row["n"], level, row["changes"],
                                                           row["lost"], row["gained"])
                                  if row["n"] and not row["stopped_early"] and not row.get("partial") else None)
    base = lossless_row["mean_acceptance_length"]
    if best is None:
        verdict = ("incomplete: rerun the same command to continue; nothing is certified until every calibration "
                   "prompt is served" if not complete else
                   f"only lossless is certified: no relaxed point keeps {settings.measure} within "
                   f"{100 * settings.budget:g}% at {100 * settings.confidence:g}% confidence on these prompts")
    else:
        speedup = best["mean_acceptance_length"] / base if base and best["mean_acceptance_length"] else None
        verdict = (f"certified: {best['family']} {RULES[best['family']].knob} {best['knob']:g}"
                   + (f", {speedup:.3f}x lossless acceptance length" if speedup else "")
                   + ("" if complete else " (the test part is incomplete: rerun the same command to finish it)"))
    return {
        "verdict": verdict, "complete": complete,
        "measure": settings.measure, "budget": settings.budget, "confidence": settings.confidence,
        "delta": settings.delta, "families": list(grids), "level_per_family": level,
        "method": "Learn then Test: per family, fixed-sequence testing along its grid (strictest first, stop at the "
                  "first point not certified); Bonferroni over families (delta / number of families each); "
                  + ("exact binomial p-values" if settings.measure in certify.SHARE_MEASURES else
                     f"exact unconditional p-values for the {settings.measure.replace('_', ' ')} (lost - gained; "
                     "Berger-Boos restricted nuisance)"),
        "scorer": settings.scorer_settings and settings.scorer_settings.as_dict(),
        "answer": asdict(settings.answer), "grids": {f: list(g) for f, g in grids.items()},
        "calibration_prompts": len(calibration_ids), "test_prompts": len(test_ids), "resolution": reach,
        "lossless": lossless_row, "points": [r for rows in evaluated.values() for r in rows],
        "certified": best and {**best, "operating_point": point_name if head_out else None,
                               "acceptance_vs_lossless": (best["mean_acceptance_length"] / base
                                                          if base and best["mean_acceptance_length"] else None)},
        "serve_with": served_config(best and best["family"], best and best["knob"], head_out, point_name,
                                    settings.selfjudge_settings),
        "settings": bound, "certificate_binding": certificate_binding(settings, grids),
        "other_certificates": other_certificates(settings, certificate_binding(settings, grids)),
        "date": datetime.date.today().isoformat(),
    }


def _write(settings: CalibrateSettings, report: dict) -> None:
    out = settings.out
    best = report["certified"]
    if best and best["family"] == "judge":
        _write_certified_head(settings, report)
    stem = report_stem(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(_markdown(report))
    try:
        _plot(report, out / f"{stem}.png")
    except ImportError:  # matplotlib is in the `calibrate` extra
        log("calibrate: matplotlib not installed; no plot (pip install -e \".[calibrate]\")")


def _write_certified_head(settings: CalibrateSettings, report: dict) -> None:
    """A copy of the judge artifact with the certified operating point and its evidence."""
    from selfjudge_vllm.artifact import JudgeArtifact, OperatingPoint

    best = report["certified"]
    artifact = JudgeArtifact.load(settings.head)
    evidence = {
        "measure": report["measure"], "answer": report["answer"], "budget": report["budget"], "delta": report["delta"],
        "level": report["level_per_family"], "n": best["n"], "changes": best["changes"], "lost": best["lost"],
        "gained": best["gained"], "p_value": best["p_value"],
        # this point's own bound at its family's level, not a bound that holds after the choice
        "upper_bound_per_point": best["upper_bound"],
        "upper_bound_per_point_is": "the smallest budget this point's evidence certifies at level delta / families, "
                                    "for this point alone: not simultaneous over the points tested nor after picking "
                                    "the fastest certified point (what holds after the choice is risk <= budget)",
        "mean_acceptance_length": best["mean_acceptance_length"],
        "lossless_mean_acceptance_length": report["lossless"]["mean_acceptance_length"],
        "acceptance_vs_lossless": best["acceptance_vs_lossless"], "test": best.get("test"),
        "scorer": report.get("scorer"), "prompts_sha256": report["settings"]["prompts_sha256"],
        "speculative_config": report["settings"]["speculative_config"],
        "selfjudge_settings": report["settings"]["selfjudge_settings"], "date": report["date"],
    }
    points = dict(artifact.config.operating_points)
    points[best["operating_point"]] = OperatingPoint(
        threshold=best["knob"], evidence=evidence,
        description=f"certified by `selfjudge calibrate`: {report['measure']} <= {100 * report['budget']:g}% "
                    f"at {100 * report['confidence']:g}% confidence on {best['n']} calibration prompts")
    config = artifact.config.model_copy(update={"operating_points": points})
    head_out = settings.out / "head"
    if head_out.exists():
        shutil.rmtree(head_out)
    JudgeArtifact(config, artifact.weight, artifact.bias, artifact.scalar_weight).save(head_out)


def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _scorer_line(report: dict) -> str:
    """The meaning measures' scorer as the report names it, e.g. "llm scorer (target,
    equivalence-v1) below 0.5"."""
    scorer = report.get("scorer")
    if not scorer:
        return ""
    what = f"{scorer['scorer']} scorer ({scorer['model']}" + (f", {scorer['prompt_version']})" if
                                                               scorer["prompt_version"] else ")")
    return what + (f" below {scorer['threshold']:g}" if scorer["threshold"] is not None else "")


def _decision(row: dict) -> str:
    if row["certified"]:
        return "yes"
    if row.get("passes_exploratory"):
        return "passes (exploratory: not certified)"
    if row.get("partial"):
        return f"partial: {row['n']} prompts, those that finished first"
    return "stopped early" if row["stopped_early"] else "no"


def _markdown(report: dict) -> str:
    def unit(v):  # every risk is a share of prompts
        return "n/a" if v is None else f"{100 * v:.2f}%"

    lines = [
        f"# selfjudge calibrate: {report['measure']} within {100 * report['budget']:g}% "
        f"at {100 * report['confidence']:g}% confidence", "",
        f"**{report['verdict']}**", "",
        f"Serve with: `--additional-config '{json.dumps(report['serve_with'])}'`", "",
        f"{report['calibration_prompts']} calibration prompts, {report['test_prompts']} test prompts "
        f"(split by prompt id, seed {report['settings']['seed']}); every point paired with lossless on the same "
        f"engine. {report['method']}; each family tested at {report['level_per_family']:.4g}.", "",
        *([f"Decided by the {_scorer_line(report)}; a new repetition loop in the relaxed response counts as "
           f"{'changed' if report['measure'] == 'meaning_changes' else 'lost'}. The certificate holds for this "
           "scorer's verdicts, not for a person's judgement.", ""] if report.get("scorer") else []),
        *([f"Warning: {report['resolution']['note']}.", ""] if report["resolution"]["note"] else []),
        *([f"Note: {other_certificates_line(report)}.", ""] if other_certificates_line(report) else []),
        "| point | n | changes | lost | gained | observed risk | upper bound | p-value | certified "
        "| acceptance length | test risk (n) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    lossless = report["lossless"]
    lines.append(f"| lossless | {lossless['n']} | 0 | 0 | 0 | 0 | 0 | - | yes "
                 f"| {_fmt(lossless['mean_acceptance_length'])} | - |")
    for r in report["points"]:
        test = r.get("test")
        lines.append(
            f"| {r['family']} {r['knob']:g} | {r['n']} | {r['changes']} | {r['lost']} | {r['gained']} "
            f"| {unit(r['observed_risk'])} | {unit(r['upper_bound'])} | {_fmt(r['p_value'], '.4f')} "
            f"| {_decision(r)} "
            f"| {_fmt(r['mean_acceptance_length'])} "
            f"| {unit(test['observed_risk']) + ' (' + str(test['n']) + ')' if test else '-'} |")
    lines += ["", "Upper bound: the smallest budget this point's evidence would certify at its family's level, for "
              "this point alone (not simultaneous over the points, nor after picking the fastest: the guarantee is "
              "the certificate, risk within the budget). Families not listed past a point: fixed-sequence testing "
              "stopped there. A partial point's figures (an incomplete run) are on the prompts that finished "
              "first, not a sample of the calibration prompts: nothing is decided on them.", ""]
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    colors = {"judge": "tab:red", "top_alpha": "tab:blue", "entropy": "tab:green", "fly": "tab:purple"}
    lossless = report["lossless"]["mean_acceptance_length"]
    if lossless:
        ax.scatter([0], [lossless], color="black", marker="o", label="lossless", zorder=3)
    for family in report["families"]:
        rows = [r for r in report["points"] if r["family"] == family and r["mean_acceptance_length"]
                and r["observed_risk"] is not None]
        if not rows:
            continue
        color = colors.get(family, "tab:gray")
        xs = [100 * r["observed_risk"] for r in rows]
        ys = [r["mean_acceptance_length"] for r in rows]
        ax.plot(xs, ys, color=color, alpha=0.5, linewidth=1)
        for r, x, y in zip(rows, xs, ys):
            if r["upper_bound"] is not None:
                ax.plot([x, 100 * r["upper_bound"]], [y, y], color=color, linewidth=0.8, alpha=0.6)
            ax.scatter([x], [y], color=color if r["certified"] else "white", edgecolors=color, zorder=3)
        ax.scatter([], [], color=color, label=family)
    best = report["certified"]
    if best and best["mean_acceptance_length"]:
        ax.scatter([100 * best["observed_risk"]], [best["mean_acceptance_length"]], marker="*", s=220,
                   color="gold", edgecolors="black", zorder=4, label="certified point")
    ax.axvline(100 * report["budget"], color="grey", linestyle="--", linewidth=1)
    ax.annotate(f"budget {100 * report['budget']:g}%", (100 * report["budget"], 1.0),
                xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points", fontsize=8,
                color="grey")
    ax.scatter([], [], color="white", edgecolors="black", label="not certified")
    ax.legend(fontsize=8, title="filled: certified\nline: to the upper bound", title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    label = {"accuracy": "accuracy lost vs lossless (% of prompts)",
             "answer_changes": "answers changed vs lossless (% of prompts)",
             "text_changes": "texts changed vs lossless (% of prompts)",
             "meaning_changes": f"meanings changed vs lossless (% of prompts; {_scorer_line(report)})",
             "judged_loss": f"judged loss vs lossless (lost - gained, % of prompts; {_scorer_line(report)})",
             }[report["measure"]]
    ax.set_xlabel(label)
    ax.set_ylabel("mean acceptance length (tokens/step)")
    ax.set_title(f"calibration: {report['calibration_prompts']} prompts, confidence {100 * report['confidence']:g}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_grid(text: str) -> tuple[str, tuple[float, ...]]:
    """'top_alpha=0.9,0.5,0.2' -> ('top_alpha', (0.9, 0.5, 0.2))."""
    family, _, knobs = text.partition("=")
    try:
        return family.strip(), tuple(float(k) for k in knobs.split(",") if k.strip())
    except ValueError:
        raise CalibrateError(f"--grid {text!r}: give RULE=K1,K2,... with numbers") from None


def settings_from_args(args) -> CalibrateSettings:
    try:
        answer = AnswerKind(args.answer, args.answer_pattern)
    except ValueError as exc:
        raise CalibrateError(str(exc)) from None
    try:
        spec = json.loads(args.speculative_config)
    except json.JSONDecodeError as exc:
        raise CalibrateError(f"--speculative-config is not valid JSON ({exc.msg})") from None
    grids = dict(parse_grid(g) for g in args.grid)
    try:
        selfjudge_settings = json.loads(args.selfjudge_config) if args.selfjudge_config else {}
    except json.JSONDecodeError as exc:
        raise CalibrateError(f"--selfjudge-config is not valid JSON ({exc.msg})") from None
    head = Path(args.head) if args.head else None
    if head is not None:
        from selfjudge_vllm.artifact import ArtifactError, JudgeArtifact

        try:
            JudgeArtifact.load(head)
        except ArtifactError as exc:
            raise CalibrateError(str(exc)) from None
    return CalibrateSettings(
        target=args.target, speculative_config=spec, prompts=Path(args.prompts), out=Path(args.out),
        measure=args.measure, budget=args.budget, confidence=args.confidence, answer=answer, head=head,
        rules=tuple(r.strip() for r in args.rules.split(",") if r.strip()) if args.rules else (), grids=grids,
        test_share=args.test_share, seed=args.seed, max_tokens=args.max_tokens, concurrency=args.concurrency,
        max_model_len=args.max_model_len, dtype=args.dtype, vllm_args=tuple(shlex.split(args.vllm_args or "")),
        selfjudge_settings=selfjudge_settings, scorer=args.scorer, scorer_model=args.scorer_model,
        scorer_threshold=args.scorer_threshold, max_minutes=args.max_minutes,
    )


def summary_lines(report: dict, out: Path) -> list[str]:
    lines = [f"selfjudge calibrate: {report['verdict']}"]
    if report["resolution"]["note"]:
        lines.append(f"  warning: {report['resolution']['note']}")
    if other_certificates_line(report):
        lines.append(f"  note: {other_certificates_line(report)}")
    if report["complete"]:
        lines.append(f"  serve with: --additional-config '{json.dumps(report['serve_with'])}'")
    stem = report_stem(report)
    lines.append(f"  report: {out / f'{stem}.md'} (and {stem}.json, {stem}.png)")
    return lines
