"""The reference-free measures (selfjudge_vllm/meaning.py): the loop check on made-up pairs,
the LLM judges' decisions from logprobs, persisted scores, the scorer settings a certificate
binds, calibrate's pairing and certification under meaning_changes and judged_loss, and
(marked `server`) both scorers and judged_loss through `selfjudge calibrate` on tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from selfjudge_vllm import calibrate, meaning, measurement
from selfjudge_vllm.answers import AnswerKind
from selfjudge_vllm.cli import main
from selfjudge_vllm.meaning import MeaningJudge, Pair, ScorerSettings

PLAN = "Here is a weekly running plan for a beginner. Monday: run 3 km at an easy pace. Tuesday: rest."


# -- the loop check ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, loop", [
    (PLAN, None),
    (PLAN + " Run 5 km on Monday and rest on Tuesday." * 4, "Run 5 km on Monday and rest on Tuesday."),
    ("very very very very good", None),  # style, not a loop: too short
    ("- buy milk\n" * 9, "- buy milk"),  # a list item repeated: 27 words going round
    ("| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |", None),  # a table is not a loop
    ("| Day | Mon | Tue | Wed | Thu | Fri | Sat | Sun |\n| --- | --- | --- | --- | --- | --- | --- | --- |", None),
    ("row = [" + "0, " * 19 + "0]", None),  # markup and numbers repeat in good answers
    ("      }\n    }\n  }\n}\n" * 4, None),
    # no spaces: by character (the loop starts at the first sentence's "跑步。", a rotation of the unit)
    ("我建议你每天跑步。" + "我们可以一起跑步。" * 6, "跑 步 。 我 们 可 以 一 起"),
    (" ".join(f"w{k}" for k in range(60)) + " " + " ".join(f"w{k}" for k in range(60)) + " "
     + " ".join(f"w{k}" for k in range(30)), " ".join(f"w{k}" for k in range(60))),  # said twice, cut on the third
    ("1. one 2. two 3. three 4. four 5. five 6. six 7. seven 8. eight 9. nine", None),  # counting moves on
    ("the cat " * 8, "the cat"),
])
def test_a_repetition_loop_is_found_and_style_is_not(text, loop):
    assert meaning.repetition_loop(text) == loop


def test_only_a_loop_the_lossless_response_lacks_is_new():
    looping = PLAN + " I hope this helps!" * 6
    assert meaning.new_loop(PLAN, looping) == "I hope this helps!"
    assert meaning.new_loop(looping, looping + " Good luck.") is None  # the model's own loop
    assert meaning.new_loop(looping, PLAN) is None  # relaxing removed a loop: not a change by this check
    # a loop of the lossless response's own masks no other loop, nor a much longer run of its own
    other = PLAN + " Run 5 km on Monday and rest on Tuesday." * 4
    assert meaning.new_loop(other, looping) == "I hope this helps!"
    assert meaning.new_loop(looping, PLAN + " I hope this helps!" * 30) == "I hope this helps!"
    assert meaning.new_loop(looping, PLAN + " I hope this helps!" * 7) is None  # one repeat more: the same


# -- decisions from logprobs ------------------------------------------------------------------------------------


def test_option_mass_sums_spellings_and_a_judge_that_does_not_answer_is_undecided():
    top = {" Yes": math.log(0.5), "yes": math.log(0.1), "No": math.log(0.2), "Maybe": math.log(0.2)}
    mass = meaning.option_mass(top, meaning.ANSWER_WORDS["equivalence"])
    assert mass == pytest.approx({"yes": 0.6, "no": 0.2})
    assert meaning.decided(mass) == pytest.approx({"yes": 0.75, "no": 0.25})
    # "The" at 0.9 and "Yes" at 0.01: the judge did not answer; renormalising would say 100% yes
    assert meaning.decided(meaning.option_mass({"The": math.log(0.9), "Yes": math.log(0.01)},
                                               meaning.ANSWER_WORDS["equivalence"])) is None


def test_same_meaning_averages_both_orders_and_undecided_counts_as_no():
    assert meaning.same_meaning_probability({"yes": 0.9, "no": 0.1}, {"yes": 0.5, "no": 0.5}) == pytest.approx(0.7)
    assert meaning.same_meaning_probability({"yes": 0.0, "no": 0.0}, {"yes": 1.0, "no": 0.0}) == pytest.approx(0.5)
    assert meaning.same_meaning_probability({"yes": 0.01, "no": 0.0}, {"yes": 0.02, "no": 0.0}) == 0.0


def test_the_preference_verdict_cancels_position_bias_and_no_answer_is_lost():
    always_a = {"a": 1.0, "b": 0.0, "c": 0.0}  # a judge that always prefers the first shown
    assert meaning.preference_verdict(always_a, always_a) == "kept"
    lossless_better = ({"a": 0.8, "b": 0.1, "c": 0.1}, {"a": 0.1, "b": 0.8, "c": 0.1})
    assert meaning.preference_verdict(*lossless_better) == "lost"
    assert meaning.preference_verdict(*lossless_better[::-1]) == "gained"
    sure_equal = {"a": 0.06, "b": 0.04, "c": 0.9}  # mostly "equally good": kept, whatever the rest says
    assert meaning.preference_verdict(sure_equal, {"a": 0.05, "b": 0.05, "c": 0.9}) == "kept"
    assert meaning.preference_verdict({"a": 0, "b": 0, "c": 0}, always_a) == "undecided"


def test_a_question_too_long_for_the_context_is_cut_evenly():
    encode, decode = (lambda text: text.split(" ")), (lambda ids: " ".join(ids))
    template = "Q {request} | {first} | {second}"
    long_a, long_b = " ".join(["a"] * 100), " ".join(["b"] * 50)
    question, cut = meaning.fit_question(template, "req", long_a, long_b, encode, decode, 60)
    assert cut and len(encode(question)) <= 60
    assert question.count("a") == question.count("b") > 10  # the same length of each response
    assert meaning.fit_question(template, "req", "a", "b", encode, decode, 60) == ("Q req | a | b", False)


def test_the_judge_reads_the_whole_conversation():
    row = {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi?"}]}
    assert meaning.request_text(row) == "System: Answer in French.\n\nUser: Hi?"
    assert meaning.request_text({"messages": [{"role": "user", "content": "Hi?"}]}) == "Hi?"
    assert meaning.request_text({"prompt": "raw"}) == "raw"


# -- settings ---------------------------------------------------------------------------------------------------


def test_scorer_settings_defaults_and_refusals():
    emb = ScorerSettings.make("meaning_changes", None, None, None)
    assert (emb.scorer, emb.model, emb.threshold, emb.prompt_version) == ("embedding", "all-MiniLM-L6-v2", 0.99, None)
    llm = ScorerSettings.make("meaning_changes", "llm", None, 0.6)
    assert (llm.model, llm.threshold, llm.prompt_version) == ("target", 0.6, meaning.EQUIVALENCE_PROMPT_VERSION)
    assert ScorerSettings.make("meaning_changes", "llm", None, None).threshold == 0.7
    judged = ScorerSettings.make("judged_loss", None, "draft-dir", None)
    assert (judged.scorer, judged.model, judged.prompt_version) == ("llm", "draft-dir",
                                                                    meaning.PREFERENCE_PROMPT_VERSION)
    assert emb.score_key != llm.score_key != judged.score_key
    assert llm.score_key == ScorerSettings.make("meaning_changes", "llm", None, 0.3).score_key  # threshold: no rescore
    for args, message in [(("judged_loss", "embedding", None, None), "decided by an LLM judge"),
                          (("judged_loss", None, None, 0.5), "does not apply to judged_loss"),
                          (("meaning_changes", "bleu", None, None), "unknown scorer"),
                          (("meaning_changes", "embedding", "other-model", None), "embedding scorer's model"),
                          (("meaning_changes", "llm", None, 1.5), r"must lie in \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            ScorerSettings.make(*args)


# -- scoring, persisted ---------------------------------------------------------------------------------------------


class WordOverlap:
    """A stand-in embedder: the Jaccard overlap of word sets (counts its calls)."""

    calls = 0

    def cosine(self, texts, references):
        WordOverlap.calls += len(texts)
        return [len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split())) for a, b in
                zip(texts, references)]


class ScriptedJudge:
    """A stand-in LLM client: answers from the question text, records what it was asked."""

    def __init__(self, answer, fail_after=None):
        self.answer, self.questions, self.fail_after = answer, [], fail_after

    def question(self, template, request, first, second):
        return template.format(request=request, first=first, second=second), False

    def top_logprobs(self, questions, on_answer=lambda index, top: None):
        out = []
        for index, question in enumerate(questions):
            if self.fail_after is not None and len(self.questions) >= self.fail_after:
                raise RuntimeError("the judge model's server failed a question")
            self.questions.append(question)
            out.append(self.answer(question))
            on_answer(index, out[-1])
        return out


def test_scores_persist_and_another_threshold_rescores_nothing(tmp_path):
    path = tmp_path / "scores.jsonl"
    pairs = [Pair("a", "q", "the cat sat on the mat", "the cat sat on a mat"),
             Pair("b", "q", "the cat sat", "a dog ran far away"), Pair("c", "q", "same", "same"),
             Pair("d", "q", PLAN, PLAN + " I hope this helps!" * 6)]
    WordOverlap.calls = 0
    strict = MeaningJudge(ScorerSettings.make("meaning_changes", "embedding", None, 0.9), path,
                          embedder_factory=WordOverlap)
    strict.score(pairs)
    assert WordOverlap.calls == 3  # identical texts need no scorer
    assert [strict.changed(p) for p in pairs] == [True, True, False, True]
    loose = MeaningJudge(ScorerSettings.make("meaning_changes", "embedding", None, 0.5), path,
                         embedder_factory=WordOverlap)
    loose.score(pairs)
    assert WordOverlap.calls == 3  # read back, not scored again
    # the loop decides "d" whatever the (high) overlap says
    assert [loose.changed(p) for p in pairs] == [False, True, False, True]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["id"] for r in rows} == {"a", "b", "d"} and loose.loop(pairs[3]) == "I hope this helps!"


def test_the_llm_scorer_asks_both_orders_and_decides_from_yes_and_no(tmp_path):
    def answer(question):  # "same" only when the cat response comes first
        first = question.split("Response 1:")[1]
        return {"Yes": math.log(0.9), "No": math.log(0.1)} if "cat" in first.split("Response 2:")[0] else \
            {"Yes": math.log(0.3), "No": math.log(0.7)}

    judge_client = ScriptedJudge(answer)
    judge = MeaningJudge(ScorerSettings.make("meaning_changes", "llm", None, 0.5), tmp_path / "s.jsonl",
                         llm_client=lambda: judge_client)
    pair = Pair("a", "Describe a pet.", "A cat.", "A kitten.")
    judge.score([pair])
    assert len(judge_client.questions) == 2
    assert "A cat." in judge_client.questions[0].split("Response 2:")[0]  # lossless first, then swapped
    assert "A kitten." in judge_client.questions[1].split("Response 2:")[0]
    assert "Describe a pet." in judge_client.questions[0]
    assert judge.scores[pair.key]["score"] == pytest.approx(0.6)
    assert judge.changed(pair) is False  # 0.6 >= 0.5


def test_each_pair_is_kept_as_soon_as_it_is_decided(tmp_path):
    """A judge server that fails half way loses no pair already decided."""
    client = ScriptedJudge(lambda q: {"Yes": 0.0}, fail_after=5)
    judge = MeaningJudge(ScorerSettings.make("meaning_changes", "llm", None, None), tmp_path / "s.jsonl",
                         llm_client=lambda: client)
    pairs = [Pair(str(i), "q", f"a{i}", f"b{i}") for i in range(5)]
    with pytest.raises(RuntimeError):
        judge.score(pairs)
    kept = [json.loads(line)["id"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert kept == ["0", "1"]  # questions 0-3 answered: two pairs, both orders each


def test_judged_loss_verdicts_and_a_new_loop_or_no_answer_is_lost(tmp_path):
    def answer(question):  # prefers the shorter response wherever it is shown; no answer about "mute"
        if "mute" in question:
            return {"**": 0.0}
        a = question.split("Response A:")[1].split("Response B:")[0]
        b = question.split("Response B:")[1]
        return {"A": 0.0} if len(a) < len(b.split(">>>")[0]) else {"B": 0.0}

    judge = MeaningJudge(ScorerSettings.make("judged_loss", None, None, None), tmp_path / "s.jsonl",
                         llm_client=lambda: ScriptedJudge(answer))
    shorter, longer = Pair("a", "q", "short", "a longer answer"), Pair("b", "q", "a longer answer", "short")
    looping = Pair("c", "q", "short", "short " + "go round and round " * 6)
    mute = Pair("d", "mute", "short", "other")
    judge.score([shorter, longer, looping, mute])
    assert [judge.verdict(p) for p in (shorter, longer, looping, mute)] == ["lost", "gained", "lost", "lost"]


# -- through calibrate's pairing --------------------------------------------------------------------------------


def _judgement(tmp_path, measure, rows, client=None, threshold=None):
    settings = ScorerSettings.make(measure, "llm" if client else "embedding", None, threshold)
    return calibrate.Judgement(AnswerKind("text"), rows, MeaningJudge(settings, tmp_path / "scores.jsonl",
                                                                     llm_client=lambda: client,
                                                                     embedder_factory=WordOverlap))


def test_paired_risk_counts_meaning_changes_on_the_items_both_have(tmp_path):
    rows = {i: {"id": i, "messages": [{"role": "user", "content": f"question {i}"}]} for i in "abcd"}
    base = {"a": {"text": "x y z w"}, "b": {"text": "x y z w"}, "c": {"text": "p q"}, "d": {"text": "x"}}
    mine = {"a": {"text": "x y z w"}, "b": {"text": "x y z v"}, "c": {"text": "r s"}}  # d not served
    risk = calibrate.paired_risk(_judgement(tmp_path, "meaning_changes", rows, threshold=0.5), "meaning_changes",
                                 mine, base, list(rows))
    assert (risk.n, risk.changes) == (3, 1)  # b keeps 3 of 5 words (0.6), c none


def _simulated_meaning_certifies(tmp_path, risk, n, budget, runs, rng):
    """Share of runs certifying when each prompt's relaxed text changes meaning (shares no word
    with lossless) with probability `risk`, and otherwise differs in one word of ten (0.82)."""
    hits = 0
    for run in range(runs):
        rows = {str(i): {"id": str(i), "prompt": "q"} for i in range(n)}
        words = [f"w{k}" for k in range(10)]
        base = {str(i): {"text": " ".join(words) + f" {run}.{i}"} for i in range(n)}
        changed = rng.random(n) < risk
        mine = {str(i): {"text": ("z " * 11 if c else " ".join(words[:-1]) + f" v {run}.{i}")}
                for i, c in enumerate(changed)}
        judgement = _judgement(tmp_path / str(run), "meaning_changes", rows, threshold=0.7)
        result = calibrate.paired_risk(judgement, "meaning_changes", mine, base, list(rows))
        assert result.changes == changed.sum()
        hits += result.p_value("meaning_changes", budget, 0.05) <= 0.05
    return hits / runs


def test_a_meaning_change_rate_at_the_budget_certifies_at_most_delta(tmp_path, monkeypatch):
    """The guarantee through calibrate's own pairing code: at a true meaning-change rate equal
    to the budget, at most delta of runs certify (the exact binomial test)."""
    # Every score is still written and read back; only the per-row fsync (~40,000 of them,
    # most of this test's time) is skipped: durability decides nothing here.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    rng = np.random.default_rng(3)
    runs = 300
    at_budget = _simulated_meaning_certifies(tmp_path, 0.1, 120, 0.1, runs, rng)
    assert at_budget <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs), at_budget
    assert _simulated_meaning_certifies(tmp_path, 0.01, 120, 0.1, 30, rng) > 0.9


def test_judged_loss_is_certified_by_the_net_loss_test(tmp_path):
    rows = {str(i): {"id": str(i), "prompt": "q"} for i in range(6)}
    base = {str(i): {"text": "short"} for i in range(6)}
    mine = {"0": {"text": "a longer answer"}, "1": {"text": "short"}, "2": {"text": "a longer answer"},
            "3": {"text": "short"}, "4": {"text": "short"}, "5": {"text": "short"}}

    def prefers_short(question):
        a = question.split("Response A:")[1].split("Response B:")[0]
        b = question.split("Response B:")[1]
        return {"A": 0.0} if len(a) < len(b.split(">>>")[0]) else {"B": 0.0}

    settings = ScorerSettings.make("judged_loss", None, None, None)
    judgement = calibrate.Judgement(AnswerKind("text"), rows, MeaningJudge(
        settings, tmp_path / "s.jsonl", llm_client=lambda: ScriptedJudge(prefers_short)))
    risk = calibrate.paired_risk(judgement, "judged_loss", mine, base, list(rows))
    assert (risk.n, risk.lost, risk.gained, risk.changes) == (6, 2, 0, 2)
    assert risk.observed("judged_loss") == pytest.approx(2 / 6)
    assert risk.p_value("judged_loss", 0.05, 0.05) == pytest.approx(
        calibrate.certify.p_value("accuracy", 6, 0.05, lost=2, gained=0, level=0.05))


def test_another_scorer_or_threshold_after_a_certificate_is_exploratory(monkeypatch, tmp_path):
    """The certificate binds the scorer and its threshold: a rerun with another threshold
    serves and scores nothing again (the scores are kept) but certifies nothing."""
    from tests import simulated_engine as sim

    WordOverlap.calls = 0
    monkeypatch.setattr(meaning, "SentenceEmbedder", WordOverlap)
    engine = sim.SimulatedEngine({("top_alpha", 0.9): 0.0, ("top_alpha", 0.2): 0.3}, seed=1)
    engine.install(monkeypatch)
    prompts = sim.write_prompts(tmp_path / "p.jsonl", 60)
    grids = {"top_alpha": (0.9, 0.2)}

    def run(threshold):
        return calibrate.run(sim.settings(prompts, tmp_path / "out", grids, measure="meaning_changes",
                                          answer=AnswerKind("text"), scorer="embedding", scorer_threshold=threshold))

    status, report = run(0.9)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and report["scorer"]["threshold"] == 0.9
    served, calls = len(engine.served), WordOverlap.calls
    assert calls > 0  # "#### 1" against "#### 8": differing texts were scored
    status, report = run(0.5)
    assert status == calibrate.EXIT_EXPLORATORY and "scorer (" in report["verdict"], report["verdict"]
    assert (len(engine.served), WordOverlap.calls) == (served, calls)  # nothing served or scored again
    status, report = run(0.9)  # the bound settings again: certified as before
    assert status == calibrate.EXIT_RELAXED_CERTIFIED


# -- the command's input checks -------------------------------------------------------------------------------


def _argv(tmp_path, *extra):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    return ["calibrate", "--target", str(tmp_path / "no-model"), "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 4}', "--prompts", str(prompts),
            "--out", str(tmp_path / "out"), "--budget", "0.05", *extra]


@pytest.mark.parametrize("extra, message", [
    (("--measure", "meaning_changes", "--scorer", "llm", "--scorer-threshold", "2"), "must lie in (0, 1]"),
    (("--measure", "judged_loss", "--scorer", "embedding"), "decided by an LLM judge"),
    (("--measure", "judged_loss", "--scorer-threshold", "0.5"), "does not apply to judged_loss"),
    (("--measure", "text_changes", "--scorer", "llm"), "apply to --measure meaning_changes or judged_loss"),
    (("--measure", "accuracy", "--answer", "numeric", "--scorer-model", "m"), "apply to --measure meaning_changes"),
])
def test_bad_scorer_settings_are_refused_before_any_engine_starts(tmp_path, capsys, extra, message):
    assert main(_argv(tmp_path, *extra)) == calibrate.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "store").exists()


def test_a_meaning_certificate_names_its_scorer_in_the_operating_point():
    llm = ScorerSettings.make("meaning_changes", "llm", None, None)
    assert calibrate.operating_point_name("meaning_changes", 0.05, llm) == "certified_meaning_changes_llm_5pct"
    judged = ScorerSettings.make("judged_loss", None, None, None)
    assert calibrate.operating_point_name("judged_loss", 0.1, judged) == "certified_judged_loss_10pct"


def test_meaning_measures_need_no_answers(tmp_path):
    for measure in ("meaning_changes", "judged_loss"):
        settings = calibrate.CalibrateSettings(target="t", speculative_config={"method": "ngram"},
                                               prompts=tmp_path / "p", out=tmp_path / "o", measure=measure,
                                               budget=0.05)
        calibrate.check_settings(settings)  # no --answer needed


def test_a_cpu_server_gets_every_core_unless_the_operator_chose(tmp_path, monkeypatch):
    settings = calibrate.CalibrateSettings(target="t", speculative_config={"method": "ngram"}, prompts=tmp_path,
                                           out=tmp_path, measure="text_changes", budget=0.05)
    monkeypatch.setattr(calibrate, "_has_cuda", lambda: False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    _, env = calibrate.server_command(settings, 8000)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["NUMBA_THREADING_LAYER"] == "workqueue"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    _, env = calibrate.server_command(settings, 8000)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env and env["NUMBA_THREADING_LAYER"] == "workqueue"


# -- the command on tiny models ------------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.timeout(1800)
def test_calibrate_under_each_reference_free_measure_on_tiny_models(tiny_pair, workdir, tmp_path):
    """The lossless and relaxed (accept-all judge) responses are served once, in folder A;
    each measure then decides from them: the llm scorer (the target itself, over calibrate's
    own engine, the one that served the responses) certifies in A; another scorer in A is
    exploratory (the certificate is bound to its scorer); judged_loss and the embedding scorer
    certify in folders B and C that share A's responses, serving nothing again. Every scorer
    persists its scores and names itself in the report; a rerun reads them back and decides
    the same, scoring nothing again. (Two engine starts: the runs that need no LLM judge and
    nothing served start none.)"""
    import torch

    from selfjudge_vllm.testing.load import make_requests
    from selfjudge_vllm.testing.tiny_models import write_head
    from tests.engine_helpers import CALIBRATE_TEST_DTYPE, spec_config

    target, draft = tiny_pair
    head = write_head(workdir / "heads/meaning_half", target, torch.zeros(64), bias=0.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": r["prompt"]}) + "\n"
                               for i, r in enumerate(make_requests(24, seed=7))))
    env = dict(os.environ)  # vLLM's one-process worker mode, as test_calibrate.py's runs

    def calibrate_into(out, *extra):
        command = [sys.executable, "-m", "selfjudge_vllm.cli", "calibrate", "--target", str(target),
                   "--speculative-config", json.dumps(spec_config("draft_model", draft)), "--prompts", str(prompts),
                   "--out", str(out), "--head", str(head), "--rules", "judge", "--grid", "judge=0.1",
                   "--budget", "0.5", "--test-share", "0", "--max-tokens", "16", "--max-model-len", "512",
                   "--concurrency", "8", *CALIBRATE_TEST_DTYPE, *extra]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        server_log = out / "server.log"  # the engine's side of a failure (not of a decided run's exit status)
        failed = done.returncode == calibrate.EXIT_FAILED and server_log.is_file()
        tail = server_log.read_text()[-4000:] if failed else ""
        return done.returncode, done.stdout + done.stderr + tail

    first, shared_b, shared_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    status, log = calibrate_into(first, "--measure", "meaning_changes", "--scorer", "llm")
    assert status in (calibrate.EXIT_RELAXED_CERTIFIED, calibrate.EXIT_ONLY_LOSSLESS), log
    llm = json.loads((first / "report.json").read_text())
    status, log = calibrate_into(first, "--measure", "meaning_changes", "--scorer", "embedding")
    assert status == calibrate.EXIT_EXPLORATORY, log
    verdict = json.loads((first / "exploratory.json").read_text())["verdict"]
    assert "scorer (" in verdict and '"embedding"' in verdict and '"llm"' in verdict, verdict
    for folder in (shared_b, shared_c):  # another certificate on the same responses
        folder.mkdir()
        (folder / "store").symlink_to(first / "store", target_is_directory=True)
    status, log = calibrate_into(shared_b, "--measure", "judged_loss")
    assert status in (calibrate.EXIT_RELAXED_CERTIFIED, calibrate.EXIT_ONLY_LOSSLESS), log
    judged = json.loads((shared_b / "report.json").read_text())
    status, log = calibrate_into(shared_c, "--measure", "meaning_changes", "--scorer", "embedding")
    assert status in (calibrate.EXIT_RELAXED_CERTIFIED, calibrate.EXIT_ONLY_LOSSLESS), log
    embedding = json.loads((shared_c / "report.json").read_text())
    status, log = calibrate_into(first, "--measure", "meaning_changes", "--scorer", "llm")  # read back
    assert status in (calibrate.EXIT_RELAXED_CERTIFIED, calibrate.EXIT_ONLY_LOSSLESS), log
    assert json.loads((first / "report.json").read_text())["points"] == llm["points"], log
    assert "starting vllm serve" not in log  # nothing to serve, nothing to score: no engine

    requests = [json.loads(line) for line in (first / "store" / "requests.jsonl").read_text().splitlines()]
    assert len(requests) == 2 * 24  # lossless and judge 0.1, served once for every run
    lossless = {r["id"]: r["text"] for r in requests if r["point"] == "lossless"}
    relaxed = {r["id"]: r["text"] for r in requests if r["point"] == "judge-0.1"}
    differing = {i for i in lossless if lossless[i] != relaxed[i]}
    assert differing, "the accept-all judge changed no text: nothing was scored"
    scores = [json.loads(line) for line in (first / "store" / "scores.jsonl").read_text().splitlines()]
    by_scorer = {}
    for row in scores:
        by_scorer.setdefault(row["scorer"], []).append(row["id"])
    # each kind scored every differing pair exactly once (the exploratory embedding run's scores were
    # reused in C, and the rerun in A scored nothing)
    assert {k: sorted(v) for k, v in by_scorer.items()} == {
        "embedding:all-MiniLM-L6-v2:-": sorted(differing),
        f"llm:target:{meaning.EQUIVALENCE_PROMPT_VERSION}": sorted(differing),
        f"preference:target:{meaning.PREFERENCE_PROMPT_VERSION}": sorted(differing)}
    for report, scorer in ((embedding, "embedding"), (llm, "llm"), (judged, "llm")):
        assert report["scorer"]["scorer"] == scorer and report["points"][0]["n"] == 24
        assert report["points"][0]["changes"] <= len(differing)
    assert judged["measure"] == "judged_loss" and judged["scorer"]["threshold"] is None
    assert "scorer's verdicts, not for a person's judgement" in (shared_c / "report.md").read_text()


def test_ctrl_c_stops_the_engine_keeps_every_response_and_exits_130(monkeypatch, tmp_path, capsys):
    """Ctrl-C in the middle of serving: the engine is stopped (run()'s finally), the responses
    that finished are in the store, and the command says how to resume and exits 130."""
    from tests import simulated_engine as sim

    engine = sim.SimulatedEngine({("top_alpha", 0.9): 0.0}, seed=0)
    engine.install(monkeypatch)
    served = engine.run_items

    async def interrupted(base_url, items, extra, concurrency, on_done, model="target"):
        for item in items:  # Ctrl-C arrives inside a segment, after 10 responses
            if len(engine.served) >= 10:
                raise KeyboardInterrupt
            await served(base_url, [item], extra, concurrency, on_done, model)
        return 0.0

    monkeypatch.setattr(measurement, "run_items", interrupted)
    closed = []
    monkeypatch.setattr(calibrate.Session, "close", lambda session: closed.append(True))
    prompts = sim.write_prompts(tmp_path / "forty.jsonl", 40)
    monkeypatch.setattr(calibrate, "settings_from_args", lambda args: sim.settings(
        prompts, tmp_path / "out", {"top_alpha": (0.9,)}, measure="text_changes", answer=AnswerKind("text")))
    assert main(_argv(tmp_path, "--measure", "text_changes")) == calibrate.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "Rerun the same command to continue" in err
    assert closed == [True]
    stored = (tmp_path / "out" / "store" / "requests.jsonl").read_text().splitlines()
    assert len(stored) == 10  # every response that finished before Ctrl-C
