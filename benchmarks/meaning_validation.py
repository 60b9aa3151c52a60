"""Validating the meaning scorers (selfjudge_vllm/meaning.py) before a certificate trusts them.

Two checks (issue 42, item 2), each a stage of this script, resumable like the benchmarks
(every response and every score is persisted as it completes):

    serve    ShareGPT first turns of the validation split (benchmarks/chat_tasks.py
             SHAREGPT_SPLITS["validation"], disjoint from the judge's training prompts and
             from the chat benchmark's) on the Qwen testbed's `ngram` k=8 server: lossless and
             VALIDATION_POINTS (several rules and strengths), chunk by chunk so that a sitting
             cut short holds every point on the same prompts
    pairs    every (prompt, point) whose text differs from lossless, shuffled, written for a
             blind reading: RESULTS/meaning_validation/pairs.jsonl holds the request and the two
             responses in a random order and nothing else (no rule, no score); key.jsonl maps
             each pair back. The reader marks each pair in verdicts.jsonl by the criteria in
             RESULTS/meaning_validation/CRITERIA.md before any scorer output is looked at.
    score    every scorer on the chat pairs and on GSM8K pairs from the Qwen benchmark's store
             (lossless vs relaxed on the same item, where the final answer is known)
    report   agreement of each scorer (at several thresholds) with "answer changed" on GSM8K
             and with the blind verdicts on chat: precision, recall, Cohen's kappa

    python benchmarks/meaning_validation.py --testbed testbed-qwen --stages serve --max-minutes 60
    python benchmarks/meaning_validation.py --testbed testbed-qwen --stages pairs
    python benchmarks/meaning_validation.py --testbed testbed-qwen --stages score,report --scorers embedding
    python benchmarks/meaning_validation.py --testbed testbed-qwen --stages score --sets gsm8k --scorers llm --llm-pairs 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from benchmarks import chat_tasks  # noqa: E402
from benchmarks.runner import Sitting, plugin_config, speculative_config, start_server  # noqa: E402
from selfjudge_vllm.calibrate import point_key  # noqa: E402  (calibrate's point names: lossless, rule-knob)
from selfjudge_vllm.meaning import DEFAULT_THRESHOLDS, MeaningJudge, Pair, ScorerSettings  # noqa: E402
from selfjudge_vllm.measurement import (  # noqa: E402
    PromptItem,
    RequestStore,
    give_the_worker_every_core,
    load_jsonl,
    log,
    point_summary,
    request_options,
)

RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "meaning_validation"
SERVER = ("ngram", 8)
# (rule, knob): the judge at its fastest confirmed point and a stricter one, vLLM's FLy default,
# top_alpha and entropy at middling strengths.
VALIDATION_POINTS = (("judge", 0.188512), ("fly", 0.3), ("top_alpha", 0.5), ("judge", 0.517674), ("entropy", 1.0))
MAX_TOKENS = 256
CHUNK = 16  # prompts per round of every point


def validation_items(template, count: int) -> list[PromptItem]:
    return [PromptItem(pid, template([{"role": "user", "content": text}]), MAX_TOKENS)
            for pid, text in chat_tasks.sharegpt_split("validation", count)]


def serve(args) -> None:
    template = chat_tasks.ChatTemplate(args.testbed / "target")
    items = validation_items(template, args.prompts)
    store = RequestStore(OUT / "store")
    if args.all_cores:
        give_the_worker_every_core()
    plan = []
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        plan.append(("lossless", chunk, request_options("lossless", None)))
        plan += [(point_key(r, k), chunk, request_options(r, k)) for r, k in VALIDATION_POINTS]
    spec = speculative_config(SERVER, None)
    plugin = plugin_config(args.head, ["top_alpha", "entropy", "fly", "judge"])
    sitting = Sitting(store, args.concurrency, 0, args.max_minutes)
    sitting.work_on(lambda: start_server(args.testbed / "target", SERVER, spec, plugin, OUT / "server.log",
                                         "float32", 2048), plan)
    done = {k: len(v) for k, v in store.requests.items()}
    log(f"serve: responses per point {done}")


def pair_id(prompt_id: str, point: str) -> str:
    return hashlib.sha256(f"{prompt_id}|{point}".encode()).hexdigest()[:10]


def pairs(args) -> None:
    """The differing pairs for a blind reading (pairs.jsonl) and their key (key.jsonl). A pair
    already written keeps its place and its order; new ones are appended, shuffled."""
    store = RequestStore(OUT / "store")
    lossless = store.done("lossless")
    requests = dict(chat_tasks.sharegpt_split("validation", args.prompts))
    written = {row["pair"] for row in load_jsonl(OUT / "key.jsonl")}
    new = []
    for rule, knob in VALIDATION_POINTS:
        key = point_key(rule, knob)
        for pid, row in store.done(key).items():
            if pid in lossless and row["text"] != lossless[pid]["text"] and pair_id(pid, key) not in written:
                new.append((pid, key))
    rng = random.Random(len(written))
    rng.shuffle(new)
    with (OUT / "pairs.jsonl").open("a") as blind, (OUT / "key.jsonl").open("a") as key_file:
        for pid, key in new:
            relaxed_first = rng.random() < 0.5
            texts = [store.done(key)[pid]["text"], lossless[pid]["text"]]
            first, second = texts if relaxed_first else texts[::-1]
            blind.write(json.dumps({"pair": pair_id(pid, key), "request": requests[pid], "response_1": first,
                                    "response_2": second}) + "\n")
            key_file.write(json.dumps({"pair": pair_id(pid, key), "prompt": pid, "point": key,
                                       "relaxed": 1 if relaxed_first else 2}) + "\n")
    log(f"pairs: {len(new)} new differing pairs; {len(written) + len(new)} in all ({OUT / 'pairs.jsonl'})")


# -- scoring -------------------------------------------------------------------------------------------

GSM8K_POINTS = ("judge-0.188512", "fly-0.3", "entropy-0.5", "top_alpha-0.9", "fly-1.0")  # on ngram k=8
GSM8K_PAIRS = 300
# The scorers validated, each with the thresholds offered ((scorer, judge model) -> thresholds).
LLM_THRESHOLDS = (0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
JUDGE_MAX_MODEL_LEN = 4096  # the judge server's context; its client cuts questions to it
EMBEDDING_THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def chat_pairs(args) -> list[Pair]:
    store = RequestStore(OUT / "store")
    requests = dict(chat_tasks.sharegpt_split("validation", args.prompts))
    lossless = store.done("lossless")
    return [Pair(row["pair"], requests[row["prompt"]], lossless[row["prompt"]]["text"],
                 store.done(row["point"])[row["prompt"]]["text"]) for row in load_jsonl(OUT / "key.jsonl")]


def gsm8k_pairs() -> list[tuple[Pair, bool]]:
    """(pair, answer changed) for up to GSM8K_PAIRS differing GSM8K responses of the Qwen
    benchmark's ngram k=8 server, taken in a seeded order over GSM8K_POINTS."""
    from selfjudge_vllm.answers import numeric_answer

    store = RequestStore(RESULTS / "chat_tradeoff_store")
    lossless = store.done("ngram-k8/lossless")
    questions = {f"gsm8k/{i}": row["question"] for i, row in enumerate(chat_tasks.gsm8k_rows())}
    candidates = []
    for point in GSM8K_POINTS:
        for item_id, row in store.done(f"ngram-k8/{point}").items():
            base = lossless.get(item_id)
            if item_id.startswith("gsm8k/") and base and base["text"] != row["text"]:
                changed = numeric_answer(base["text"]) != numeric_answer(row["text"])
                candidates.append((Pair(f"{item_id}|{point}", questions[item_id], base["text"], row["text"]), changed))
    random.Random(0).shuffle(candidates)
    return candidates[:GSM8K_PAIRS]


def judges(folder: Path, llm_client=None) -> dict[str, MeaningJudge]:
    """The validated scorers over one scores file (a threshold changes no score)."""
    out = {f"embedding@{t:g}": MeaningJudge(ScorerSettings.make("meaning_changes", "embedding", None, t),
                                             folder / "scores.jsonl") for t in EMBEDDING_THRESHOLDS}
    out |= {f"llm@{t:g}": MeaningJudge(ScorerSettings.make("meaning_changes", "llm", None, t), folder / "scores.jsonl",
                                       llm_client=llm_client) for t in LLM_THRESHOLDS}
    out["judged_loss"] = MeaningJudge(ScorerSettings.make("judged_loss", None, None, None), folder / "scores.jsonl",
                                      llm_client=llm_client)
    return out


def score(args) -> None:
    """Every scorer on the chat pairs and the GSM8K pairs; the LLM judges on the target alone
    (a plain server: the judge's requests are lossless anyway)."""
    from benchmarks.runner import REFERENCE
    from selfjudge_vllm.meaning import LLMJudgeClient

    sets = {"chat": chat_pairs(args), "gsm8k": [p for p, _ in gsm8k_pairs()]}
    sets = {name: sets[name] for name in args.sets}
    server, judge_client = None, None

    def client():  # one server and one client (its tokenizer loaded once) for every batch
        nonlocal server, judge_client
        if server is None:
            server = start_server(args.testbed / "target", REFERENCE, None, None, OUT / "judge-server.log", "float32",
                                  JUDGE_MAX_MODEL_LEN)
            judge_client = LLMJudgeClient(server.base, "target", str(args.testbed / "target"), args.concurrency,
                                          JUDGE_MAX_MODEL_LEN, OUT / "judge-server.log")
        return judge_client

    work = []  # (set name, pairs, judge): one judge per score kind, the embedding first (no server)
    for name, pairs in sets.items():
        kinds = {}
        for judge in judges(OUT / name, client).values():
            kinds.setdefault(judge.settings.score_key, judge)
        work += [(name, pairs, j) for j in kinds.values()
                 if ("judged_loss" if j.settings.measure == "judged_loss" else j.settings.scorer) in args.scorers]
    work.sort(key=lambda w: w[2].settings.scorer != "embedding")
    try:
        for name, pairs, judge in work:
            if judge.settings.scorer == "llm" and args.llm_pairs is not None:
                pairs = pairs[: args.llm_pairs]  # a prefix of the seeded order: the LLM costs a prefill per order
            for start in range(0, len(pairs), 32):  # persisted per batch: a kill loses one batch
                judge.score(pairs[start:start + 32])
                log(f"score: {name} {judge.settings.score_key}: {min(start + 32, len(pairs))}/{len(pairs)}")
    finally:
        if server is not None:
            server.stop()


# -- the report ----------------------------------------------------------------------------------------


def agreement(predicted: list[bool], truth: list[bool]) -> dict:
    """Precision and recall of "changed" against the truth, Cohen's kappa, and the counts."""
    from sklearn.metrics import cohen_kappa_score

    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    kappa = cohen_kappa_score(truth, predicted) if len(set(truth) | set(predicted)) > 1 else None
    return {"n": len(truth), "truth_changed": sum(truth), "predicted_changed": sum(predicted), "tp": tp, "fp": fp,
            "fn": fn, "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "kappa": None if kappa is None or kappa != kappa else float(kappa)}


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def report(args) -> None:
    """Agreement tables (RESULTS/meaning_validation/report.{json,md}) from what is scored."""
    truth_sets = {}
    gsm = gsm8k_pairs()
    truth_sets["gsm8k"] = ([p for p, _ in gsm], [c for _, c in gsm], "answer changed")
    verdicts = {row["pair"]: row["verdict"] == "different" for row in load_jsonl(OUT / "verdicts.jsonl")}
    chat = [p for p in chat_pairs(args) if p.id in verdicts]
    truth_sets["chat"] = (chat, [verdicts[p.id] for p in chat], "blind reading: different meaning")
    tables, examples = {}, {}
    for name, (pairs, truth, truth_name) in truth_sets.items():
        rows = {}
        for label, judge in judges(OUT / name).items():
            scored = [(p, t) for p, t in zip(pairs, truth) if p.key in judge.scores]
            if not scored:
                continue
            if judge.settings.measure == "judged_loss":
                predicted = [judge.verdict(p) != "kept" for p, _ in scored]
            else:
                predicted = [judge.changed(p) for p, _ in scored]
            seconds = [judge.scores[p.key]["seconds"] for p, _ in scored]
            rows[label] = {**agreement(predicted, [t for _, t in scored]), "seconds_per_pair": sum(seconds) / len(seconds),
                           "loops": sum(judge.loop(p) is not None for p, _ in scored)}
            if label in (f"embedding@{DEFAULT_THRESHOLDS['embedding']:g}", f"llm@{DEFAULT_THRESHOLDS['llm']:g}"):
                wrong = [(p, t, {**judge.scores[p.key], "loop": judge.loop(p)}) for (p, t), c in zip(scored, predicted)
                         if c != t]
                examples[f"{name}/{label}"] = [
                    {"pair": p.id, "truth": truth_name if t else "not " + truth_name,
                     "score": row.get("score"), "loop": row["loop"], "request": _short(p.request, 200),
                     "lossless": _short(p.lossless), "relaxed": _short(p.relaxed)} for p, t, row in wrong[:4]]
        tables[name] = {"truth": truth_name, "rows": rows}
    result = {"tables": tables, "examples": examples, "defaults": dict(DEFAULT_THRESHOLDS), "points": point_rates(verdicts),
              "command": "python benchmarks/meaning_validation.py --testbed testbed-qwen --stages report"}
    (OUT / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (OUT / "report.md").write_text(_markdown(result))
    log(f"report: {OUT / 'report.md'}")


def point_rates(verdicts: dict[str, bool]) -> list[dict]:
    """Per relaxed point on the chat prompts: responses served beside lossless, texts changed,
    and meanings changed by the blind reading, with an exact (Clopper-Pearson) 95% interval
    of the meaning-change rate; only once every changed text of the point has a verdict."""
    from scipy import stats

    store = RequestStore(OUT / "store")
    lossless = store.done("lossless")
    keys = load_jsonl(OUT / "key.jsonl")
    rows = []
    for rule, knob in VALIDATION_POINTS:
        point = point_key(rule, knob)
        served = [i for i in store.done(point) if i in lossless]
        changed = [i for i in served if store.done(point)[i]["text"] != lossless[i]["text"]]
        pairs = [k["pair"] for k in keys if k["point"] == point]
        if len(pairs) < len(changed) or any(p not in verdicts for p in pairs):
            continue  # not every changed text is read yet
        different = sum(verdicts[p] for p in pairs)
        low = stats.beta.ppf(0.025, different, len(served) - different + 1) if different else 0.0
        high = stats.beta.ppf(0.975, different + 1, len(served) - different) if different < len(served) else 1.0
        # acceptance against lossless on the prompts both have counters for (a cut segment has none)
        counted = set(served) - store.uncounted(point, set(served)) - store.uncounted("lossless", set(served))
        mine, base = point_summary(store, point, counted), point_summary(store, "lossless", counted)
        covered = counted and mine["timed_items"] == base["timed_items"] == len(counted)
        ratio = mine["mean_acceptance_length"] / base["mean_acceptance_length"] if covered else None
        rows.append({"point": point, "served": len(served), "texts_changed": len(changed),
                     "acceptance_vs_lossless": ratio, "acceptance_prompts": len(counted),
                     "meanings_changed": different, "rate": different / len(served), "low95": float(low),
                     "high95": float(high)})
    return rows


def _markdown(result: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f}%"

    lines = ["# Validating the meaning scorers", "",
             "Each scorer's \"meaning changed\" (a new repetition loop counts as changed) against a truth: on GSM8K "
             "pairs (lossless vs relaxed, Qwen2.5-Coder 1.5B, `ngram` k=8), whether the final answer changed; on "
             "ShareGPT chat pairs, a blind reading (benchmarks/results/meaning_validation/CRITERIA.md). judged_loss: "
             "the LLM judge's verdict is not \"kept\". Only pairs whose texts differ are listed (identical texts are "
             "unchanged by every scorer).", ""]
    for name, table in result["tables"].items():
        lines += [f"## {name}: truth = {table['truth']}", "",
                  "| scorer | n | truth changed | scorer changed | precision | recall | Cohen's kappa | new loops "
                  "| s/pair |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in table["rows"].items():
            kappa = "n/a" if r["kappa"] is None else f"{r['kappa']:.2f}"
            lines.append(f"| {label} | {r['n']} | {r['truth_changed']} | {r['predicted_changed']} | {pct(r['precision'])} "
                         f"| {pct(r['recall'])} | {kappa} | {r['loops']} | {r['seconds_per_pair']:.2f} |")
        lines.append("")
    lines += ["## How often relaxing changed what a chat answer says (the blind reading)", "",
              "Per relaxed point on the ShareGPT validation prompts, paired with lossless on the same server "
              "(`ngram` k=8): responses served, texts changed, and meanings changed by the blind reading, with an "
              "exact 95% interval of the rate.", "",
              "| point | prompts | acceptance vs lossless (prompts) | texts changed | meanings changed "
              "| rate (95% interval) |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['point']} | {r['served']} | "
              + (f"{r['acceptance_vs_lossless']:.2f}x ({r['acceptance_prompts']})" if r["acceptance_vs_lossless"]
                 else "n/a")
              + f" | {r['texts_changed']} | {r['meanings_changed']} | {pct(r['rate'])} "
              f"({pct(r['low95'])}-{pct(r['high95'])}) |" for r in result["points"]]
    lines += ["", "## Where the default scorers and the truth disagree", ""]
    for label, rows in result["examples"].items():
        for e in rows:
            lines += [f"**{label}**, pair `{e['pair']}` ({e['truth']}; score {e['score']}, loop {e['loop']!r}):", "",
                      f"> request: {e['request']!r}", ">", f"> lossless: {e['lossless']!r}", ">",
                      f"> relaxed: {e['relaxed']!r}", ""]
    lines += [f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, required=True, help="`selfjudge testbed --model qwen-coder` folder")
    parser.add_argument("--head", type=Path, default=RESULTS / "chat_judge" / "head")
    parser.add_argument("--stages", default="serve,pairs")
    parser.add_argument("--prompts", type=int, default=160, help="validation prompts (default 160)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--all-cores", action="store_true", help="give the model every core (on 2 cores: faster)")
    parser.add_argument("--llm-pairs", type=int, help="score: the LLM judges on the first N pairs of each set only")
    parser.add_argument("--sets", type=lambda t: t.split(","), default=["chat", "gsm8k"],
                        help="score: these pair sets, in this order (default chat,gsm8k)")
    parser.add_argument("--scorers", type=lambda t: t.split(","), default=["embedding", "llm", "judged_loss"],
                        help="score: these scorers only (default all; embedding alone starts no server)")
    args = parser.parse_args()
    from selfjudge_vllm.server_process import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()
    OUT.mkdir(parents=True, exist_ok=True)
    for stage in args.stages.split(","):
        {"serve": serve, "pairs": pairs, "score": score, "report": report}[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
