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
from selfjudge_vllm.measurement import (  # noqa: E402
    PromptItem,
    RequestStore,
    give_the_worker_every_core,
    load_jsonl,
    log,
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


def point_key(rule: str, knob: float | None) -> str:
    return "lossless" if rule == "lossless" else f"{rule}-{knob:g}"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", type=Path, required=True, help="`selfjudge testbed --model qwen-coder` folder")
    parser.add_argument("--head", type=Path, default=RESULTS / "chat_judge" / "head")
    parser.add_argument("--stages", default="serve,pairs")
    parser.add_argument("--prompts", type=int, default=160, help="validation prompts (default 160)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--all-cores", action="store_true", help="give the model every core (on 2 cores: faster)")
    args = parser.parse_args()
    from selfjudge_vllm.server_process import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()
    OUT.mkdir(parents=True, exist_ok=True)
    for stage in args.stages.split(","):
        {"serve": serve, "pairs": pairs}[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
