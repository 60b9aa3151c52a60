"""`selfjudge calibrate` run end to end on a simulated engine (tests/simulated_engine.py): its
whole decision loop (early stop included) is family-wise valid by simulation; a rerun that
changes what the certificate was computed with is exploratory, not certified; an incomplete
run's points are marked partial; the certified head labels its bound per point."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfjudge_vllm import calibrate, certify, measurement
from selfjudge_vllm.measurement import RequestStore
from tests import simulated_engine as sim

GRIDS = {"top_alpha": (0.9, 0.5, 0.2), "entropy": (3.0, 2.0, 1.0)}
# top_alpha's strictest point is well within the 10% budget, every other point exactly at it
# (the worst case of H0 "risk > budget"): certifying any of those is a family-wise error.
RISKS = {("top_alpha", 0.9): 0.025, ("top_alpha", 0.5): 0.1, ("top_alpha", 0.2): 0.1,
         ("entropy", 3.0): 0.1, ("entropy", 2.0): 0.1, ("entropy", 1.0): 0.1}


def _run(monkeypatch, tmp_path, engine, out="out", n=150, **over):
    engine.install(monkeypatch)
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.is_file():
        sim.write_prompts(prompts, n)
    return calibrate.run(sim.settings(prompts, tmp_path / out, over.pop("grids", GRIDS), **over))


@pytest.mark.parametrize("measure, gained, runs", [("answer_changes", 0.0, 2000), ("accuracy", 0.03, 600)])
def test_the_calibrate_loop_is_family_wise_valid_by_simulation(monkeypatch, tmp_path, measure, gained, runs):
    """`calibrate.run` itself (split, serving order, early stop between segments, pairing,
    p-values, fixed sequence, Bonferroni) on 150 prompts, two families of three points, 90%
    confidence, 10% budget: the share of runs that certify a point at the budget stays within
    delta plus Monte Carlo error. Accuracy: 3% of prompts gained, 13% lost. The strict point
    within budget is certified in most runs, so the later points are tested too."""
    # Persistence, logs and the report's per-point bounds decide nothing: left out for speed.
    monkeypatch.setattr(measurement, "append_jsonl", lambda path, row: None)
    monkeypatch.setattr(calibrate, "append_jsonl", lambda path, row: None)  # the store's certificate record
    monkeypatch.setattr(calibrate, "_write", lambda settings, report: None)
    monkeypatch.setattr(certify, "risk_upper_bound", lambda *args, **kwargs: None)
    monkeypatch.setattr(calibrate, "log", lambda message: None)
    monkeypatch.setattr(measurement, "log", lambda message: None)
    sim.write_prompts(tmp_path / "prompts.jsonl", 150)
    errors = strict = stopped = 0
    for k in range(runs):
        _, report = _run(monkeypatch, tmp_path, sim.SimulatedEngine(RISKS, seed=k, gained=gained), out=f"r{k}",
                         measure=measure)
        certified = [(p["family"], p["knob"]) for p in report["points"] if p["certified"]]
        errors += any(RISKS[point] >= report["budget"] for point in certified)
        strict += ("top_alpha", 0.9) in certified
        stopped += any(p["stopped_early"] for p in report["points"])
    delta = 0.1
    error = errors / runs
    print(f"{measure}: {runs} runs, family-wise error {error:.4f} (delta {delta}), strict point certified "
          f"{strict / runs:.3f}, runs with an early stop {stopped / runs:.3f}")
    assert error <= delta + 3 * math.sqrt(delta * (1 - delta) / runs), error
    assert strict / runs > 0.6
    assert measure == "accuracy" or stopped / runs > 0.5  # the early stop is exercised (change measures only)


# -- the certificate's binding ---------------------------------------------------------------------


def _first(monkeypatch, tmp_path, engine=None, **over):
    engine = engine or sim.SimulatedEngine(RISKS, seed=3)
    status, report = _run(monkeypatch, tmp_path, engine, **over)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED, report["verdict"]
    return engine, report


def test_the_first_run_binds_the_certificate_and_the_same_command_keeps_it(monkeypatch, tmp_path):
    engine, report = _first(monkeypatch, tmp_path)
    bound = json.loads((tmp_path / "out" / calibrate.CERTIFICATE_FILE).read_text())
    assert bound == {"measure": "answer_changes", "budget": 0.1, "confidence": 0.9, "families": ["entropy", "top_alpha"],
                     "grids": {"top_alpha": [0.9, 0.5, 0.2], "entropy": [3.0, 2.0, 1.0]},
                     "answer": {"kind": "numeric", "pattern": None}, "scorer": None}
    assert report["certificate_binding"] == bound
    served = len(engine.served)
    status, again = _run(monkeypatch, tmp_path, engine)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and "exploratory" not in again
    assert again["certified"]["key"] == report["certified"]["key"] and len(engine.served) == served


@pytest.mark.parametrize("change, over, said", [
    # seen: entropy fails at 0.1 / 2; rerun with top_alpha only, tested at the full 0.1
    ("narrower --rules", {"grids": {"top_alpha": GRIDS["top_alpha"]}}, "families ("),
    # seen: top_alpha 0.5 ends the sequence; rerun without it, so the sequence goes on to 0.2
    ("a deleted grid point", {"grids": {"top_alpha": (0.9, 0.2), "entropy": GRIDS["entropy"]}}, "grids ("),
    ("another confidence", {"confidence": 0.8}, "confidence (0.9 -> 0.8)"),
    ("another budget", {"budget": 0.2}, "budget (0.1 -> 0.2)"),
    ("another measure", {"measure": "accuracy"}, 'measure ("answer_changes" -> "accuracy")'),
    ("another way to read answers", {"answer": calibrate.AnswerKind("pattern", r"#### (\d)")}, "answer ("),
])
def test_a_rerun_that_changes_the_experiment_is_exploratory(monkeypatch, tmp_path, capsys, change, over, said):
    engine, report = _first(monkeypatch, tmp_path)
    before = (tmp_path / "out" / "report.json").read_text()
    status, rerun = _run(monkeypatch, tmp_path, engine, **over)
    assert status == calibrate.EXIT_EXPLORATORY, change
    assert rerun["certified"] is None and not any(p["certified"] for p in rerun["points"])
    assert rerun["serve_with"] == {"selfjudge": {"enabled": False}}
    assert rerun["verdict"].startswith("exploratory, nothing certified") and said in rerun["verdict"]
    assert any(said in line for line in rerun["exploratory"]["changed"])
    # the certificate's report is kept; the exploration is written beside it
    assert (tmp_path / "out" / "report.json").read_text() == before
    written = json.loads((tmp_path / "out" / "exploratory.json").read_text())
    assert written["verdict"] == rerun["verdict"]
    assert "passes (exploratory: not certified)" in (tmp_path / "out" / "exploratory.md").read_text() or \
        not rerun["exploratory"]["passing"]
    assert "exploratory run, nothing will be certified" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / calibrate.CERTIFICATE_FILE).read_text()) == report["certificate_binding"]


def test_a_run_cut_before_any_candidate_was_read_binds_nothing(monkeypatch, tmp_path):
    """Killed (here: out of minutes) while serving lossless, nothing about a candidate was
    seen: a rerun with another budget certifies."""
    engine = sim.SimulatedEngine(RISKS, seed=3)
    status, _ = _run(monkeypatch, tmp_path, engine, max_minutes=100.0)  # lossless needs 150 requests
    assert status == calibrate.EXIT_INCOMPLETE
    assert not (tmp_path / "out" / calibrate.CERTIFICATE_FILE).exists()
    status, report = _run(monkeypatch, tmp_path, engine, budget=0.2)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and report["certificate_binding"]["budget"] == 0.2


def test_a_folder_calibrated_before_the_binding_was_recorded_binds_its_report(monkeypatch, tmp_path):
    engine, _ = _first(monkeypatch, tmp_path)
    (tmp_path / "out" / calibrate.CERTIFICATE_FILE).unlink()  # as such a folder has it
    status, rerun = _run(monkeypatch, tmp_path, engine, budget=0.2)
    assert status == calibrate.EXIT_EXPLORATORY and "budget (0.1 -> 0.2)" in rerun["verdict"]


def test_a_measure_binds_its_own_settings_by_adding_a_key(monkeypatch, tmp_path):
    """What another measure's settings (a scorer, its model and threshold) need: one entry."""
    scorer = {"name": "scorer-a"}
    monkeypatch.setitem(calibrate.CERTIFICATE_BINDING, "scorer", lambda settings, grids: dict(scorer))
    engine, _ = _first(monkeypatch, tmp_path)
    scorer["name"] = "scorer-b"
    status, rerun = _run(monkeypatch, tmp_path, engine)
    assert status == calibrate.EXIT_EXPLORATORY
    assert rerun["exploratory"]["changed"] == ['scorer ({"name": "scorer-a"} -> {"name": "scorer-b"})']


# -- a store shared between folders ----------------------------------------------------------------


def _share_store(tmp_path, folder, with_="out"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "store").symlink_to(tmp_path / with_ / "store", target_is_directory=True)


def test_a_folder_bound_to_other_response_settings_is_refused_its_shared_store(monkeypatch, tmp_path):
    """A folder whose store is a link to another's: with another target (or any response
    setting) its certificate would be on the other target's responses; refused before
    anything is bound or served. A store begun before it recorded its settings adopts the
    folder's."""
    engine, _ = _first(monkeypatch, tmp_path)
    store = tmp_path / "out" / "store"
    served = len(engine.served)
    for folder, over, said in (("other-target", {"target": "another-model"}, "(target)"),
                               ("other-tokens", {"max_tokens": 64}, "(max_tokens)")):
        _share_store(tmp_path, folder)
        with pytest.raises(calibrate.CalibrateError, match=r"store \(.*\) holds responses served with other settings "
                           + said.replace("(", r"\(").replace(")", r"\)")):
            _run(monkeypatch, tmp_path, engine, out=folder, **over)
        assert not (tmp_path / folder / "settings.json").exists() and len(engine.served) == served
    assert json.loads((store / "settings.json").read_text()) == json.loads(
        (tmp_path / "out" / "settings.json").read_text())
    (store / "settings.json").unlink()  # as a store begun before it recorded them
    _share_store(tmp_path, "same")
    status, _ = _run(monkeypatch, tmp_path, engine, out="same")
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and len(engine.served) == served
    assert json.loads((store / "settings.json").read_text())["target"] == "simulated"
    with pytest.raises(calibrate.CalibrateError, match=r"store .* \(target\)"):
        _run(monkeypatch, tmp_path, engine, out="other-target", target="another-model")


def _head(path, weight: float):
    from selfjudge_vllm.artifact import JudgeArtifact, JudgeArtifactConfig, TargetIdentity

    identity = TargetIdentity(name="t", architecture="LlamaForCausalLM", hidden_size=4, vocab_size=10,
                              num_hidden_layers=1)
    JudgeArtifact(JudgeArtifactConfig(target=identity, default_threshold=0.5), torch.full((4,), weight),
                  torch.zeros(1)).save(path)
    return path


def test_another_head_shares_the_store_and_serves_only_its_own_judge_points(monkeypatch, tmp_path):
    """A store is not bound to the head: a folder with a newly trained head, its store a link to
    the first folder's, serves only that head's judge points (under keys naming the head), not
    lossless again; the first head keeps its plain keys, and a folder with it serves nothing. A
    folder stays bound to its own head."""
    first_head, second_head = _head(tmp_path / "head-a", 0.0), _head(tmp_path / "head-b", 1.0)
    grids = {"judge": (0.9, 0.5)}
    risks = {("judge", 0.9): 0.0, ("judge", 0.5): 0.1}
    engine = sim.SimulatedEngine(risks, seed=1)
    status, first = _run(monkeypatch, tmp_path, engine, grids=grids, head=first_head)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and first["certified"]["key"] == "judge-0.9"
    served = len(engine.served)
    _share_store(tmp_path, "b")
    status, second = _run(monkeypatch, tmp_path, engine, out="b", grids=grids, head=second_head)
    tag = calibrate.file_sha256(second_head / "model.safetensors")[:12]
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and second["certified"]["key"] == f"judge@{tag}-0.9"
    newly = engine.served[served:]
    assert newly and {point for point, _ in newly} <= {"judge-0.9", "judge-0.5"}  # no lossless again
    store = RequestStore(tmp_path / "out" / "store")
    assert {"lossless", "judge-0.9", f"judge@{tag}-0.9"} <= set(store.requests)
    assert calibrate.parse_point_key(f"judge@{tag}-0.9") == ("judge", 0.9) == calibrate.parse_point_key("judge-0.9")
    assert json.loads((store.folder / "settings.json").read_text())["head_sha256"] == calibrate.file_sha256(
        first_head / "model.safetensors")  # the head it was begun with
    other = second["other_certificates"]
    assert [r["head_sha256"] for r in other] == [calibrate.file_sha256(first_head / "model.safetensors")]
    assert f"(head {other[0]['head_sha256'][:12]}: its judge points are its own)" in calibrate.other_certificates_line(
        second)
    _share_store(tmp_path, "c")
    served = len(engine.served)
    status, third = _run(monkeypatch, tmp_path, engine, out="c", grids=grids, head=first_head)
    assert len(engine.served) == served and third["certified"]["key"] == "judge-0.9"
    with pytest.raises(calibrate.CalibrateError, match=r"other settings \(head_sha256\); use another --out \(with its "
                                                       r"store a link to this folder's, it serves only the new head's"):
        _run(monkeypatch, tmp_path, engine, grids=grids, head=second_head)


def test_a_store_begun_before_it_recorded_its_settings_gives_no_new_head_its_judge_points(monkeypatch, tmp_path):
    """A store holding judge points but no settings.json (begun before stores recorded them): a
    new folder cannot say which head served them, so its head gets keys of its own and serves
    its judge points; the folder that served them, bound to its head, adopts the store as its own."""
    first_head, second_head = _head(tmp_path / "head-a", 0.0), _head(tmp_path / "head-b", 1.0)
    grids = {"judge": (0.9,)}
    engine = sim.SimulatedEngine({("judge", 0.9): 0.0}, seed=1)
    _run(monkeypatch, tmp_path, engine, grids=grids, head=first_head)
    (tmp_path / "out" / "store" / "settings.json").unlink()
    _share_store(tmp_path, "b")
    served = len(engine.served)
    status, report = _run(monkeypatch, tmp_path, engine, out="b", grids=grids, head=second_head)
    tag = calibrate.file_sha256(second_head / "model.safetensors")[:12]
    assert report["certified"]["key"] == f"judge@{tag}-0.9" and len(engine.served) - served == 150
    assert json.loads((tmp_path / "out" / "store" / "settings.json").read_text())["head_sha256"] is None
    (tmp_path / "out" / "store" / "settings.json").unlink()  # the first folder's own rerun adopts it instead
    _run(monkeypatch, tmp_path, engine, grids=grids, head=first_head)
    assert json.loads((tmp_path / "out" / "store" / "settings.json").read_text())["head_sha256"] == \
        calibrate.file_sha256(first_head / "model.safetensors")


def test_every_certificate_on_a_shared_store_is_listed_in_the_others_reports(monkeypatch, tmp_path, capsys):
    """Folder `out` certifies at 10% and explores 20%; folder `b`, sharing its responses,
    certifies 20% on them: b's report names both, as the chat benchmark's side-by-side
    measurements do, and says that choosing among them is not covered by any one."""
    engine, first = _first(monkeypatch, tmp_path)
    assert first["other_certificates"] == []
    assert _run(monkeypatch, tmp_path, engine, budget=0.2)[0] == calibrate.EXIT_EXPLORATORY
    _share_store(tmp_path, "b")
    capsys.readouterr()
    status, report = _run(monkeypatch, tmp_path, engine, out="b", budget=0.2)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED
    out = str((tmp_path / "out").resolve())
    assert [(r["folder"], r["binding"]["budget"], r["exploratory"]) for r in report["other_certificates"]] == [
        (out, 0.1, False), (out, 0.2, True)]
    said = "2 other certificates were computed on these responses: "
    markdown = (tmp_path / "b" / "report.md").read_text()
    assert said in markdown and "answer_changes within 10% at 90% confidence" in markdown
    assert "(exploratory)" in markdown and "not covered by any one certificate" in markdown
    assert said in "\n".join(calibrate.summary_lines(report, tmp_path / "b"))
    lines = [json.loads(x) for x in (tmp_path / "out" / "store" / "certificates.jsonl").read_text()
             .splitlines()]
    assert [(r["folder"], r["binding"]["budget"]) for r in lines] == [(out, 0.1), (out, 0.2),
                                                                     (str((tmp_path / "b").resolve()), 0.2)]
    _run(monkeypatch, tmp_path, engine, out="b", budget=0.2)  # a rerun adds nothing
    _, again = _run(monkeypatch, tmp_path, engine)  # the first folder's rerun now names b's
    assert len((tmp_path / "out" / "store" / "certificates.jsonl").read_text().splitlines()) == 3
    assert [r["binding"]["budget"] for r in again["other_certificates"]] == [0.2, 0.2]
    # its own exploratory 20% run is named as this folder's, b's by its path
    line = calibrate.other_certificates_line(again)
    assert "this folder, with other settings: answer_changes within 20%" in line
    assert f"{(tmp_path / 'b').resolve()}: answer_changes within 20%" in line


def test_the_chat_benchmarks_measurement_folders_share_one_store(monkeypatch, tmp_path):
    """benchmarks/chat_meaning.py's layout (each measurement its own folder, store -> ../store):
    every measurement binds the same response settings, so each is accepted and serves only
    what it lacks."""
    from benchmarks import chat_meaning

    monkeypatch.setattr(chat_meaning, "OUT", tmp_path / "chat")
    folders = [chat_meaning.measurement_folder(("ngram", 8), "answer_changes", None, b) for b in (0.1, 0.2)]
    engine = sim.SimulatedEngine(RISKS, seed=3)
    _run(monkeypatch, tmp_path, engine, out=folders[0])
    status, report = _run(monkeypatch, tmp_path, engine, out=folders[1], budget=0.2)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and len(report["other_certificates"]) == 1
    assert sum(point == "lossless" for point, _ in engine.served) == 150  # served once, for both
    assert (tmp_path / "chat" / "ngram-k8" / "store" / "settings.json").is_file()


# -- what the report says ------------------------------------------------------------------------


def test_an_incomplete_run_marks_its_partial_points(monkeypatch, tmp_path):
    """Out of minutes inside top_alpha 0.9 after its first 64 prompts (those that finished
    first): the row is partial, with no bound, and the report says so."""
    engine = sim.SimulatedEngine(RISKS, seed=3)
    status, report = _run(monkeypatch, tmp_path, engine, max_minutes=160.0)  # 150 lossless, then one segment
    assert status == calibrate.EXIT_INCOMPLETE
    (row,) = report["points"]
    assert row["key"] == "top_alpha-0.9" and row["n"] == 64 and row["partial"] and row["upper_bound"] is None
    assert not row["certified"] and not row["stopped_early"]
    assert "| partial: 64 prompts, those that finished first |" in (tmp_path / "out" / "report.md").read_text()
    status, report = _run(monkeypatch, tmp_path, engine)  # the same command finishes it
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and not any(p["partial"] for p in report["points"])


def test_the_certified_heads_bound_is_labelled_per_point(monkeypatch, tmp_path):
    from selfjudge_vllm.artifact import JudgeArtifact, JudgeArtifactConfig, TargetIdentity

    identity = TargetIdentity(name="t", architecture="LlamaForCausalLM", hidden_size=4, vocab_size=10,
                              num_hidden_layers=1)
    JudgeArtifact(JudgeArtifactConfig(target=identity, default_threshold=0.5), torch.zeros(4),
                  torch.zeros(1)).save(tmp_path / "head")
    engine = sim.SimulatedEngine({("judge", 0.9): 0.0, ("judge", 0.5): 0.1}, seed=1)
    status, report = _run(monkeypatch, tmp_path, engine, grids={"judge": (0.9, 0.5)}, head=tmp_path / "head")
    assert status == calibrate.EXIT_RELAXED_CERTIFIED and report["certified"]["key"] == "judge-0.9"
    evidence = JudgeArtifact.load(tmp_path / "out" / "head").config.operating_points[
        "certified_answer_changes_10pct"].evidence
    assert "upper_bound" not in evidence
    assert evidence["upper_bound_per_point"] == report["certified"]["upper_bound"] > 0
    assert "not simultaneous" in evidence["upper_bound_per_point_is"] and evidence["level"] == pytest.approx(0.1)


# -- prompts the head was labelled on ------------------------------------------------------------


def _head_labelled_on(path, rows, tokenizer=None, legacy=False):
    """A head whose provenance records `rows` as `selfjudge label` does (legacy: as label runs
    before the text digests did, by exact content only)."""
    from selfjudge_vllm.artifact import JudgeArtifact, JudgeArtifactConfig, TargetIdentity
    from selfjudge_vllm.offline.prompts import PROMPT_DIGESTS_KEY, legacy_prompt_digest, prompt_digests

    identity = TargetIdentity(name="t", architecture="LlamaForCausalLM", hidden_size=4, vocab_size=10,
                              num_hidden_layers=1)
    digests = ({legacy_prompt_digest(r)} if legacy else set(prompt_digests(r, tokenizer)) for r in rows or ())
    provenance = {} if rows is None else {PROMPT_DIGESTS_KEY: sorted(set().union(*digests))}
    JudgeArtifact(JudgeArtifactConfig(target=identity, default_threshold=0.5, provenance=provenance),
                  torch.zeros(4), torch.zeros(1)).save(path)
    return path


def test_prompts_the_head_was_labelled_on_are_dropped_with_a_warning(monkeypatch, tmp_path, capsys):
    """Ten of the 150 prompts were labelled (by content, under other ids): none is served, the
    run says so; a head that records no label prompts is warned about."""
    sim.write_prompts(tmp_path / "prompts.jsonl", 150)
    labelled = [{"id": f"label-{i}", "prompt": f"question {i}"} for i in range(0, 100, 10)]
    head = _head_labelled_on(tmp_path / "head", labelled + [{"prompt": "never asked"}])
    engine = sim.SimulatedEngine({("judge", 0.9): 0.0}, seed=1)
    status, report = _run(monkeypatch, tmp_path, engine, grids={"judge": (0.9,)}, head=head)
    assert status == calibrate.EXIT_RELAXED_CERTIFIED
    assert report["calibration_prompts"] == 140
    assert not {f"q{i}" for i in range(0, 100, 10)} & {i for _, i in engine.served}
    assert "dropped 10 of 150 prompts the head was labelled on (first: 'q0')" in capsys.readouterr().out
    _head_labelled_on(tmp_path / "old-head", None)
    _run(monkeypatch, tmp_path, sim.SimulatedEngine({("judge", 0.9): 0.0}), out="old", grids={"judge": (0.9,)},
         head=tmp_path / "old-head")
    assert "records no digests of the prompts it was labelled on" in capsys.readouterr().out


def test_calibrating_only_on_label_prompts_is_refused(tmp_path):
    prompts = sim.write_prompts(tmp_path / "prompts.jsonl", 5)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    head = _head_labelled_on(tmp_path / "head", rows)
    with pytest.raises(calibrate.CalibrateError, match="every prompt in .* is one .* was labelled on"):
        calibrate.run(sim.settings(prompts, tmp_path / "out", {"judge": (0.9,)}, head=head))


def test_a_label_runs_prompt_digests_reach_the_trained_heads_provenance(tmp_path):
    from selfjudge_vllm.offline.prompts import PROMPT_DIGESTS_FILE, prompt_digest
    from selfjudge_vllm.offline.train import label_prompt_digests

    for name, rows in (("a", [{"prompt": "x"}, {"messages": [{"role": "user", "content": "y"}]}]),
                       ("b", [{"prompt": "x"}, {"prompt": "z"}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / PROMPT_DIGESTS_FILE).write_text(json.dumps([prompt_digest(r) for r in rows]))
    union = label_prompt_digests([str(tmp_path / "a"), str(tmp_path / "b")])
    assert len(union) == 3 and prompt_digest({"id": "other", "prompt": "z"}) in union
    assert prompt_digest({"prompt": "x"}) != prompt_digest({"messages": [{"role": "user", "content": "x"}]})
    (tmp_path / "c").mkdir()
    assert label_prompt_digests([str(tmp_path / "a"), str(tmp_path / "c")]) is None  # a run from before


class _ChatTokenizer:
    """A chat template, as a target's tokenizer renders `messages`."""

    chat_template = "<|role|> content"

    @staticmethod
    def apply_chat_template(messages, add_generation_prompt=True, tokenize=False):
        return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages) + "<|assistant|>\n"


def test_a_prompt_is_known_by_the_text_it_is_served_as():
    """The same prompt as `messages` or as their rendered `prompt`, with a trailing newline, or
    with an extra message key shares a digest with the labelled one; another prompt does not.
    Without a tokenizer the canonical role + content rendering still matches the messages
    variants."""
    from selfjudge_vllm.offline.prompts import prompt_digests

    messages = [{"role": "user", "content": "Write a haiku about rain."}]
    label_row = {"id": "x", "messages": messages}
    tok = _ChatTokenizer()
    variants = {"same messages, other id": {"id": "y", "messages": messages},
                "rendered prompt": {"id": "x", "prompt": tok.apply_chat_template(messages)},
                "rendered prompt, other whitespace": {"id": "x", "prompt": tok.apply_chat_template(messages) + " \n"},
                "content with a trailing newline": {"id": "x", "messages": [
                    {"role": "user", "content": messages[0]["content"] + "\n"}]},
                "extra message key": {"id": "x", "messages": [dict(messages[0], name="u")]}}
    labelled = set(prompt_digests(label_row, tok))
    for name, row in variants.items():
        assert not labelled.isdisjoint(prompt_digests(row, tok)), name
    assert labelled.isdisjoint(prompt_digests({"messages": [{"role": "user", "content": "Write a haiku about snow."}]},
                                              tok))
    assert labelled.isdisjoint(prompt_digests({"prompt": "Write a haiku about rain."}, tok))  # served otherwise
    without = set(prompt_digests(label_row))
    for name in ("content with a trailing newline", "extra message key"):
        assert not without.isdisjoint(prompt_digests(variants[name])), name


def test_label_prompts_given_otherwise_here_are_dropped(monkeypatch, tmp_path, capsys):
    """The head was labelled on ten chat prompts (`messages`); the calibration file holds them
    as their rendered `prompt` with other whitespace, or with an extra message key: none is
    served. A head labelled before the text digests is checked by exact content, with a
    warning that the check is weaker."""
    monkeypatch.setattr(calibrate, "target_tokenizer", lambda target: _ChatTokenizer())
    tok = _ChatTokenizer()
    chat = [[{"role": "user", "content": f"question {i}"}] for i in range(10)]
    rows = [{"id": f"q{i}", "prompt": tok.apply_chat_template(chat[i]) + "\n"} for i in range(5)]
    rows += [{"id": f"q{i}", "messages": [dict(chat[i][0], name="user")]} for i in range(5, 10)]
    rows += [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(10, 150)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({**r, "answer": "1"}) + "\n" for r in rows))
    head = _head_labelled_on(tmp_path / "head", [{"id": f"l{i}", "messages": m} for i, m in enumerate(chat)], tok)
    engine = sim.SimulatedEngine({("judge", 0.9): 0.0}, seed=1)
    _, report = _run(monkeypatch, tmp_path, engine, grids={"judge": (0.9,)}, head=head)
    assert report["calibration_prompts"] == 140
    assert report["label_prompts_dropped"] == [f"q{i}" for i in range(10)]  # the chat report's split leaves them out
    assert not {f"q{i}" for i in range(10)} & {i for _, i in engine.served}
    out = capsys.readouterr().out
    assert "dropped 10 of 150 prompts the head was labelled on (first: 'q0')" in out
    assert "by their exact content only" not in out
    exact = [{"id": f"l{i}", "prompt": f"question {i}"} for i in range(10, 20)]
    old = _head_labelled_on(tmp_path / "old-head", exact, legacy=True)
    engine = sim.SimulatedEngine({("judge", 0.9): 0.0}, seed=1)
    _, report = _run(monkeypatch, tmp_path, engine, out="old", grids={"judge": (0.9,)}, head=old)
    assert report["calibration_prompts"] == 140 and "q10" not in {i for _, i in engine.served}
    out = capsys.readouterr().out
    assert "records its label prompts by their exact content only" in out and "dropped 10 of 150" in out


def test_the_other_certificates_line_names_this_folders_earlier_runs_and_unrecorded_heads():
    """A store's list written before heads were recorded, whose folder this run reuses with a new
    head (the chat benchmark's): the earlier entry is this folder's, its head not recorded; a
    rules-only run's entry (no head) gets no head note."""
    binding = {"measure": "meaning_changes", "budget": 0.1, "confidence": 0.95, "families": ["judge"]}
    report = {"settings": {"head_sha256": "b" * 64}, "other_certificates": [
        {"folder": "/x/10pct", "binding": binding, "exploratory": False, "this_folder": True},
        {"folder": "/x/5pct", "binding": dict(binding, budget=0.05), "exploratory": False, "head_sha256": "a" * 64,
         "this_folder": False},
        {"folder": "/x/rules", "binding": dict(binding, families=["fly"]), "exploratory": False, "head_sha256": None,
         "this_folder": False}]}
    line = calibrate.other_certificates_line(report)
    assert line.endswith("; /x/rules: meaning_changes within 10% at 95% confidence (rules fly). Choosing among them "
                         "after seeing them is not covered by any one certificate")  # no head: nothing to say
    assert line.startswith("3 other certificates were computed on these responses: this folder, with other "
                           "settings: meaning_changes within 10% at 95% confidence (rules judge) (its head not "
                           "recorded); /x/5pct: meaning_changes within 5% at 95% confidence (rules judge) (head "
                           "aaaaaaaaaaaa: its judge points are its own)")
