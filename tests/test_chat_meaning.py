"""The chat benchmark's report and full stage (benchmarks/chat_meaning.py, chat_meaning_report.py)
on a fake results tree written in the store's and calibrate's own formats: no engine, no model,
no scorer model."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from benchmarks import chat_meaning, chat_meaning_report
from selfjudge_vllm import calibrate, certify, measurement
from selfjudge_vllm.files import file_sha256
from selfjudge_vllm.meaning import Pair

IDS = [f"p{i}" for i in range(10)]
# calibrate.split_ids(IDS, 0.3, seed 0): the test prompts are p2 and p7
CALIBRATION = ["p0", "p1", "p3", "p4", "p5", "p6", "p8", "p9"]
TEST = ["p2", "p7"]
LOOP = "I think the answer is this one. " * 4  # a 7-word unit four times: a new loop
SCORES = {label: settings.score_key for label, settings in chat_meaning.scorer_settings().items()}


def _lossless(i: str) -> str:
    return f"I think the answer is this one. Answer {i}."


class Tree:
    """A fake OUT/<server> in the real formats: store/requests.jsonl and segments.jsonl
    (measurement.RequestStore), store/scores.jsonl (meaning.MeaningJudge), the measurements'
    report.json (calibrate._report)."""

    def __init__(self, out, settings: dict | None = None):
        self.out, self.root = out, out / "ngram-k8"
        self.store = self.root / "store"
        self.store.mkdir(parents=True)
        (self.store / calibrate.STORE_SETTINGS_FILE).write_text(json.dumps(settings or {"test_share": 0.3, "seed": 0}))
        (out / "prompts.jsonl").write_text("".join(json.dumps(
            {"id": i, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 16}) + "\n" for i in IDS))

    def append(self, name: str, row: dict) -> None:
        measurement.append_jsonl(self.store / name, row)

    def serve(self, point: str, texts: dict[str, str], length: float, segment: int = 4) -> None:
        """Responses, and counters per `segment` prompts giving mean acceptance length `length`."""
        for i, text in texts.items():
            self.append("requests.jsonl", {"point": point, "id": i, "text": text, "tokens": 5, "latency_s": 0.1})
        ids = list(texts)
        for start in range(0, len(ids), segment):
            chunk = ids[start:start + segment]
            drafts = 10 * len(chunk)
            self.append("segments.jsonl", {"point": point, "ids": chunk, "wall_s": 1.0, "tokens": 5 * len(chunk),
                                           "counters": {"drafts": drafts, "draft_tokens": 8 * drafts,
                                                        "accepted": (length - 1) * drafts}})

    def score(self, label: str, i: str, relaxed: str, **row) -> None:
        pair = Pair(i, "", _lossless(i), relaxed)
        self.append("scores.jsonl", {"scorer": SCORES[label], "pair": pair.key, "id": i, "seconds": 0.1, **row})

    def report(self, measure, scorer, budget, points, complete=True, lossless_length=2.0) -> None:
        folder = self.root / chat_meaning.measurement_name(measure, scorer, budget)
        folder.mkdir()
        rows = [{"family": chat_meaning.parse_point(p["key"])[0], "knob": chat_meaning.parse_point(p["key"])[1],
                 "changes": 0, "lost": 0, "gained": 0, "observed_risk": 0.0, "p_value": 0.5, "stopped_early": False,
                 "partial": False, "tokens_per_s": None, "certified": False, "upper_bound": None} | p for p in points]
        best = max((r for r in rows if r["certified"]), key=lambda r: r["mean_acceptance_length"], default=None)
        (folder / "report.json").write_text(json.dumps({
            "verdict": "certified: ..." if best else "only lossless is certified: ...", "complete": complete,
            "measure": measure, "budget": budget, "confidence": 0.95, "delta": 0.05, "families": ["fly", "top_alpha"],
            "level_per_family": 0.025, "scorer": chat_meaning.scorer_settings()[chat_meaning.scorer_label(
                measure, scorer)].as_dict(), "calibration_prompts": len(CALIBRATION), "test_prompts": len(TEST),
            "lossless": {"key": "lossless", "n": len(CALIBRATION), "mean_acceptance_length": lossless_length},
            "points": rows, "certified": best, "other_certificates": []}))


def _report_tree(tmp_path) -> Tree:
    """lossless on every prompt (length 2.0); on the calibration prompts: fly 1 (2.5, two texts
    changed, one into a loop; every scorer), fly 0.6 (3.0, every text changed; embedding scored
    the 4 prompts it served before it was stopped early, judged loss all 8, the LLM judge none),
    fly 0.3 (4.0, stopped early after 4), top_alpha 0.9 (2.0, no text changed); fly 1 is
    certified within 10% by the embedding scorer and served on the test prompts."""
    tree = Tree(tmp_path / "chat_meaning")
    tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION}, 2.0)
    tree.serve("lossless", {i: _lossless(i) for i in TEST}, 2.0)
    fly1 = {i: _lossless(i) for i in CALIBRATION} | {"p0": LOOP, "p1": "Something else entirely."}
    tree.serve("fly-1", fly1, 2.5)
    tree.serve("fly-1", {i: _lossless(i) for i in TEST}, 2.5)
    for label, loop_score, other_score in (("embedding", 0.995, 0.995), ("llm", 0.9, 0.3)):
        tree.score(label, "p0", LOOP, score=loop_score)  # changed by its loop, whatever the score says
        tree.score(label, "p1", "Something else entirely.", score=other_score)
    tree.score("judged_loss", "p0", LOOP, verdict="kept")  # lost: the loop
    tree.score("judged_loss", "p1", "Something else entirely.", verdict="gained")
    fly06 = {i: f"Another answer {i}." for i in CALIBRATION}
    tree.serve("fly-0.6", fly06, 3.0)
    for n, i in enumerate(CALIBRATION):
        if n < 4:
            tree.score("embedding", i, fly06[i], score=0.5 if n < 3 else 0.999)
        tree.score("judged_loss", i, fly06[i], verdict="lost" if n < 5 else "kept")
    tree.serve("fly-0.3", {i: f"Short {i}." for i in CALIBRATION[:4]}, 4.0)
    for i in CALIBRATION[:4]:
        tree.score("embedding", i, f"Short {i}.", score=0.1)
    tree.serve("top_alpha-0.9", {i: _lossless(i) for i in CALIBRATION}, 2.0)
    row = {"key": "fly-1", "n": 8, "mean_acceptance_length": 2.5}
    tree.report("meaning_changes", "embedding", 0.05,
                [row | {"changes": 1}, {"key": "fly-0.6", "n": 4, "changes": 3, "stopped_early": True,
                                        "mean_acceptance_length": 3.0}])
    tree.report("meaning_changes", "embedding", 0.10,
                [row | {"changes": 1, "certified": True, "upper_bound": 0.47,
                        "test": {"n": 2, "changes": 0, "lost": 0, "gained": 0, "observed_risk": 0.0}},
                 {"key": "fly-0.6", "n": 4, "changes": 3, "stopped_early": True, "mean_acceptance_length": 3.0},
                 {"key": "top_alpha-0.9", "n": 8, "certified": True, "upper_bound": 0.31, "mean_acceptance_length": 2.0},
                 {"key": "fly-0.3", "n": 4, "changes": 4, "stopped_early": True, "mean_acceptance_length": 4.0}])
    tree.report("judged_loss", None, 0.05, [row | {"changes": 2, "lost": 1, "gained": 1},
                                            {"key": "fly-0.6", "n": 8, "changes": 5, "lost": 5,
                                             "mean_acceptance_length": 3.0}])
    return tree


def _no_serving_or_scoring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the report must not serve or score")

    from selfjudge_vllm import server_process
    from selfjudge_vllm.meaning import MeaningJudge

    monkeypatch.setattr(calibrate, "Session", refuse)
    monkeypatch.setattr(server_process, "Server", refuse)
    monkeypatch.setattr(measurement, "measure_point", refuse)
    monkeypatch.setattr(chat_meaning, "measure_point", refuse)
    monkeypatch.setattr(MeaningJudge, "score", refuse)


def test_the_report_gives_each_points_figures_from_the_store_and_the_scores(monkeypatch, tmp_path):
    tree = _report_tree(tmp_path)
    # A run interrupted before its first report: the folder is bound, no report yet.
    begun = tree.root / chat_meaning.measurement_name("meaning_changes", "llm", 0.10)
    begun.mkdir()
    (begun / "settings.json").write_text(json.dumps(
        {"head_sha256": file_sha256(chat_meaning.BENCHMARK_HEAD / "model.safetensors")}))
    monkeypatch.setattr(chat_meaning, "OUT", tree.out)
    _no_serving_or_scoring(monkeypatch)
    assert chat_meaning.main(["--report-only"]) == 0  # no --testbed needed: nothing is served
    report = json.loads((tree.out / "report.json").read_text())
    (server,) = report["servers"]
    assert (server["calibration_prompts"], server["test_prompts"], server["lossless_served"]) == (8, 2, 10)
    assert server["notes"] == []  # every calibrate report on the same split and the benchmark's scorers
    points = {r["key"]: r for r in server["points"]}
    assert list(points) == ["lossless", "fly-1", "fly-0.6", "fly-0.3", "top_alpha-0.9"]  # strictest first

    fly1 = points["fly-1"]
    assert fly1["n"] == 8 and fly1["complete"]
    assert fly1["mean_acceptance_length"] == pytest.approx(2.5)
    assert fly1["acceptance_vs_lossless"] == pytest.approx(2.5 / 2.0)
    assert fly1["text_changes"] == {"changes": 2, "rate": 2 / 8,
                                    "upper95": certify.risk_upper_bound("text_changes", 8, 0.05, changes=2)}
    assert fly1["loops"] == 1
    embedding, llm, judged = (fly1["measures"][k] for k in ("embedding", "llm", "judged_loss"))
    # embedding: the loop only (its cosine 0.995 is above 0.99); llm: the loop and 0.3 < 0.7
    assert embedding == {"scored": "all", "n": 8, "changes": 1, "rate": 1 / 8,
                         "upper95": certify.risk_upper_bound("meaning_changes", 8, 0.05, changes=1)}
    assert llm["changes"] == 2 and llm["rate"] == 2 / 8
    assert llm["upper95"] == certify.risk_upper_bound("meaning_changes", 8, 0.05, changes=2)
    assert (judged["lost"], judged["gained"], judged["rate"]) == (1, 1, 0.0)
    assert judged["upper95"] == certify.risk_upper_bound("judged_loss", 8, 0.05, lost=1, gained=1)

    # Served on all 8, scored by the embedding scorer on the 4 it was stopped early at, by
    # judged loss on all, by the LLM judge on none: each said, bounds only where complete.
    fly06 = points["fly-0.6"]
    assert fly06["complete"] and fly06["stopped_early_by"] == ["embedding 5%", "embedding 10%"]
    assert fly06["acceptance_vs_lossless"] == pytest.approx(1.5) and fly06["text_changes"]["changes"] == 8
    assert fly06["measures"]["embedding"] == {"scored": "first", "n": 4, "changes": 3, "rate": 3 / 4, "upper95": None,
                                              "acceptance_vs_lossless": pytest.approx(1.5)}
    assert fly06["measures"]["llm"] == {"scored": "none", "scored_pairs": 0, "differing_pairs": 8}
    assert fly06["measures"]["judged_loss"]["lost"] == 5 and fly06["measures"]["judged_loss"]["rate"] == 5 / 8
    assert fly06["measures"]["judged_loss"]["upper95"] == certify.risk_upper_bound("judged_loss", 8, 0.05, lost=5)

    # Stopped early: its n, paired acceptance on its 4 prompts, no bound.
    fly03 = points["fly-0.3"]
    assert (fly03["n"], fly03["of"], fly03["complete"]) == (4, 8, False)
    assert fly03["acceptance_vs_lossless"] == pytest.approx(2.0)
    assert fly03["measures"]["embedding"] == {"scored": "all", "n": 4, "changes": 4, "rate": 1.0, "upper95": None}
    assert fly03["text_changes"]["upper95"] is None
    # No text changed: decided by every scorer without a score.
    assert points["top_alpha-0.9"]["measures"]["llm"] == {"scored": "all", "n": 8, "changes": 0, "rate": 0.0,
                                                          "upper95": certify.risk_upper_bound("meaning_changes", 8,
                                                                                              0.05, changes=0)}

    cells = {c["measurement"]: c for c in server["certified"]}
    assert list(cells) == [chat_meaning.measurement_name(*m) for m in chat_meaning.MEASUREMENTS]
    assert not cells["meaning_changes-llm-5pct"]["ran"]
    assert cells["meaning_changes-embedding-5pct"]["certified"] == []
    ten = cells["meaning_changes-embedding-10pct"]
    assert [r["key"] for r in ten["certified"]] == ["fly-1", "top_alpha-0.9"] and ten["best"] == "fly-1"
    assert ten["certified"][0]["acceptance_vs_lossless"] == pytest.approx(1.25)
    assert ten["certified"][0]["test"]["n"] == 2

    # Not served in full yet: the full section shows the points the full stage will serve.
    full = {r["key"]: r for r in server["full"]["points"]}
    assert not server["full"]["planned"] and set(full) == {"lossless", "fly-0.3", "top_alpha-0.9"}
    assert full["lossless"]["n"] == 10 and full["fly-0.3"]["of"] == 10 and not full["fly-0.3"]["complete"]

    md = (tree.out / "report.md").read_text()
    assert ("| fly 0.6 | 8 | 1.500x (3.00) | 8 (100.00%) | 0 | 3: 75.00%, first 4 prompts (1.500x acceptance vs "
            "lossless there) | not scored "
            "| 5-0: 62.50% (<= " in md)
    assert "| embedding (first 4), judged_loss |" in md
    assert "| fly 0.3 | 4 of 8 (stopped early by embedding 10%) | 2.000x (4.00) |" in md
    assert "| meaning changed, LLM judge | 5% | not run yet | - | - |" in md
    assert ("| meaning changed, LLM judge | 10% | begun, interrupted before its first report (rerun calibrate to "
            "continue) | - | - |") in md
    assert ("| meaning changed, embedding | 10% | relaxed point certified | fly 1 (1.250x; bound 47.00%); "
            "top_alpha 0.9 (1.000x; bound 31.00%) "
            "(calibrate's bounds at 97.5%, Bonferroni over 2 families) | fly 1: 0 of 2, 0.00% |") in md
    assert (tree.out / "report.png").stat().st_size > 0
    assert "not given that the point was served in full" in md and "coverage is below 95%" in md
    assert "the rate of a point stopped early overstates its true rate" in md


def test_the_report_says_when_a_measurement_used_another_scorer(tmp_path):
    tree = _report_tree(tmp_path)
    path = tree.root / "meaning_changes-embedding-5pct" / "report.json"
    report = json.loads(path.read_text())
    path.write_text(json.dumps({**report, "scorer": {**report["scorer"], "threshold": 0.9}}))
    (note,) = chat_meaning_report.build(tree.out)["servers"][0]["notes"]
    assert note.startswith("meaning_changes-embedding-5pct was calibrated with the scorer") and '"threshold": 0.9' in note
    from benchmarks import docs_sync

    table = docs_sync.readme_chat_results(chat_meaning_report.build(tree.out))
    assert f"Note: ngram-k8: {note}." in table  # the README carries the report's notes


def test_report_only_writes_nothing_before_anything_is_served(monkeypatch, tmp_path):
    monkeypatch.setattr(chat_meaning, "OUT", tmp_path / "chat_meaning")
    _no_serving_or_scoring(monkeypatch)
    assert chat_meaning.main(["--report-only"]) == 0
    assert not (tmp_path / "chat_meaning" / "report.json").exists()
    with pytest.raises(SystemExit):  # every other stage serves, so needs the testbed
        chat_meaning.main(["--stages", "full"])


# -- the full stage --------------------------------------------------------------------------------


class FakeSession:
    started = 0

    def __init__(self, settings):
        self.server = None

    def get(self):
        if self.server is None:
            FakeSession.started += 1
            self.server = object()
        return self.server

    def close(self):
        pass


class FakeEmbedder:
    def cosine(self, texts, references):
        return [1.0 if a == b else 0.5 for a, b in zip(texts, references)]


def _full_setup(monkeypatch, tmp_path):
    """The report tree, its prompts as calibrate reads them, every measurement complete."""
    tree = _report_tree(tmp_path)
    monkeypatch.setattr(chat_meaning, "OUT", tree.out)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in IDS))
    settings = calibrate.CalibrateSettings(
        target="unused", speculative_config={"method": "ngram", "num_speculative_tokens": 8}, prompts=prompts,
        out=chat_meaning.linked_folder(("ngram", 8), chat_meaning.FULL), measure="meaning_changes", budget=0.05,
        max_tokens=16)
    (tree.store / calibrate.STORE_SETTINGS_FILE).write_text(json.dumps(calibrate.bound_settings(settings)))
    for measure, scorer, budget in chat_meaning.MEASUREMENTS:
        folder = tree.root / chat_meaning.measurement_name(measure, scorer, budget)
        if not (folder / "report.json").is_file():
            tree.report(measure, scorer, budget, [])
    monkeypatch.setattr(calibrate, "Session", FakeSession)
    FakeSession.started = 0
    served = []

    def fake_measure(server, store, key, items, extra, concurrency, progress, out_of_time):
        todo = [i.id for i in items if i.id not in store.done(key)]
        served.append((key, extra, todo))
        for i in todo:  # as measure_point persists them: each response, then the segment's counters
            store.add_request({"point": key, "id": i, "text": f"Full {key} {i}.", "tokens": 5, "latency_s": 0.1})
        store.add_segment({"point": key, "ids": todo, "wall_s": 1.0, "tokens": 5 * len(todo),
                           "counters": {"drafts": 10.0, "draft_tokens": 80.0, "accepted": 10.0}})
        return True

    return tree, settings, served, fake_measure


def test_the_full_stage_serves_each_familys_fastest_point_on_what_it_lacks(monkeypatch, tmp_path):
    tree, settings, served, fake_measure = _full_setup(monkeypatch, tmp_path)
    assert chat_meaning.serve_full(settings, llm=False, max_minutes=None, measure=fake_measure,
                                   embedder_factory=FakeEmbedder)
    # fly 0.3 (2.0x on the 4 prompts it was served before it stopped) beats fly 1 (1.25x) and
    # fly 0.6 (1.5x); top_alpha has one point. Calibration prompts first, then the test prompts.
    assert chat_meaning.read_plan(settings.out) == {"fly": "fly-0.3", "top_alpha": "top_alpha-0.9"}
    assert served == [("fly-0.3", {"selfjudge_rule": "fly", "selfjudge_fly_threshold": 0.3}, CALIBRATION[4:]),
                      ("fly-0.3", {"selfjudge_rule": "fly", "selfjudge_fly_threshold": 0.3}, TEST),
                      ("top_alpha-0.9", {"selfjudge_rule": "top_alpha", "selfjudge_alpha": 0.9}, TEST)]
    assert FakeSession.started == 1
    # Every differing pair of the full points scored by the embedding scorer, in the store's scores
    scores = [json.loads(x) for x in (tree.store / "scores.jsonl").read_text().splitlines()]
    new = [r for r in scores if r["scorer"] == SCORES["embedding"] and r["score"] == 0.5 and r["id"] in TEST]
    assert sorted(r["id"] for r in new) == ["p2", "p2", "p7", "p7"]  # fly 0.3 and top_alpha 0.9
    assert not [r for r in scores if r["scorer"] == SCORES["llm"] and r["id"] in TEST]  # no --llm
    # A rerun serves nothing and starts no server; the choice is kept although fly 0.3 now has all 8
    served.clear()
    assert chat_meaning.serve_full(settings, llm=False, max_minutes=None, measure=fake_measure,
                                   embedder_factory=FakeEmbedder)
    assert served == [] and FakeSession.started == 1
    # The report's full section: every prompt, the embedding scorer on all of them
    report = chat_meaning_report.build(tree.out)
    full = {r["key"]: r for r in report["servers"][0]["full"]["points"]}
    assert report["servers"][0]["full"]["planned"] and full["fly-0.3"]["complete"] and full["fly-0.3"]["n"] == 10
    assert full["fly-0.3"]["measures"]["embedding"]["scored"] == "all"
    assert full["fly-0.3"]["measures"]["embedding"]["upper95"] is not None
    assert full["fly-0.3"]["measures"]["llm"]["scored"] == "none"  # no --llm


def test_the_full_stage_waits_for_calibrate_and_stops_at_its_minutes(monkeypatch, tmp_path):
    tree, settings, served, fake_measure = _full_setup(monkeypatch, tmp_path)
    unfinished = tree.root / "judged_loss-10pct" / "report.json"
    unfinished.write_text(json.dumps({**json.loads(unfinished.read_text()), "complete": False}))
    assert not chat_meaning.serve_full(settings, llm=False, max_minutes=None, measure=fake_measure)
    assert served == [] and not (settings.out / chat_meaning.PLAN_FILE).exists()
    unfinished.write_text(json.dumps({**json.loads(unfinished.read_text()), "complete": True}))
    assert not chat_meaning.serve_full(settings, llm=False, max_minutes=-1.0, measure=fake_measure)
    assert served == [] and FakeSession.started == 0  # out of minutes before the first point


def test_the_readme_chat_table_reads_each_figure_from_the_report(tmp_path):
    from benchmarks import docs_sync

    tree = _report_tree(tmp_path)
    chat_meaning_report.write(tree.out)
    blocks = docs_sync.chat_meaning_blocks(tree.out.parent)
    assert blocks[(docs_sync.ROOT / "docs" / "benchmarks.md", "chat_meaning")] == (tree.out / "report.md").read_text()
    table = blocks[(docs_sync.ROOT / "README.md", "chat_results")]
    bound = 100 * certify.risk_upper_bound("meaning_changes", 8, 0.05, changes=1)
    # each family's fastest point (not served in full yet: its calibration prompts), every certified one
    assert ("| ngram-k8 | fly 0.3 (the fastest fly point) | 2.000x (4.00) | calibration: 4 of 8 (stopped early by "
            "embedding 10%) | 4: 100.00% | not scored | not scored | no |") in table
    assert f"| ngram-k8 | fly 1 | 1.250x (2.50) | calibration: 8 | 1: 12.50% (<= {bound:.2f}%) | 2: 25.00% (<= " in table
    assert table.index("fly 0.3") < table.index("fly 1 |") < table.index("top_alpha 0.9 (the fastest")
    assert "| embedding 10% |" in table.split("fly 1 |")[1].splitlines()[0]
    assert ("ngram-k8: within embedding 10%: fly 1 (1.250x; bound 47.00%); top_alpha 0.9 (1.000x; bound 31.00%) "
            "(calibrate's bounds at 97.5%, Bonferroni over 2 families) "
            "(not finished yet: llm 5%, llm 10%, judged_loss 10%).") in table


def test_the_fastest_point_is_chosen_on_the_prompts_the_familys_points_share(tmp_path, capsys):
    """A looser point stopped early is compared with a stricter one on the prompts both were
    served on, not each on its own; a point without counters there is left out and said."""
    tree = Tree(tmp_path / "chat_meaning")
    first, rest = CALIBRATION[:4], CALIBRATION[4:]
    tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION}, 2.0)
    tree.serve("fly-0.6", {i: f"A {i}" for i in first}, 2.2)
    tree.serve("fly-0.6", {i: f"A {i}" for i in rest}, 3.0)  # 1.3x on all 8, 1.1x on the first 4
    tree.serve("fly-0.3", {i: f"B {i}" for i in first}, 2.4)  # stopped early: 1.2x on the first 4
    for i in first:  # served, no counters segment
        tree.append("requests.jsonl", {"point": "fly-0.2", "id": i, "text": f"C {i}", "tokens": 5, "latency_s": 0.1})
    store = measurement.RequestStore(tree.store)
    assert chat_meaning.fastest_points(store, CALIBRATION) == {"fly": "fly-0.3"}
    assert "fly-0.2 left out of the fly comparison" in capsys.readouterr().out


def test_a_point_stopped_early_is_compared_without_lossless_counters_on_its_prompts(tmp_path, capsys):
    """Lossless's counters, served in one group over every calibration prompt, do not cover a
    point stopped after 4: the family's choice needs only its own points' counters."""
    tree = Tree(tmp_path / "chat_meaning")
    tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION}, 2.0, segment=len(CALIBRATION))
    tree.serve("top_alpha-0.9", {i: f"A {i}" for i in CALIBRATION[:4]}, 2.2)
    tree.serve("fly-1", {i: f"B {i}" for i in CALIBRATION[:4]}, 2.1)
    tree.serve("fly-0.6", {i: f"C {i}" for i in CALIBRATION[:4]}, 2.4)
    store = measurement.RequestStore(tree.store)
    assert chat_meaning.fastest_points(store, CALIBRATION) == {"fly": "fly-0.6", "top_alpha": "top_alpha-0.9"}
    assert "left out" not in capsys.readouterr().out


def test_the_full_stage_refuses_a_head_other_than_the_measurements_one(monkeypatch, tmp_path):
    """The report shows the judge points of the head the measurements bound; a full stage run
    with another --head would serve that head's point into the plan: refused, before serving."""
    tree = Tree(tmp_path / "chat_meaning")
    monkeypatch.setattr(chat_meaning, "OUT", tree.out)
    heads = {}
    for name in ("measured", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text(name)
        heads[name] = calibrate.file_sha256(tmp_path / name / "model.safetensors")
    folder = tree.root / chat_meaning.measurement_name(*chat_meaning.MEASUREMENTS[0])
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps({"head_sha256": heads["measured"]}))
    monkeypatch.setattr(chat_meaning, "calibrate_settings", lambda *a: pytest.fail("the full stage went on"))
    args = argparse.Namespace(servers=[("ngram", 8)], head=tmp_path / "other", max_minutes=None, llm=False)
    with pytest.raises(SystemExit, match="is not the head ngram-k8's measurements were calibrated with"):
        chat_meaning.run_full(args)
    assert chat_meaning.calibrated_head(tree.root) == heads["measured"]


def test_points_are_compared_on_the_prompts_all_their_counters_cover(tmp_path):
    """A sitting cut mid-segment leaves a point's last responses uncounted: the family is
    compared on the prompts every point's counters cover, not emptied (review: fly-1, counted
    on all 8 in segments of 4, was dropped for another point's 5-prompt prefix)."""
    def fastest(build) -> dict[str, str]:
        tree = Tree(tmp_path / f"chat_meaning-{len(list(tmp_path.iterdir()))}")
        tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION}, 2.0)
        build(tree)
        return chat_meaning.fastest_points(measurement.RequestStore(tree.store), CALIBRATION)

    def stopped_after_a_ragged_segment(tree):
        tree.serve("fly-1", {i: f"A {i}" for i in CALIBRATION}, 3.0)
        tree.serve("fly-0.6", {i: f"B {i}" for i in CALIBRATION[:4]}, 2.2)
        tree.serve("fly-0.6", {i: f"B {i}" for i in CALIBRATION[4:5]}, 2.2)

    def uncounted_responses(tree):
        tree.serve("fly-1", {i: f"A {i}" for i in CALIBRATION}, 2.5)
        tree.serve("fly-0.6", {i: f"B {i}" for i in CALIBRATION}, 3.0)
        tree.serve("fly-0.3", {i: f"C {i}" for i in CALIBRATION[:4]}, 3.5)
        for i in CALIBRATION[4:6]:  # served, the sitting ended before its counters segment
            tree.append("requests.jsonl", {"point": "fly-0.3", "id": i, "text": f"C {i}", "tokens": 5, "latency_s": 0.1})

    assert fastest(stopped_after_a_ragged_segment) == {"fly": "fly-1"}
    assert fastest(uncounted_responses) == {"fly": "fly-0.3"}


def test_the_full_stage_compares_only_the_served_heads_judge_points(tmp_path):
    """Another head's judge points on the same store (calibrate keys them judge@HEAD-knob) are
    not the benchmark head's: each head's fastest point is chosen among its own."""
    tree = Tree(tmp_path / "chat_meaning")
    tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION}, 2.0)
    tree.serve("judge-0.9", {i: f"A {i}" for i in CALIBRATION}, 2.2)
    tree.serve("judge@0123456789ab-0.5", {i: f"B {i}" for i in CALIBRATION}, 3.0)
    store = measurement.RequestStore(tree.store)
    assert chat_meaning.fastest_points(store, CALIBRATION) == {"judge": "judge-0.9"}
    assert chat_meaning.fastest_points(store, CALIBRATION, "0123456789ab") == {"judge": "judge@0123456789ab-0.5"}


def test_the_report_shows_the_judge_points_of_the_head_the_measurements_were_calibrated_with(tmp_path):
    """The store was begun with a first head (plain judge keys); the measurements calibrated
    another (judge@TAG keys): the report's points and full plan are the calibrated head's, and
    measurements bound to two heads are refused a report."""
    first, second = "a" * 64, "0123456789ab" + "c" * 52
    tree = Tree(tmp_path / "chat_meaning", {"test_share": 0.3, "seed": 0, "head_sha256": first})
    tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION}, 2.0)
    tree.serve("judge-0.9", {i: f"A {i}" for i in CALIBRATION}, 2.2)
    tree.serve("judge@0123456789ab-0.5", {i: f"B {i}" for i in CALIBRATION}, 3.0)

    def calibrated_with(head: str, *measurement) -> None:
        folder = tree.root / chat_meaning.measurement_name(*measurement)
        folder.mkdir(exist_ok=True)
        (folder / "settings.json").write_text(json.dumps({"head_sha256": head}))

    def judge_points() -> tuple[list[str], list[str]]:
        server = chat_meaning_report.build(tree.out)["servers"][0]
        return ([r["key"] for r in server["points"] if r["family"] == "judge"],
                [r["key"] for r in server["full"]["points"] if r["family"] == "judge"])

    calibrated_with(second, *chat_meaning.MEASUREMENTS[0])
    assert judge_points() == (["judge@0123456789ab-0.5"], ["judge@0123456789ab-0.5"])
    calibrated_with(first, *chat_meaning.MEASUREMENTS[0])
    assert judge_points() == (["judge-0.9"], ["judge-0.9"])
    calibrated_with(second, *chat_meaning.MEASUREMENTS[1])
    with pytest.raises(SystemExit, match="2 different heads"):
        chat_meaning_report.build(tree.out)


def _wait_for(path, seconds=60.0):
    import time

    deadline = time.monotonic() + seconds
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.1)
    return path.read_text()


def test_a_killed_driver_stops_its_calibrate_child(tmp_path):
    """`kill PID` (SIGTERM) of chat_meaning.py in the calibrate stage: its `selfjudge calibrate`
    child (here a stand-in that records its pid and how it ended, with calibrate's own SIGTERM
    handling) is stopped and waited for, even when the driver was started with SIGINT ignored
    (as `cmd &` in a script starts it: Ctrl-C cannot be what stops the child)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from benchmarks.chat_meaning import ROOT

    pidfile, ended = tmp_path / "child.pid", tmp_path / "child.ended"
    child = textwrap.dedent(f"""
        import os, time
        from selfjudge_vllm.cli import _interrupt_on_sigterm
        _interrupt_on_sigterm()
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        try:
            time.sleep(600)
        except KeyboardInterrupt:
            open({str(ended)!r}, "w").write("interrupted")
            raise SystemExit(130)
    """)
    driver = textwrap.dedent(f"""
        import pathlib, sys
        from benchmarks import chat_meaning
        chat_meaning.OUT = pathlib.Path({str(tmp_path)!r}) / "chat_meaning"
        chat_meaning.calibrate_command = lambda *a, **k: [sys.executable, "-c", {child!r}]
        chat_meaning.main(["--stages", "calibrate", "--testbed", "unused"])
    """)
    parent = subprocess.Popen([sys.executable, "-c", driver], env={**os.environ, "PYTHONPATH": str(ROOT)},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pid = int(_wait_for(pidfile))
    parent.send_signal(signal.SIGTERM)
    try:
        try:
            status = parent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child_state = "still runs" if os.path.exists(f"/proc/{pid}") else "ended"
            raise AssertionError(f"the driver did not exit 30 s after SIGTERM; its child {child_state}, "
                                 f"{'having' if ended.is_file() else 'without having'} seen Ctrl-C") from None
        assert status == 128 + signal.SIGTERM
        assert _wait_for(ended, 10) == "interrupted"
    finally:
        for process in (parent.pid, pid):  # only the processes this test started
            try:
                os.kill(process, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_selfjudge_calibrate_stops_its_servers_on_sigterm_as_on_ctrl_c(tmp_path):
    """SIGTERM of `selfjudge calibrate` unwinds as Ctrl-C does: run()'s `finally` (which stops its
    engines; here a stand-in run) runs and it exits as interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from benchmarks.chat_meaning import ROOT

    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    script = textwrap.dedent(f"""
        import sys, time
        from selfjudge_vllm import calibrate, cli
        def run(settings):
            try:
                open({str(ready)!r}, "w").write("serving")
                time.sleep(60)
            finally:
                open({str(stopped)!r}, "w").write("servers stopped")
        calibrate.settings_from_args = lambda args: None
        calibrate.run = run
        sys.exit(cli.main(["calibrate", "--target", "t", "--prompts", "p.jsonl", "--out", {str(tmp_path)!r},
                           "--speculative-config", "{{}}", "--measure", "meaning_changes", "--budget", "0.05"]))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == calibrate.EXIT_INTERRUPTED
        assert stopped.read_text() == "servers stopped"
        assert "interrupted" in child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()


def test_the_split_is_calibrates_of_the_prompt_file_when_lossless_was_cut_short(tmp_path):
    tree = Tree(tmp_path / "chat_meaning")
    tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION[:3]}, 2.0)  # a sitting cut after 3 of 10
    server = chat_meaning_report.build(tree.out)["servers"][0]
    assert (server["calibration_prompts"], server["test_prompts"], server["lossless_served"]) == (8, 2, 3)
    assert server["points"][0]["key"] == "lossless" and not server["points"][0]["complete"]
    md = chat_meaning_report.markdown(chat_meaning_report.build(tree.out))
    assert "| lossless | 3 of 8 (not served on all) |" in md and "(lossless incomplete:" in md
    # the label prompts a calibrate report records dropping are not split
    tree.report("meaning_changes", "embedding", 0.05, [], complete=False)
    path = tree.root / "meaning_changes-embedding-5pct" / "report.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "label_prompts_dropped": ["p2", "p3"]}))
    server = chat_meaning_report.build(tree.out)["servers"][0]
    assert (server["calibration_prompts"], server["test_prompts"]) == (7, 1)


def test_a_certificate_whose_test_part_was_cut_is_shown_with_its_test_check_pending(tmp_path):
    from benchmarks import docs_sync

    tree = _report_tree(tmp_path)
    path = tree.root / "meaning_changes-embedding-10pct" / "report.json"
    report = json.loads(path.read_text())
    for row in report["points"]:
        row.pop("test", None)
    path.write_text(json.dumps({**report, "complete": False}))  # --max-minutes cut the test part; certified
    chat_meaning_report.write(tree.out)
    md = (tree.out / "report.md").read_text()
    assert ("| meaning changed, embedding | 10% | relaxed point certified (test check pending: its test part was "
            "cut, rerun calibrate to finish it) | fly 1 (1.250x; bound 47.00%); top_alpha 0.9 (1.000x; bound 31.00%) "
            "(calibrate's bounds at 97.5%, Bonferroni over 2 families) "
            "| test check pending |") in md
    table = docs_sync.chat_meaning_blocks(tree.out.parent)[(docs_sync.ROOT / "README.md", "chat_results")]
    assert "| embedding 10% (test check pending) |" in table
    assert ("within embedding 10%: fly 1 (1.250x; bound 47.00%); top_alpha 0.9 (1.000x; bound 31.00%) "
            "(calibrate's bounds at 97.5%, Bonferroni over 2 families) (test check pending)") in table


def test_a_first_n_rate_is_drawn_and_given_with_the_acceptance_on_the_same_prompts(tmp_path, monkeypatch):
    import matplotlib.axes

    tree = Tree(tmp_path / "chat_meaning")
    tree.serve("lossless", {i: _lossless(i) for i in CALIBRATION}, 2.0)
    texts = {i: f"Another answer {i}." for i in CALIBRATION}
    tree.serve("fly-0.6", {i: texts[i] for i in CALIBRATION[:4]}, 3.0)  # the 4 the embedding run read
    tree.serve("fly-0.6", {i: texts[i] for i in CALIBRATION[4:]}, 2.2)  # served later
    for n, i in enumerate(CALIBRATION[:4]):
        tree.score("embedding", i, texts[i], score=0.5 if n < 3 else 0.999)
    tree.report("meaning_changes", "embedding", 0.05,
                [{"key": "fly-0.6", "n": 4, "changes": 3, "stopped_early": True, "mean_acceptance_length": 3.0}])
    report = chat_meaning_report.build(tree.out)
    row = next(r for r in report["servers"][0]["points"] if r["key"] == "fly-0.6")
    assert row["acceptance_vs_lossless"] == pytest.approx(1.3)  # on all 8
    assert row["measures"]["embedding"]["acceptance_vs_lossless"] == pytest.approx(1.5)  # on the first 4
    drawn = []
    original = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, x, y, **kw: drawn.append((list(x), list(y), kw)) or original(self, x, y, **kw))
    chat_meaning_report.plot(report, tree.out / "report.png")
    marks = [(x, y, kw.get("linestyles")) for x, y, kw in drawn[1:]]
    assert marks[0][:2] == ([75.0], [pytest.approx(1.5)]) and marks[1][2] == "--"  # the point, its dashed ring


def test_the_fly_grid_is_described_as_it_is():
    knobs = [float(k) for k in chat_meaning.FLY_GRID.split("=")[1].split(",")]
    assert 0.3 in knobs and min(knobs) == 0.2  # one point looser than vLLM's default
    assert "vLLM's default 0.3, stricter points, and one looser (0.2)" in chat_meaning.__doc__


def _scaling_head(path, weight: float, threshold: float, auroc: float, features: str):
    """A head as `selfjudge train` writes one for benchmarks/chat_judge_scaling.py."""
    import torch

    from selfjudge_vllm.artifact import JudgeArtifact, JudgeArtifactConfig, OperatingPoint, TargetIdentity

    identity = TargetIdentity(name="t", architecture="LlamaForCausalLM", hidden_size=4, vocab_size=10,
                              num_hidden_layers=1)
    JudgeArtifact(JudgeArtifactConfig(target=identity, default_threshold=0.5, operating_points={
        "accepts_10pct": OperatingPoint(threshold=threshold, metrics={"mismatch_accept_share": 0.1})}),
        torch.full((4,), weight), torch.zeros(1)).save(path)
    (path / "training_report.json").write_text(json.dumps({
        "training_mismatches": 100, "validation_mismatches": 40,
        "feature_sets": {features: {"validation_mismatch_roc_auc": auroc}}}))


def test_the_scaling_heads_are_served_on_the_benchmarks_store_at_one_validation_accept_share(monkeypatch, tmp_path):
    """benchmarks/chat_judge_scaling.py's serve stage: the best feature set's head at each size,
    at its accepts_10pct threshold, served on every benchmark prompt into a folder on the
    benchmark's store (lossless not served again, each head's judge points keyed apart), scored
    by the embedding scorer; its report gives each head's acceptance and meaning-change rate,
    and the benchmark's own report leaves these heads' points out. Nothing is served before
    lossless has every prompt."""
    from benchmarks import chat_judge_scaling

    tree, settings, served, fake_measure = _full_setup(monkeypatch, tmp_path)
    out = tmp_path / "scaling"
    for features, size, auroc, weight, threshold in (("hidden", 10, 0.60, 1.0, 0.4), ("hidden", 20, 0.70, 2.0, 0.6),
                                                     ("logits", 20, 0.65, 3.0, 0.5)):
        _scaling_head(out / "heads" / f"{features}-{size}", weight, threshold, auroc, features)
    monkeypatch.setattr(chat_meaning, "calibrate_settings", lambda args, *_: dataclasses.replace(settings,
                                                                                                 head=args.head))
    serve_in_full = chat_meaning.serve_in_full
    monkeypatch.setattr(chat_meaning, "serve_in_full", lambda *a, **k: serve_in_full(
        *a, **k, measure=fake_measure, embedder_factory=FakeEmbedder))
    argv = ["--testbed", str(tmp_path), "--out", str(out), "--sizes", "10,20", "--stages", "serve,report"]
    lossless_rows = (tree.store / "requests.jsonl").read_text()
    (tree.store / "requests.jsonl").write_text("".join(  # lossless not yet served on p7
        line + "\n" for line in lossless_rows.splitlines() if '"lossless", "id": "p7"' not in line))
    assert chat_judge_scaling.main(argv) == 0 and served == [] and not (out / "scaling.json").read_text().count("key")
    (tree.store / "requests.jsonl").write_text(lossless_rows)
    assert chat_judge_scaling.main(argv) == 0
    tags = {size: calibrate.file_sha256(out / "heads" / f"hidden-{size}" / "model.safetensors")[:12]
            for size in (10, 20)}
    keys = [f"judge@{tags[10]}-0.4", f"judge@{tags[20]}-0.6"]
    assert [(key, extra) for key, extra, _ in served[::2]] == [
        (keys[0], {"selfjudge_rule": "judge", "selfjudge_threshold": 0.4}),
        (keys[1], {"selfjudge_rule": "judge", "selfjudge_threshold": 0.6})]
    assert [todo for _, _, todo in served] == [CALIBRATION, TEST] * 2  # lossless is the store's already
    scaling = json.loads((out / "scaling.json").read_text())
    assert [(r["features"], r["size"], r["key"], r["n"]) for r in scaling["served"]] == [
        ("hidden", 10, keys[0], 10), ("hidden", 20, keys[1], 10)]
    assert all(r["measures"]["embedding"]["upper95"] is not None for r in scaling["served"])
    assert "| hidden, at most 20 | 0.6 | 10.0% |" in (out / "scaling.md").read_text()
    assert not [r for r in chat_meaning_report.build(tree.out)["servers"][0]["points"] if "@" in r["key"]]
    served.clear()  # a rerun serves nothing
    assert chat_judge_scaling.main(argv) == 0 and served == []
