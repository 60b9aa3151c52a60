"""Prompt files: JSONL, one object per line.

    {"id": "gsm-1", "prompt": "Question: ...\\nAnswer:"}
    {"id": "chat-7", "messages": [{"role": "user", "content": "..."}]}

`id` is optional (default: the line number) and must be unique; `answer` (a reference
answer) is kept for calibration. `messages` is rendered with the target's chat template.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# The final answer of a response: the last match of this regex (the last number).
DEFAULT_ANSWER_PATTERN = r"-?\d+(?:\.\d+)?"


class PromptFileError(ValueError):
    """The prompt file cannot be used; the message names the line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: tuple[int, ...]
    answer: str | None = None


# Where a label run records the digests of its prompts (RUN/PROMPT_DIGESTS_FILE), and the key a
# head trained on it carries them under in its provenance.
PROMPT_DIGESTS_FILE, PROMPT_DIGESTS_KEY = "prompt_digests.json", "label_prompt_digests"
# A digest of the text a prompt is served as starts with this; label runs before it recorded
# only legacy_prompt_digest (the exact JSON content), which another rendering of the same prompt
# evades.
TEXT_DIGEST_PREFIX = "text:"


def served_texts(row: dict, tokenizer=None) -> list[str]:
    """The text a prompt is served as: `prompt` as given; `messages` (their roles and contents
    only) through the tokenizer's chat template where there is one, and always also a canonical
    "role: content" rendering, which needs no tokenizer (and no template's date)."""
    if "prompt" in row:
        return [row["prompt"]]
    messages = [{"role": str(m.get("role")), "content": m.get("content") if isinstance(m.get("content"), str)
                 else json.dumps(m.get("content"), sort_keys=True, ensure_ascii=False)}
                for m in row["messages"] if isinstance(m, dict)]
    texts = []
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    texts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
    return texts


def _text_digest(text: str) -> str:
    # whitespace removed: a trailing newline or another indentation is the same prompt here
    return TEXT_DIGEST_PREFIX + hashlib.sha256("".join(text.split()).encode()).hexdigest()[:16]


def prompt_digest(row: dict, tokenizer=None) -> str:
    """A prompt's identity by the text it is served as (not its id, file or JSON spelling), with
    whitespace removed: the same prompt given as `messages` or as their rendered `prompt` (with
    the tokenizer), with other whitespace, or with extra message keys has one digest. 64 bits of
    SHA-256: no accidental collision among any realistic number of prompts."""
    return _text_digest(served_texts(row, tokenizer)[0])


def prompt_digests(row: dict, tokenizer=None) -> list[str]:
    """Every digest a prompt is known by: its served text's (served_texts: the chat template's
    rendering where a tokenizer is given, the canonical one), and the legacy exact-content one,
    which heads labelled before the text digests carry. What `selfjudge label` records and
    `selfjudge calibrate` compares with the prompts a head was labelled on, without keeping them."""
    return [*dict.fromkeys(_text_digest(t) for t in served_texts(row, tokenizer)), legacy_prompt_digest(row)]


def legacy_prompt_digest(row: dict) -> str:
    """The digest label runs recorded before TEXT_DIGEST_PREFIX: the exact JSON content."""
    content = {"prompt": row["prompt"]} if "prompt" in row else {"messages": row["messages"]}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def read_prompt_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    rows: list[dict] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}:{number}: expected a JSON object")
        has_prompt, has_messages = "prompt" in row, "messages" in row
        if has_prompt == has_messages:
            raise PromptFileError(f"{path}:{number}: give exactly one of 'prompt' or 'messages'")
        if has_prompt and not (isinstance(row["prompt"], str) and row["prompt"]):
            raise PromptFileError(f"{path}:{number}: 'prompt' must be a non-empty string")
        if has_messages and not (isinstance(row["messages"], list) and row["messages"]):
            raise PromptFileError(f"{path}:{number}: 'messages' must be a non-empty list")
        row_id = str(row.get("id", number))
        if row_id in seen:
            raise PromptFileError(f"{path}:{number}: duplicate id {row_id!r}")
        seen.add(row_id)
        rows.append(dict(row, id=row_id))
    if not rows:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return rows


def tokenize_prompts(rows: list[dict], tokenizer, max_model_len: int, max_new_tokens: int) -> list[Prompt]:
    """Token ids per prompt; refuses prompts that leave no room for the response."""
    prompts = []
    limit = max_model_len - max_new_tokens
    for row in rows:
        if "messages" in row:
            if not getattr(tokenizer, "chat_template", None):
                raise PromptFileError(f"prompt {row['id']!r} uses 'messages' but the target has no chat template")
            ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(row["prompt"])["input_ids"]
        if len(ids) > limit:
            raise PromptFileError(
                f"prompt {row['id']!r} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} "
                f"it needs more than the context of {max_model_len}"
            )
        prompts.append(Prompt(row["id"], tuple(int(t) for t in ids), row.get("answer")))
    return prompts
