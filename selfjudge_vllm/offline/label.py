"""`selfjudge label`: prompts -> target responses -> draft mismatches -> semantic
preservation scores -> hidden-state features, as resumable sharded stages.

Stages (each a folder of the run, each shard written atomically, each engine built only if
a stage has work left):
  responses   target greedy responses (token ids), through vLLM's offline API
  mismatches  the draft's teacher-forced top-1 along each response (draft prompt_logprobs)
  scores      S_orig - S_sub for every mismatch, every suffix length, both suffix modes
              (target prompt_logprobs on the response and on each substituted window), and
              the log-probability evidence verification holds for the draft token
  features    the target's final-norm hidden state at position m of y' and of y (vLLM
              pooling engine: the same numbers the plugin reads at serving time), and
              their float16 copy in features-float16 (store.compact_features), small
              enough to commit so that a clone trains without labelling again
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from selfjudge_vllm.answers import pattern_answer
from selfjudge_vllm.features import evidence_from_logprobs
from selfjudge_vllm.files import file_sha256
from selfjudge_vllm.offline.engine import EngineSettings, engine, greedy_responses, hidden_states, prompt_logprobs
from selfjudge_vllm.offline.prompts import (
    PROMPT_DIGESTS_FILE,
    Prompt,
    prompt_digests,
    read_prompt_file,
    tokenize_prompts,
)
from selfjudge_vllm.offline.proposers import NgramSettings, ngram_mismatches
from selfjudge_vllm.offline.scores import semantic_preservation_scores, window_end
from selfjudge_vllm.offline.store import RunDir, RunError, compact_features

logger = logging.getLogger("selfjudge.label")


class InputError(ValueError):
    """Bad models or prompts, found before any expensive work."""


@dataclass(frozen=True)
class LabelSettings:
    target: str
    draft: str
    prompts: str
    suffix_lengths: tuple[int, ...] = (0, 5, 10, 20)
    max_new_tokens: int = 128
    shard_size: int = 64
    engine: EngineSettings = EngineSettings()
    # Also label the mismatches vLLM's ngram proposer would meet along each response, so one
    # head is trained on what each served proposer drafts (records then name their proposers).
    ngram: NgramSettings | None = None
    # With a pattern: for every mismatch of a prompt that has a reference "answer", let the
    # target finish the substituted response and record whether its final answer (the last
    # match of this regex) is unchanged. `selfjudge train --tau-from-answers` uses these.
    answer_pattern: str | None = None


def _check_model_dir(path: str, role: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise InputError(f"{role} model {path!r}: no config.json there (a local HF-format folder is needed)")


def check_inputs(settings: LabelSettings) -> list[Prompt]:
    """Everything that can be checked without an engine."""
    from transformers import AutoTokenizer

    _check_model_dir(settings.target, "target")
    _check_model_dir(settings.draft, "draft")
    if any(n < 0 for n in settings.suffix_lengths) or not settings.suffix_lengths:
        raise InputError("suffix lengths must be non-negative and at least one")
    if settings.ngram is not None and not (settings.ngram.k >= 1 and 1 <= settings.ngram.min_n <= settings.ngram.max_n):
        raise InputError(f"ngram proposer settings {settings.ngram}: need k >= 1 and 1 <= min_n <= max_n")
    if settings.answer_pattern is not None:
        try:
            re.compile(settings.answer_pattern)
        except re.error as exc:
            raise InputError(f"--answer-pattern is not a valid regular expression: {exc}") from None
    target_tok = AutoTokenizer.from_pretrained(settings.target)
    draft_tok = AutoTokenizer.from_pretrained(settings.draft)
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise InputError(
            f"draft {settings.draft!r} has another tokenizer than target {settings.target!r}; "
            "token-level mismatches need one shared vocabulary"
        )
    rows = read_prompt_file(settings.prompts)
    return tokenize_prompts(rows, target_tok, settings.engine.max_model_len, settings.max_new_tokens)


def _shards(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


@dataclass
class LabelJob:
    """What every stage reads: the settings, the run store and the prompts of each shard."""

    settings: LabelSettings
    run: RunDir
    shards: list[list[Prompt]]

    def sequences(self, i: int) -> dict[str, list[int]]:
        """Prompt + response token ids of shard i, by prompt id."""
        return {r["id"]: r["prompt"] + r["response"] for r in self.run.read_records("responses", i)}


# -- the stages: each writes one shard of its folder from its inputs on the run store ----------


def responses_shard(llm, job: LabelJob, i: int) -> None:
    """The target's greedy response to each prompt of shard i."""
    shard = job.shards[i]
    outs = greedy_responses(llm, [list(p.token_ids) for p in shard], job.settings.max_new_tokens)
    job.run.write_records("responses", i, [
        {"id": p.id, "prompt": list(p.token_ids), "response": out, "answer": p.answer}
        for p, out in zip(shard, outs)
    ])


def mismatches_shard(llm, job: LabelJob, i: int) -> None:
    """Every response position where a served proposer drafts another token than the target."""
    settings = job.settings
    records = job.run.read_records("responses", i)
    seqs = [r["prompt"] + r["response"] for r in records]
    out = []
    for r, seq, lp in zip(records, seqs, prompt_logprobs(llm, seqs)):
        # The draft model's greedy token at every response position (teacher-forced).
        found = {(m, int(lp.top1_id[m])): ["draft_model"]
                 for m in range(len(r["prompt"]), len(seq)) if lp.top1_id[m] != seq[m]}
        if settings.ngram is not None:
            for key in ngram_mismatches(seq, len(r["prompt"]), settings.ngram, settings.engine.max_model_len):
                found.setdefault(key, []).append("ngram")
        for (m, draft), proposers in sorted(found.items()):
            record = {"id": r["id"], "m": m, "draft": draft, "target": seq[m]}
            out.append(record if settings.ngram is None else dict(record, proposers=proposers))
    job.run.write_records("mismatches", i, out)


def scores_shard(llm, job: LabelJob, i: int) -> None:
    """The semantic preservation scores and the logit features of each mismatch."""
    items = job.run.read_records("mismatches", i)
    if not items:  # a shard whose responses the draft predicted perfectly
        job.run.write_records("scores", i, [])
        return
    max_n = max(job.settings.suffix_lengths)
    seqs = job.sequences(i)
    originals = dict(zip(seqs, prompt_logprobs(llm, list(seqs.values()))))
    windows = []
    for it in items:
        y = seqs[it["id"]]
        end = window_end(it["m"], max_n, len(y))
        windows.append(y[: it["m"]] + [it["draft"]] + y[it["m"] + 1 : end])
    # A window shares y[:m] with the response just scored, so its prefix comes from
    # vLLM's prefix cache (whole blocks). When the cache covers position m itself (m on
    # a block boundary), entry m is missing: score that window again without the cache.
    subs = prompt_logprobs(llm, windows, read_prefix_cache=True)
    redo = [k for k, (it, sub) in enumerate(zip(items, subs)) if sub.cached_tokens >= it["m"]]
    if redo:
        for k, sub in zip(redo, prompt_logprobs(llm, [windows[k] for k in redo])):
            subs[k] = sub
    out = []
    for it, window, sub in zip(items, windows, subs):
        m, y = it["m"], seqs[it["id"]]
        end = len(window)
        if np.isnan(sub.actual[m:end]).any() or np.isnan(sub.top1[m + 1 : end]).any():
            raise RuntimeError(f"prompt {it['id']!r}, position {m}: vLLM returned no log-prob")
        s = semantic_preservation_scores(
            m, len(y), originals[it["id"]].actual[m:end], sub.actual[m:end], sub.top1[m:end],
            job.settings.suffix_lengths,
        )
        scores_by_mode = {mode: {str(n): v for n, v in by_n.items()} for mode, by_n in s.items()}
        out.append(dict(it, scores=scores_by_mode, cached_prefix=sub.cached_tokens,
                        evidence=verification_evidence(originals[it["id"]], sub, m, end)))
    job.run.write_records("scores", i, out)


def features_shard(llm, job: LabelJob, i: int) -> None:
    """The target's final-norm hidden state at m of the substituted and the original sequence."""
    run = job.run
    items = run.read_records("scores", i)
    if not items:  # zero rows of the hidden width, so every shard concatenates
        empty = torch.zeros(0, run.read_json("target.json")["hidden_size"])
        run.write_tensors("features", i, {"substituted": empty, "original": empty})
        run.write_records("features", i, [])
        return
    seqs = job.sequences(i)
    ids_with_items = sorted({it["id"] for it in items})
    full = dict(zip(ids_with_items, hidden_states(llm, [seqs[r] for r in ids_with_items])))
    orig_rows = [full[it["id"]][it["m"]] for it in items]
    # y' only matters up to position m (causal): feed y'[:m+1] and take its last row. Its
    # prefix y[:m] is in the prefix cache from the originals just encoded, so each
    # substitution computes at most one block, not the whole prompt and response again.
    substituted = [seqs[it["id"]][: it["m"]] + [it["draft"]] for it in items]
    sub_rows = [h[-1] for h in hidden_states(llm, substituted, read_prefix_cache=True)]
    run.write_tensors("features", i, {
        "substituted": torch.stack(sub_rows).float(),
        "original": torch.stack(orig_rows).float(),
    })
    run.write_records("features", i, [{"id": it["id"], "m": it["m"]} for it in items])


def outcomes_shard(llm, job: LabelJob, i: int) -> None:
    """Whether each mismatch's substitution changes the final answer (prompts with answers)."""
    job.run.write_records("outcomes", i, answer_outcomes(
        llm, job.run.read_records("responses", i), job.run.read_records("scores", i),
        re.compile(job.settings.answer_pattern), job.settings.max_new_tokens))


@dataclass(frozen=True)
class Stage:
    name: str
    work: Callable  # (llm, job, shard index) -> None, writes the stage's shard
    engine: str  # which engine it needs: "target", "draft" or "pooling" (the target's hidden states)
    inputs: tuple[str, ...]  # stages whose shards it reads


STAGES = (
    Stage("responses", responses_shard, "target", ()),
    Stage("mismatches", mismatches_shard, "draft", ("responses",)),
    Stage("scores", scores_shard, "target", ("responses", "mismatches")),
    Stage("features", features_shard, "pooling", ("responses", "scores")),
    Stage("outcomes", outcomes_shard, "target", ("responses", "scores")),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def stage_done(run: RunDir, stage: str, i: int) -> bool:
    """Shard i of the stage is complete (the features stage writes records and tensors)."""
    return run.has(stage, i) and (stage != "features" or run.has(stage, i, "safetensors"))


def run_stage_shards(job: LabelJob, stage: Stage, indices: list[int], progress=None) -> None:
    """One engine for `stage`, then its work on each of the shards (what a Ray task runs)."""
    settings = job.settings
    model = settings.draft if stage.engine == "draft" else settings.target
    with engine(model, settings.engine, pooling=stage.engine == "pooling") as llm:
        for i in progress(indices, desc=stage.name, unit="shard") if progress else indices:
            stage.work(llm, job, i)


def run_stage(job: LabelJob, stage: Stage, progress, executor=None, allow_partial: bool = False) -> None:
    """Run `stage` on every shard it lacks, here or on `executor` (offline/ray_label.py), then
    record its provenance. Its inputs must be complete, or with `allow_partial` it runs on the
    shards whose inputs are."""
    run, settings = job.run, job.settings
    ready = set(range(len(job.shards)))
    for needed in stage.inputs:
        # Raises IncompleteRunError naming the missing shards unless allow_partial.
        ready &= set(run.complete_shards(needed, allow_partial=allow_partial))
    if len(ready) < len(job.shards):
        logger.info("%s: only shards %s have their inputs (%s); the others are left for a later run",
                    stage.name, sorted(ready), ", ".join(stage.inputs))
    run.remove_partial_files(stage.name)
    pending = [i for i in sorted(ready) if not stage_done(run, stage.name, i)]
    if pending and executor is None:
        run_stage_shards(job, stage, pending, progress)
    elif pending:
        executor.run(job, stage, pending, progress)
    info = {"target": settings.target, "draft": settings.draft, "seed": settings.engine.seed}
    if stage.name == "outcomes":
        info["answer_pattern"] = settings.answer_pattern
    run.write_provenance(stage.name, info)


def prepare_job(settings: LabelSettings, out_dir: str | Path) -> LabelJob:
    """Check the inputs and bind them to the run folder (settings, shard count, target)."""
    prompts = check_inputs(settings)
    run = RunDir(out_dir)
    # The answer pattern is read only by the outcomes stage: it may be added to a finished run.
    # The prompts are bound by content (a run started before digests were recorded gains one).
    bound = dict(json.loads(json.dumps(asdict(settings))), prompts_sha256=file_sha256(settings.prompts))
    run.bind_settings(bound, addable=("answer_pattern", "prompts_sha256"), digests={"prompts": "prompts_sha256"})
    if settings.answer_pattern is None:  # a rerun without it goes on with the run's
        settings = replace(settings, answer_pattern=run.read_json("run.json").get("answer_pattern"))
    # Which prompts the head will have seen, so calibrate can keep them out of its certificate.
    # By the text each is served as (the target's chat template renders `messages`), in every form.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.target)
    run.write_json(PROMPT_DIGESTS_FILE, sorted({d for r in read_prompt_file(settings.prompts)
                                                for d in prompt_digests(r, tokenizer)}))
    shards = _shards(prompts, settings.shard_size)
    run.bind_shard_count(len(shards))
    write_target_identity(run, settings.target)
    return LabelJob(settings, run, shards)


def run_label(settings: LabelSettings, out_dir: str | Path, progress=None,
              stages: tuple[str, ...] | None = None, executor=None, allow_partial: bool = False) -> RunDir:
    """Every stage in order (outcomes only with an answer pattern), or just `stages`; the
    shards of each stage here, or as tasks of `executor` (offline/ray_label.RayExecutor);
    with `allow_partial`, each stage on the shards whose inputs are complete."""
    if progress is None:
        from tqdm.auto import tqdm as progress
    unknown = set(stages or ()) - set(STAGE_NAMES)
    if unknown:
        raise InputError(f"unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(STAGE_NAMES)}")
    job = prepare_job(settings, out_dir)  # its settings carry the run's answer pattern if it has one
    if "outcomes" in (stages or ()) and job.settings.answer_pattern is None:
        raise InputError("the outcomes stage needs --answer-pattern")
    for stage in STAGES:
        if stages is not None and stage.name not in stages:
            continue
        if stage.name == "outcomes" and job.settings.answer_pattern is None:
            continue
        run_stage(job, stage, progress, executor, allow_partial)
        if stage.name == "features":
            try:
                compacted = compact_features(job.run)
            except RunError as exc:  # the float32 features stand: only the committable copy is missing
                logger.warning("features-float16 not written: %s", exc)
            else:
                logger.info("features-float16: %d shard(s) written, %d up to date",
                            len(compacted["written"]), len(compacted["kept"]))
    return job.run


def verification_evidence(original, substituted, m: int, end: int) -> dict[str, float | None]:
    """The logit features (selfjudge_vllm/features.py) of the mismatch at m, from the
    response's and the substituted window's prompt_logprobs."""
    return evidence_from_logprobs(
        substituted.actual[m], original.top1[m], substituted.top1[m + 1] if m + 1 < end else None)


def answer_outcomes(llm, responses: list[dict], items: list[dict], pattern, max_new_tokens: int) -> list[dict]:
    """Substitute d_m, let the target finish greedily within the original length budget,
    and compare final answers with the original response's."""
    from vllm import SamplingParams

    from selfjudge_vllm.offline.engine import tokens_prompt

    by_id = {r["id"]: r for r in responses if r.get("answer") is not None}
    items = [it for it in items if it["id"] in by_id]
    if not items:
        return []
    tokenizer = llm.get_tokenizer()
    prompts, budgets = [], []
    for it in items:
        r = by_id[it["id"]]
        y = r["prompt"] + r["response"]
        prompts.append(y[: it["m"]] + [it["draft"]])
        budgets.append(max(1, max_new_tokens - (it["m"] - len(r["prompt"])) - 1))
    params = [SamplingParams(max_tokens=b, temperature=0.0, detokenize=False) for b in budgets]
    outputs = llm.generate([tokens_prompt(p) for p in prompts], params, use_tqdm=False)
    records = []
    for it, prefix, out in zip(items, prompts, outputs):
        r = by_id[it["id"]]
        substituted = prefix[len(r["prompt"]):] + list(out.outputs[0].token_ids)
        original_answer = pattern_answer(tokenizer.decode(r["response"]), pattern)
        substituted_answer = pattern_answer(tokenizer.decode(substituted), pattern)
        records.append({
            "id": it["id"], "m": it["m"], "draft": it["draft"],
            "original_answer": original_answer,
            "substituted_answer": substituted_answer,
            "reference": str(r["answer"]),
            "unchanged": original_answer == substituted_answer,
        })
    return records


def write_target_identity(run: RunDir, target: str) -> None:
    """The served-model identity the artifact will carry, from the target's HF config
    (the same fields the plugin checks at start-up)."""
    if (run.root / "target.json").is_file():
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    run.write_json("target.json", {
        "name": target,
        "architecture": (config.architectures or ["unknown"])[0],
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "num_hidden_layers": text.num_hidden_layers,
    })
