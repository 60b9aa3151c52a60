"""Offline pipeline pieces without engines: scores arithmetic, splits, folding, inputs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from selfjudge_vllm.offline.engine import EngineSettings
from selfjudge_vllm.offline.label import InputError, LabelSettings, check_inputs
from selfjudge_vllm.offline.prompts import PromptFileError
from selfjudge_vllm.offline.scores import semantic_preservation_scores
from selfjudge_vllm.offline.store import IncompleteRunError, RunDir, RunError
from selfjudge_vllm.offline.train import fold_standardisation, limit_training, split_by_prompt, tau_from_outcomes


def test_scores_by_hand():
    # m = 3 in a sequence of 6: entries 3, 4, 5 exist.
    orig = [-1.0, -2.0, -3.0]
    sub_actual = [-4.0, -5.0, -6.0]
    sub_top1 = [-0.5, -0.25, -0.125]
    s = semantic_preservation_scores(3, 6, orig, sub_actual, sub_top1, [0, 1, 20])
    assert s["max"][0] == s["kept"][0] == pytest.approx(-1.0 - -4.0)
    assert s["kept"][1] == pytest.approx((-1 - 2) / 2 - (-4 - 5) / 2)
    assert s["max"][1] == pytest.approx((-1 - 2) / 2 - (-4 - 0.25) / 2)
    # N = 20 is cut at the end of the sequence: 3 entries in both means.
    assert s["max"][20] == pytest.approx(-2.0 - (-4 - 0.25 - 0.125) / 3)


def test_split_keeps_each_prompt_on_one_side():
    ids = [f"p{i % 10}" for i in range(200)]
    val = split_by_prompt(ids, 0.2, seed=3)
    for pid in set(ids):
        sides = {bool(v) for i, v in zip(ids, val) if i == pid}
        assert len(sides) == 1
    assert len({i for i, v in zip(ids, val) if v}) == 2


def test_a_training_limit_keeps_whole_prompts_every_validation_row_and_nests():
    ids = [f"p{i // 3}" for i in range(60)]  # 20 prompts, 3 mismatches each
    is_val = split_by_prompt(ids, 0.25, seed=1)
    kept = {}
    for limit in (7, 20, 1000):
        keep = limit_training(ids, is_val, limit, seed=1)
        assert keep[is_val].all()  # the validation set never shrinks
        training = [i for i, k, v in zip(ids, keep, is_val) if k and not v]
        assert len(training) <= max(limit, 3) and len(training) % 3 == 0  # whole prompts only
        kept[limit] = set(training)
    assert len(kept[7]) == 2 and len(kept[20]) == 6 and len(kept[1000]) == 15
    assert kept[7] <= kept[20] <= kept[1000]  # the sizes of a scaling curve nest
    assert limit_training(ids, is_val, 1, seed=1).sum() == is_val.sum() + 3  # at least one prompt


def test_folded_weights_equal_scaler_then_model():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 6))
    coef, intercept = rng.normal(size=6), 0.7
    mean, scale = x.mean(0), x.std(0)
    w, b = fold_standardisation(coef, intercept, mean, scale)
    assert np.allclose(((x - mean) / scale) @ coef + intercept, x @ w + b)


def _write(path, lines):
    path.write_text("".join(lines))
    return path


def test_bad_inputs_are_refused_before_any_engine(tmp_path, tiny_pair, workdir):
    from selfjudge_vllm.testing.tiny_models import build_tiny_llama

    target, draft = tiny_pair
    good = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "one two three"}) + "\n"])

    def settings(**kw):
        base = dict(target=str(target), draft=str(draft), prompts=str(good), max_new_tokens=8)
        base.update(kw)
        return LabelSettings(**base)

    assert len(check_inputs(settings())) == 1
    with pytest.raises(InputError, match="no config.json"):
        check_inputs(settings(target=str(tmp_path / "nope")))
    with pytest.raises(PromptFileError, match="holds no prompts"):
        check_inputs(settings(prompts=str(_write(tmp_path / "e.jsonl", ["\n"]))))
    with pytest.raises(PromptFileError, match=r"m.jsonl:2: not valid JSON"):
        check_inputs(settings(prompts=str(_write(tmp_path / "m.jsonl", ['{"prompt": "a"}\n', "{oops\n"]))))
    with pytest.raises(PromptFileError, match="exactly one of 'prompt' or 'messages'"):
        check_inputs(settings(prompts=str(_write(tmp_path / "x.jsonl", ['{"text": "a"}\n']))))
    with pytest.raises(PromptFileError, match="duplicate id"):
        check_inputs(settings(prompts=str(_write(tmp_path / "d.jsonl", ['{"id": 1, "prompt": "a"}\n'] * 2))))
    long_prompt = json.dumps({"prompt": "one two three " * 200}) + "\n"
    with pytest.raises(PromptFileError, match="needs more than the context of 512"):
        check_inputs(settings(prompts=str(_write(tmp_path / "l.jsonl", [long_prompt])),
                              engine=EngineSettings(max_model_len=512)))
    other_tok = build_tiny_llama(workdir / "models/other-tokenizer", num_layers=1, seed=1, tokenizer_seed=9)
    with pytest.raises(InputError, match="another tokenizer"):
        check_inputs(settings(draft=str(other_tok)))


def test_run_folder_refuses_other_settings(tmp_path):
    run = RunDir(tmp_path / "run")
    run.bind_settings({"a": 1, "engine": {"x": 1}})
    # Settings the package gained after the run started, left at None, at any depth: what the run did.
    run.bind_settings({"a": 1, "b": None, "engine": {"x": 1, "y": None}})
    with pytest.raises(RunError, match="other settings \\(a\\)"):
        run.bind_settings({"a": 2, "engine": {"x": 1}})
    with pytest.raises(RunError, match="other settings \\(engine\\)"):
        run.bind_settings({"a": 1, "engine": {"x": 1, "y": 3}})
    run.write_tensors("features", 0, {"x": torch.ones(2, 3)})
    assert torch.equal(run.read_tensors("features", 0)["x"], torch.ones(2, 3))
    assert not list((tmp_path / "run/features").glob(".*tmp"))


def test_an_answer_pattern_may_be_added_to_a_run_started_without_one(tmp_path):
    run = RunDir(tmp_path / "run")
    run.bind_settings({"a": 1, "answer_pattern": None})
    with pytest.raises(RunError, match=r"other settings \(a\)"):  # nothing recorded on a refusal
        run.bind_settings({"a": 2, "answer_pattern": "x"}, addable=("answer_pattern",))
    assert run.read_json("run.json")["answer_pattern"] is None
    with pytest.raises(RunError, match="answer_pattern"):  # only where it is addable
        run.bind_settings({"a": 1, "answer_pattern": "x"})
    run.bind_settings({"a": 1, "answer_pattern": "x"}, addable=("answer_pattern",))
    assert run.read_json("run.json") == {"a": 1, "answer_pattern": "x"}
    run.bind_settings({"a": 1, "answer_pattern": None}, addable=("answer_pattern",))  # left out: the run's
    with pytest.raises(RunError, match="answer_pattern"):  # but not another one
        run.bind_settings({"a": 1, "answer_pattern": "y"}, addable=("answer_pattern",))


def test_a_prompt_file_is_bound_by_its_content_not_how_its_path_is_written(tmp_path):
    digests = {"prompts": "prompts_sha256"}
    addable = ("prompts_sha256",)
    old = RunDir(tmp_path / "old")  # started before digests were recorded
    old.bind_settings({"prompts": "p.jsonl"})
    with pytest.raises(RunError, match=r"other settings \(prompts\)"):  # no digest to vouch for another path
        old.bind_settings({"prompts": "/abs/p.jsonl", "prompts_sha256": "aa"}, addable, digests)
    old.bind_settings({"prompts": "p.jsonl", "prompts_sha256": "aa"}, addable, digests)  # gains the digest
    old.bind_settings({"prompts": "/abs/p.jsonl", "prompts_sha256": "aa"}, addable, digests)
    with pytest.raises(RunError, match="prompts_sha256"):  # same path, other content
        old.bind_settings({"prompts": "p.jsonl", "prompts_sha256": "bb"}, addable, digests)
    assert old.read_json("run.json") == {"prompts": "p.jsonl", "prompts_sha256": "aa"}


def test_a_label_run_resumes_from_its_prompt_file_under_another_path_but_not_other_prompts(
        tmp_path, tiny_pair, monkeypatch):
    from selfjudge_vllm.offline.label import prepare_job

    target, draft = tiny_pair
    monkeypatch.chdir(tmp_path)
    prompts = _write(tmp_path / "p.jsonl", ['{"prompt": "a b c"}\n'])
    settings = LabelSettings(target=str(target), draft=str(draft), prompts="p.jsonl", max_new_tokens=8)
    prepare_job(settings, tmp_path / "run")
    # what calibrate checks its prompts against (through the trained head's provenance)
    from selfjudge_vllm.offline.prompts import PROMPT_DIGESTS_FILE, prompt_digest, prompt_digests

    recorded = json.loads((tmp_path / "run" / PROMPT_DIGESTS_FILE).read_text())
    assert recorded == sorted(prompt_digests({"prompt": "a b c"})) and prompt_digest({"prompt": " a b c\n"}) in recorded
    prepare_job(replace(settings, prompts=str(prompts.resolve())), tmp_path / "run")  # the same file
    _write(prompts, ['{"prompt": "other words"}\n'])
    with pytest.raises(RunError, match="prompts_sha256"):
        prepare_job(settings, tmp_path / "run")


def test_a_stage_runs_on_the_shards_whose_inputs_are_complete_only_when_asked(tmp_path, monkeypatch):
    from selfjudge_vllm.offline import label

    run = RunDir(tmp_path / "run")
    run.bind_shard_count(4)
    for i in range(4):
        run.write_records("responses", i, [])
    for i in (0, 1, 3):
        run.write_records("scores", i, [])
    run.write_records("outcomes", 0, [])
    ran = []
    monkeypatch.setattr(label, "run_stage_shards", lambda job, stage, indices, progress: ran.extend(indices))
    job = label.LabelJob(LabelSettings("t", "d", "p", answer_pattern="x"), run, [[]] * 4)
    with pytest.raises(IncompleteRunError, match="lacks shard"):
        label.run_stage(job, label.STAGE_BY_NAME["outcomes"], None)
    assert ran == []
    label.run_stage(job, label.STAGE_BY_NAME["outcomes"], None, allow_partial=True)
    assert ran == [1, 3]  # shard 0 is done, shard 2 has no scores


def test_tau_from_answer_outcomes_maximises_agreement():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, 300)
    changed = scores > 0.6  # the answer changes exactly when the score is high
    tau, agreement = tau_from_outcomes(scores, changed)
    assert agreement == 1.0
    assert scores[~changed].max() <= tau < scores[changed].min()
    flipped = changed.copy()
    flipped[:30] = ~flipped[:30]  # noise: agreement drops below 1 but tau stays near 0.6
    tau, agreement = tau_from_outcomes(scores, flipped)
    assert 0.5 < agreement < 1.0 and 0.45 < tau < 0.75


def test_training_report_judges_the_head_on_mismatches_only(tmp_path, monkeypatch):
    """Own-token rows are easy positives; the head decides only mismatches online, so the
    mismatch metrics and operating points must not count them."""
    from selfjudge_vllm.offline import train as train_module

    rng = np.random.default_rng(0)
    n, hidden = 400, 4
    scores = rng.uniform(0, 1, n)
    records = [{"id": f"p{i % 40}", "m": i, "scores": {"max": {"5": float(s)}}} for i, s in enumerate(scores)]
    # Mismatch features carry a weak hint of the label (dimension 0); own-token rows are far away.
    substituted = torch.from_numpy(rng.normal(size=(n, hidden)))
    substituted[:, 0] += torch.from_numpy((scores <= 0.3) * 0.5)
    original = torch.from_numpy(rng.normal(size=(n, hidden)))
    original[:, 1] += 8.0
    monkeypatch.setattr(train_module, "load_run", lambda run_dir, with_hidden=True, **_: (
        records, substituted if with_hidden else None, original if with_hidden else None))
    (tmp_path / "target.json").write_text(json.dumps(
        {"name": "t", "architecture": "A", "hidden_size": hidden, "vocab_size": 10, "num_hidden_layers": 1}))
    report = train_module.train(tmp_path, tmp_path / "head", train_module.TrainSettings(suffix_length=5, tau=0.3))

    assert report["validation_roc_auc"] > 0.8  # flattered by the own-token rows
    assert 0.5 < report["validation_mismatch_roc_auc"] < report["validation_roc_auc"] - 0.1
    assert report["operating_points_on"] == "validation mismatches"
    assert report["validation_mismatches"] == split_by_prompt([r["id"] for r in records], 0.2, 0).sum()
    config = json.loads((tmp_path / "head/config.json").read_text())
    points = sorted(config["operating_points"].values(), key=lambda p: p["threshold"])
    shares = [p["metrics"]["mismatch_accept_share"] for p in points]
    assert all(0.0 <= s <= 1.0 for s in shares) and shares == sorted(shares, reverse=True)
    assert all("validation mismatches" in p["description"] for p in points)


def test_logit_features_and_stacking_beat_a_weak_hidden_head_and_serve_as_trained(tmp_path, monkeypatch):
    """Labels driven by the draft's log-probability ratio, with a weak hint in the hidden
    state: the report compares the feature sets on the same validation mismatches, auto
    serves a logit-feature head, and the served artifact (format 2, folded) scores those
    mismatches exactly as training did."""
    from sklearn.metrics import roc_auc_score

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.features import LOGIT_FEATURES
    from selfjudge_vllm.offline import train as train_module
    from selfjudge_vllm.rules import JudgeHead

    rng = np.random.default_rng(1)
    n, hidden = 600, 6
    logratio = -rng.exponential(2.0, n)
    confidence = -rng.exponential(0.5, n)
    scores = -0.6 * logratio + rng.normal(0, 0.5, n)  # accept (score <= tau) when the ratio is near 0
    records = [{"id": f"p{i % 60}", "m": i, "scores": {"max": {"5": float(s)}},
                "evidence": {"draft_logratio": float(r), "verify_confidence": float(c),
                             "next_confidence": None if i == 7 else float(c / 2)}}
               for i, (s, r, c) in enumerate(zip(scores, logratio, confidence))]
    substituted = torch.from_numpy(rng.normal(size=(n, hidden)))
    substituted[:, 0] += torch.from_numpy((scores <= 1.0) * 0.4)
    original = torch.from_numpy(rng.normal(size=(n, hidden)))
    monkeypatch.setattr(train_module, "load_run", lambda run_dir, with_hidden=True, **_: (
        records, substituted if with_hidden else None, original if with_hidden else None))
    (tmp_path / "target.json").write_text(json.dumps(
        {"name": "t", "architecture": "A", "hidden_size": hidden, "vocab_size": 10, "num_hidden_layers": 1}))
    report = train_module.train(tmp_path, tmp_path / "head", train_module.TrainSettings(suffix_length=5, tau=1.0))

    aucs = {name: entry["validation_mismatch_roc_auc"] for name, entry in report["feature_sets"].items()}
    assert set(aucs) == {"hidden", "logits", "both"}
    assert aucs["logits"] > aucs["hidden"] + 0.1 and aucs["both"] > aucs["hidden"] + 0.1
    assert report["features"] in ("logits", "both") and report["validation_mismatch_roc_auc"] == max(aucs.values())

    artifact = JudgeArtifact.load(tmp_path / "head")
    assert artifact.config.format_version == 2
    assert artifact.config.logit_features == LOGIT_FEATURES
    head = JudgeHead.from_artifact(artifact)
    is_val = split_by_prompt([r["id"] for r in records], 0.2, 0)
    rows = [k for k in range(n) if is_val[k] and k != 7]  # mismatch 7 has no next_confidence
    evidence = torch.tensor([[records[k]["evidence"][f] for f in LOGIT_FEATURES] for k in rows])
    served = head.judge_logits(substituted[rows].float() if head.reads_hidden else None, evidence)
    labels = [int(scores[k] <= 1.0) for k in rows]
    assert report["validation_mismatches"] == len(rows)
    assert roc_auc_score(labels, served.numpy()) == pytest.approx(report["validation_mismatch_roc_auc"], abs=1e-6)
    # Operating points by accepted share: served, each accepts at most its share of them.
    assert sorted(n for n in artifact.config.operating_points if n.startswith("accepts_")) == sorted(
        f"accepts_{round(100 * share)}pct" for share in train_module.ACCEPT_SHARES)
    for name, share in (("accepts_2pct", 0.02), ("accepts_5pct", 0.05), ("accepts_20pct", 0.2),
                        ("accepts_40pct", 0.4)):
        point = artifact.config.operating_points[name]
        accepted = float((torch.sigmoid(served.double()) >= point.threshold).double().mean())
        one_row = 1.0 / len(rows)  # served scores are float32: a row at the threshold may flip
        assert share - 0.05 <= accepted <= share + one_row
        assert point.metrics["mismatch_accept_share"] == pytest.approx(accepted, abs=one_row)

    # --features hidden keeps the paper's head: format 1, hidden state only.
    hidden_report = train_module.train(tmp_path, tmp_path / "hidden-head",
                                       train_module.TrainSettings(suffix_length=5, tau=1.0, features="hidden"))
    assert hidden_report["features"] == "hidden" and set(hidden_report["feature_sets"]) == {"hidden"}
    assert JudgeArtifact.load(tmp_path / "hidden-head").config.format_version == 1


@pytest.mark.parametrize("features", ["hidden", "logits", "both"])
def test_the_validation_prompts_choose_nothing_so_their_roc_auc_is_held_out(tmp_path, monkeypatch, features):
    """Each head's C and weights come from the training prompts alone: with every validation
    prompt's labels reversed and its hidden states and logit features replaced by noise, each
    feature set trains the same head (the validation ROC-AUC drops), and its C was chosen among
    every C_GRID value."""
    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.offline import train as train_module

    rng = np.random.default_rng(2)
    n, hidden = 800, 6
    logratio = -rng.exponential(2.0, n)
    confidence = -rng.exponential(0.5, (n, 2))  # noise beside the informative ratio: C matters
    scores = -0.4 * logratio + rng.normal(0, 0.7, n)
    ids = [f"p{i % 80}" for i in range(n)]
    substituted = torch.from_numpy(rng.normal(size=(n, hidden)))
    substituted[:, 0] += torch.from_numpy((scores <= 1.0) * 0.8)
    original = torch.from_numpy(rng.normal(size=(n, hidden)))
    is_val = split_by_prompt(ids, 0.2, 0)

    def train_on(name: str, scores, substituted, logratio, confidence) -> tuple[dict, JudgeArtifact]:
        records = [{"id": i, "m": k, "scores": {"max": {"5": float(s)}},
                    "evidence": {"draft_logratio": float(r), "verify_confidence": float(c[0]),
                                 "next_confidence": float(c[1])}}
                   for k, (i, s, r, c) in enumerate(zip(ids, scores, logratio, confidence))]
        monkeypatch.setattr(train_module, "load_run", lambda run_dir, with_hidden=True, **_: (
            records, substituted if with_hidden else None, original if with_hidden else None))
        (tmp_path / "target.json").write_text(json.dumps(
            {"name": "t", "architecture": "A", "hidden_size": hidden, "vocab_size": 10, "num_hidden_layers": 1}))
        report = train_module.train(tmp_path, tmp_path / name,
                                    train_module.TrainSettings(suffix_length=5, tau=1.0, features=features))
        return report, JudgeArtifact.load(tmp_path / name)

    report, artifact = train_on("head", scores, substituted, logratio, confidence)
    flipped_scores = np.where(is_val, np.where(scores <= 1.0, 2.0, 0.0), scores)
    noisy = torch.where(torch.from_numpy(is_val)[:, None], torch.from_numpy(rng.normal(size=(n, hidden))), substituted)
    flipped_report, flipped_artifact = train_on("flipped", flipped_scores, noisy,
                                                np.where(is_val, -rng.exponential(2.0, n), logratio),
                                                np.where(is_val[:, None], -rng.exponential(0.5, (n, 2)), confidence))

    assert report["feature_sets"][features]["C"] == flipped_report["feature_sets"][features]["C"]
    for field in ("weight", "scalar_weight"):
        ours, theirs = getattr(artifact, field), getattr(flipped_artifact, field)
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
    assert float(artifact.bias) == float(flipped_artifact.bias)
    auc = report["validation_mismatch_roc_auc"]
    assert auc > 0.6 and flipped_report["validation_mismatch_roc_auc"] < auc - 0.15  # reversed (or noise)
    assert set(report["feature_sets"][features]["C_selection_roc_auc"]) == {str(c) for c in train_module.C_GRID}


def test_logits_only_head_trains_without_the_features_stage(tmp_path):
    """--features logits reads the scores stage alone (no hidden states needed)."""
    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.offline import train as train_module

    rng = np.random.default_rng(2)
    run = RunDir(tmp_path / "run")
    run.bind_shard_count(2)
    for shard in range(2):
        rows = []
        for i in range(150):
            ratio = -float(rng.exponential(2.0))
            rows.append({"id": f"s{shard}p{i % 15}", "m": i, "draft": 1, "target": 2,
                         "scores": {"max": {"5": -0.6 * ratio + float(rng.normal(0, 0.5))}},
                         "evidence": {"draft_logratio": ratio, "verify_confidence": -0.3, "next_confidence": -0.2},
                         "proposers": [["draft_model"], ["ngram"], ["draft_model", "ngram"]][i % 3]})
        run.write_records("scores", shard, rows)
    (tmp_path / "run/target.json").write_text(json.dumps(
        {"name": "t", "architecture": "A", "hidden_size": 4, "vocab_size": 10, "num_hidden_layers": 1}))
    report = train_module.train(tmp_path / "run", tmp_path / "head",
                                train_module.TrainSettings(suffix_length=5, tau=1.0, features="logits"))
    assert report["features"] == "logits" and set(report["feature_sets"]) == {"logits"}
    assert report["mismatches"] == 300 and report["validation_mismatch_roc_auc"] > 0.8
    # Validation metrics per proposer: each mismatch counts for every proposer that drafts it.
    per = report["per_proposer"]
    assert set(per) == {"draft_model", "ngram"}
    records = run.read_stage("scores")
    is_val = split_by_prompt([r["id"] for r in records], 0.2, 0)
    for name in ("draft_model", "ngram"):
        assert per[name]["validation_mismatches"] == sum(
            1 for r, v in zip(records, is_val) if v and name in r["proposers"])
    assert all(0.5 < p["roc_auc"] <= 1.0 for p in per.values())
    assert JudgeArtifact.load(tmp_path / "head").weight is None
    with pytest.raises(IncompleteRunError, match="stage 'features' lacks shard\\(s\\) 0-1 of 2"):
        train_module.train(tmp_path / "run", tmp_path / "head2", train_module.TrainSettings(suffix_length=5, tau=1.0))


def _scored_run(root, shards: dict[int, int], total: int, hidden: int = 4) -> RunDir:
    """A run folder with `shards` {index: mismatches} scored and with features, of `total` shards."""
    run = RunDir(root)
    run.bind_shard_count(total)
    run.write_json("target.json", {"name": "t", "architecture": "A", "hidden_size": hidden, "vocab_size": 10,
                                   "num_hidden_layers": 1})
    for index, count in shards.items():
        rows = [{"id": f"s{index}p{i}", "m": i, "draft": 5, "scores": {"max": {"5": 0.1 * i}},
                 "evidence": {"draft_logratio": -0.5 * i, "verify_confidence": -0.3, "next_confidence": -0.2}}
                for i in range(count)]
        run.write_records("scores", index, rows)
        run.write_records("features", index, [{"id": r["id"], "m": r["m"]} for r in rows])
        # Older runs wrote an empty shard's tensors as [0, 0].
        width = hidden if count else 0
        run.write_tensors("features", index, {"substituted": torch.full((count, width), float(index)),
                                              "original": torch.zeros(count, width)})
    return run


def test_a_run_with_an_empty_shard_loads_as_zero_rows_of_the_hidden_width(tmp_path):
    from selfjudge_vllm.offline.store import load_run

    _scored_run(tmp_path / "run", {0: 2, 1: 0, 2: 3}, total=3)
    records, substituted, original = load_run(tmp_path / "run")
    assert len(records) == 5 and substituted.shape == (5, 4) and original.shape == (5, 4)
    assert substituted[:, 0].tolist() == [0, 0, 2, 2, 2]


def test_a_run_missing_shards_is_refused_naming_them_unless_partial_is_asked_for(tmp_path):
    from selfjudge_vllm.offline import train as train_module
    from selfjudge_vllm.offline.store import load_run

    run = _scored_run(tmp_path / "run", {0: 40, 2: 40, 3: 40}, total=5)
    with pytest.raises(IncompleteRunError, match="stage 'scores' lacks shard\\(s\\) 1, 4 of 5"):
        load_run(tmp_path / "run", with_hidden=False)
    assert not train_module.Outcomes(tmp_path / "run")  # no outcomes stage at all: none
    run.write_records("outcomes", 0, [{"id": "s0p1", "m": 1, "draft": 5, "unchanged": False}])
    with pytest.raises(IncompleteRunError, match="stage 'outcomes' lacks shard\\(s\\) 1-4 of 5"):
        train_module.Outcomes(tmp_path / "run")
    assert train_module.Outcomes(tmp_path / "run", allow_partial=True).changed({"id": "s0p1", "m": 1, "draft": 5})
    records, _, _ = load_run(tmp_path / "run", with_hidden=False, allow_partial=True)
    assert [r["id"][:2] for r in records] == ["s0"] * 40 + ["s2"] * 40 + ["s3"] * 40
    assert run.read_stage("scores", allow_partial=True) == records
    report = train_module.train(tmp_path / "run", tmp_path / "head", train_module.TrainSettings(
        suffix_length=5, tau=1.5, features="logits", allow_partial_run=True))
    assert report["shards"] == [{"run": str(tmp_path / "run"), "total": 5, "used": [0, 2, 3],
                                 "hidden_state_precision": None}]


def test_shard_count_is_bound_to_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.bind_shard_count(3)
    run.bind_shard_count(3)
    with pytest.raises(RunError, match="has 3 shards but these prompts make 4"):
        run.bind_shard_count(4)
    assert run.shard_count() == 3


def test_target_identity_is_written_atomically_into_the_run_store(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from selfjudge_vllm.offline import store
    from selfjudge_vllm.offline.label import write_target_identity

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=300, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "target")
    written = []
    real = store._atomic_write
    monkeypatch.setattr(store, "_atomic_write", lambda path, write: written.append(path.name) or real(path, write))
    run = RunDir(tmp_path / "run")
    write_target_identity(run, str(tmp_path / "target"))
    assert written == ["target.json"]
    assert run.read_json("target.json") == {"name": str(tmp_path / "target"), "architecture": "LlamaForCausalLM",
                                            "hidden_size": 64, "vocab_size": 300, "num_hidden_layers": 2}


def test_ngram_lookup_equals_vllms_own_function():
    """offline/proposers.ngram_proposal against vLLM's numba lookup, on random sequences over
    small alphabets (many repeats, ties between occurrences, overlapping matches). vLLM's
    function runs in its own interpreter: numba in this process breaks later engine builds of
    vLLM 0.32 unless tests/conftest.py's patch is in place, which only engine tests install."""
    import subprocess
    import sys

    from selfjudge_vllm.offline.proposers import NgramSettings, ngram_proposal

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 40))).tolist(),
              int(rng.integers(1, 3)), int(rng.integers(3, 6)), int(rng.integers(1, 6)), int(rng.integers(5, 60)))
             for _ in range(300)]
    code = (
        "import json, sys, numpy as np\n"
        "from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens as f\n"
        "cases = json.load(sys.stdin)\n"
        "print(json.dumps([f(np.array(t, dtype=np.int32), lo, hi, mml, k).tolist() for t, lo, hi, k, mml in cases]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [ngram_proposal(np.array(t, dtype=np.int64), NgramSettings(k, lo, hi), mml).tolist()
            for t, lo, hi, k, mml in cases]
    assert sum(bool(p) for p in theirs) > 100  # the cases exercise proposals, not just empties
    assert ours == theirs


def test_ngram_replay_walks_the_lossless_decode():
    from selfjudge_vllm.offline.proposers import NgramSettings, NgramStep, ngram_mismatches, replay_ngram_decode

    settings = NgramSettings(k=3, min_n=2, max_n=3)
    prompt = [1, 2, 3, 4, 1, 2]
    response = [3, 4, 1, 9, 5]  # position 6 from prefill; "1 2 3" then proposes 4 1 2 at 7
    steps = replay_ngram_decode(prompt + response, len(prompt), settings, max_model_len=100)
    # At 7 (after "... 1 2 3"): proposes [4, 1, 2]; 4, 1 match, 2 != 9: two accepted, 9 from the target.
    # At 10 (after "... 4 1 9"): "1 9" / "4 1 9" never occurred before, no proposal.
    assert steps == [NgramStep(7, 3, 2), NgramStep(10, 0, 0)]
    assert ngram_mismatches(prompt + response, len(prompt), settings, 100) == [(9, 2)]


def test_answer_change_points_follow_the_first_accepted_substitution_of_each_response():
    from selfjudge_vllm.offline.train import answer_change_points, response_change_share

    # Response a: the first accepted substitution decides; b changes at 0.8; c never changes.
    response = np.array(["a", "a", "b", "c", "c"])
    m = np.array([10, 20, 5, 3, 7])
    p = np.array([0.9, 0.5, 0.8, 0.3, 0.95])
    changed = np.array([False, True, True, False, False])
    assert response_change_share(response, m, p, changed, 0.96) == 0.0
    assert response_change_share(response, m, p, changed, 0.9) == 0.0
    assert response_change_share(response, m, p, changed, 0.8) == pytest.approx(1 / 3)
    # At 0.5, a's first accepted mismatch (m=10) keeps the answer; its later one does not count.
    assert response_change_share(response, m, p, changed, 0.5) == pytest.approx(1 / 3)
    points = answer_change_points(response, m, p, changed)
    assert set(points) == {"estimated_changes_1pct", "estimated_changes_2pct", "estimated_changes_5pct"}
    assert all(pt.threshold == 0.9 and pt.metrics["estimated_response_change_share"] == 0.0 for pt in points.values())
    # If the tightest acceptance already changes an answer, the point accepts nothing.
    strict = answer_change_points(response, m, p, np.ones(5, dtype=bool))
    assert strict["estimated_changes_5pct"].threshold > p.max()


def test_engine_arguments_choose_safe_cpu_defaults_and_say_so(monkeypatch):
    from selfjudge_vllm.offline.engine import CPU_KV_CACHE_GIB, engine_arguments, start_failure_message

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kwargs, notes = engine_arguments("m", EngineSettings(), on_cpu=True, native_bf16=False)
    assert kwargs["dtype"] == "float32" and kwargs["kv_cache_memory_bytes"] == int(CPU_KV_CACHE_GIB * 2**30)
    assert len(notes) == 2 and "float32" in notes[0] and "KV cache bounded to 4 GiB" in notes[1]
    # Little memory free: half of it.
    tight, tight_notes = engine_arguments("m", EngineSettings(), on_cpu=True, native_bf16=False, free_gib=3.0)
    assert tight["kv_cache_memory_bytes"] == int(1.5 * 2**30) and "1.5 GiB" in tight_notes[1]
    # Native bf16: the model's own dtype; GPU: vLLM's own sizing and dtype.
    assert engine_arguments("m", EngineSettings(), on_cpu=True, native_bf16=True)[0]["dtype"] == "auto"
    gpu, gpu_notes = engine_arguments("m", EngineSettings(), on_cpu=False, native_bf16=False)
    assert gpu["dtype"] == "auto" and "kv_cache_memory_bytes" not in gpu and gpu_notes == []
    # What the user sets wins: dtype, --kv-cache-gib, VLLM_CPU_KVCACHE_SPACE, --engine-args.
    given, _ = engine_arguments("m", EngineSettings(dtype="bfloat16", kv_cache_gib=1.5, extra={"max_num_seqs": 3}),
                                on_cpu=True, native_bf16=False)
    assert given["dtype"] == "bfloat16" and given["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert given["max_num_seqs"] == 3
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert "kv_cache_memory_bytes" not in engine_arguments("m", EngineSettings(), on_cpu=True, native_bf16=False)[0]
    message = start_failure_message(kwargs, RuntimeError("Engine core initialization failed"))
    assert "--kv-cache-gib" in message and "4 GiB" in message and "Engine core initialization failed" in message


def test_several_runs_train_one_head_on_their_union_and_disagreeing_runs_are_refused(tmp_path):
    from selfjudge_vllm.offline import train as train_module

    settings = {"suffix_lengths": [5], "engine": {"dtype": "float32"}, "prompts": "a.jsonl"}
    runs = []
    for k in range(2):
        run = _scored_run(tmp_path / f"run{k}", {0: 60, 1: 60}, total=2)
        run.bind_settings(dict(settings, prompts=f"{k}.jsonl"))  # other prompts: allowed
        runs.append(run.root)
    one = train_module.train(runs[0], tmp_path / "one", train_module.TrainSettings(
        suffix_length=5, tau=1.5, features="logits"))
    both = train_module.train(runs, tmp_path / "both", train_module.TrainSettings(
        suffix_length=5, tau=1.5, features="logits"))
    assert both["mismatches"] == 2 * one["mismatches"] == 240
    # The same prompt ids in both runs are different prompts: the split keeps them apart.
    assert both["validation_prompts"] > one["validation_prompts"]
    assert [s["run"] for s in both["shards"]] == [str(r) for r in runs]

    other = _scored_run(tmp_path / "other-target", {0: 60, 1: 60}, total=2, hidden=8)
    other.bind_settings(settings)
    with pytest.raises(InputError, match="different targets \\(hidden_size: 4 vs 8\\)"):
        train_module.train([runs[0], other.root], tmp_path / "x", train_module.TrainSettings(suffix_length=5, tau=1.5))
    other_n = _scored_run(tmp_path / "other-n", {0: 60, 1: 60}, total=2)
    other_n.bind_settings(dict(settings, suffix_lengths=[5, 20]))
    with pytest.raises(InputError, match="differ in suffix_lengths"):
        train_module.train([runs[0], other_n.root], tmp_path / "x", train_module.TrainSettings(suffix_length=5, tau=1.5))
    with pytest.raises(InputError, match="given twice"):
        train_module.train([runs[0], runs[0]], tmp_path / "x", train_module.TrainSettings(suffix_length=5, tau=1.5))


def _run_with_hidden_rows(root, shards: dict[int, int], hidden: int = 8, seed: int = 0) -> RunDir:
    """_scored_run with random float32 hidden rows spanning float16's normal and subnormal range."""
    run = _scored_run(root, shards, total=len(shards), hidden=hidden)
    generator = torch.Generator().manual_seed(seed)
    for index, count in shards.items():
        if count:
            scale = torch.logspace(-6, 2.5, hidden).expand(count, hidden)  # 1e-6 .. ~316 per column
            run.write_tensors("features", index, {key: torch.randn(count, hidden, generator=generator) * scale
                                                  for key in ("substituted", "original")})
    return run


def test_float16_features_round_trip_within_float16_rounding_and_train_says_so(tmp_path):
    import shutil

    from selfjudge_vllm.offline import train as train_module
    from selfjudge_vllm.offline.store import COMPACT_FEATURES, compact_features, load_run

    run = _run_with_hidden_rows(tmp_path / "run", {0: 60, 1: 0, 2: 60})
    assert compact_features(run) == {"written": [0, 1, 2], "kept": []}
    provenance = (run.root / COMPACT_FEATURES / "provenance.json").read_text()
    assert compact_features(run) == {"written": [], "kept": [0, 1, 2]}  # same float32 rows: nothing rewritten
    assert (run.root / COMPACT_FEATURES / "provenance.json").read_text() == provenance
    for index in range(3):
        full, half = run.read_tensors("features", index), run.read_tensors(COMPACT_FEATURES, index)
        assert set(half) == set(full) and all(half[k].dtype == torch.float16 for k in half)
        assert all(half[k].shape == full[k].shape for k in half)
        assert run.read_records(COMPACT_FEATURES, index) == run.read_records("features", index)
        for key in full:
            # Round to nearest: half a float16 step, 2^-11 of the value (2^-25 among subnormals).
            error = (half[key].float() - full[key]).abs()
            assert (error <= torch.clamp(full[key].abs() * 2.0**-11, min=2.0**-25)).all()
    full_records, full_sub, full_orig = load_run(run.root)

    clone = RunDir(shutil.copytree(run.root, tmp_path / "clone", ignore=shutil.ignore_patterns("features")))
    records, sub, orig = load_run(clone.root)
    assert records == full_records and sub.dtype == orig.dtype == torch.float32
    assert torch.equal(sub, full_sub.half().float()) and torch.equal(orig, full_orig.half().float())
    settings = train_module.TrainSettings(suffix_length=5, tau=1.5, features="hidden")
    assert train_module.train(run.root, tmp_path / "h32", settings)["hidden_state_precision"] == "float32"
    report = train_module.train(clone.root, tmp_path / "h16", settings)
    assert report["hidden_state_precision"] == "float16"
    assert report["shards"][0]["hidden_state_precision"] == "float16"
    logits_only = train_module.TrainSettings(suffix_length=5, tau=1.5, features="logits")
    assert train_module.train(clone.root, tmp_path / "hl", logits_only)["hidden_state_precision"] is None


def test_a_damaged_or_foreign_float16_shard_is_refused_naming_it(tmp_path):
    import shutil

    from selfjudge_vllm.offline.store import COMPACT_FEATURES, compact_features, load_run

    run = _run_with_hidden_rows(tmp_path / "run", {0: 5, 1: 5})
    compact_features(run)
    shutil.rmtree(run.root / "features")  # a clone: only the float16 copy
    shard0, shard1 = (run.shard(COMPACT_FEATURES, i, "safetensors") for i in (0, 1))
    good = shard0.read_bytes()

    shard0.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped in the rows
    with pytest.raises(RunError, match="shard-00000.safetensors is not the file `selfjudge compact` wrote"):
        load_run(run.root)
    shard0.write_bytes(shard1.read_bytes())  # another shard's copy in its place
    with pytest.raises(RunError, match="SHA-256 differs"):
        load_run(run.root)
    shard0.write_bytes(good)
    records = load_run(run.root)[0]

    # Relabelled scores: the copy's rows are no longer the scored mismatches.
    scores = run.read_records("scores", 1)
    run.write_records("scores", 1, [dict(r, m=r["m"] + 1) for r in scores])
    with pytest.raises(RunError, match="shard-00001.safetensors does not belong to this run's scored shard 1: "
                                       "its rows \\(prompt id, position\\) are not those of scores/shard-00001"):
        load_run(run.root)
    run.write_records("scores", 1, scores)

    # A file the manifest does not list, or one that is no safetensors file, even with its digest listed.
    manifest_path = run.root / COMPACT_FEATURES / "provenance.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, shards={})))
    with pytest.raises(RunError, match="not listed in features-float16/provenance.json"):
        load_run(run.root)
    from selfjudge_vllm.files import file_sha256

    shard0.write_bytes(b"not a safetensors file")
    entry = dict(manifest["shards"][shard0.name], sha256=file_sha256(shard0))
    manifest_path.write_text(json.dumps(dict(manifest, shards=dict(manifest["shards"], **{shard0.name: entry}))))
    with pytest.raises(RunError, match="shard-00000.safetensors cannot be read"):
        load_run(run.root)
    shard0.write_bytes(good)
    manifest_path.write_text(json.dumps(manifest))
    assert load_run(run.root)[0] == records


def test_float32_rows_beyond_float16_are_refused_and_changed_rows_are_copied_again(tmp_path):
    from selfjudge_vllm.offline.store import compact_features

    run = _run_with_hidden_rows(tmp_path / "run", {0: 5, 1: 5})
    assert compact_features(run)["written"] == [0, 1]
    tensors = run.read_tensors("features", 1)
    run.write_tensors("features", 1, dict(tensors, original=tensors["original"] + 1.0))  # shard 1 labelled again
    assert compact_features(run) == {"written": [1], "kept": [0]}
    tensors["original"][0, 0] = 7e4
    run.write_tensors("features", 1, tensors)
    with pytest.raises(RunError, match="shard-00001.safetensors: original holds 70000, beyond float16's range"):
        compact_features(run)
    # The older copy of shard 1 no longer stands for its float32 rows: it is unlisted, so never read.
    assert list(json.loads((run.root / "features-float16/provenance.json").read_text())["shards"]) == [
        "shard-00000.safetensors"]


def test_compact_command_converts_a_run_and_names_a_folder_without_features(tmp_path, capsys):
    from selfjudge_vllm.cli import main

    _run_with_hidden_rows(tmp_path / "run", {0: 5, 1: 5})
    assert main(["compact", "--run", str(tmp_path / "run")]) == 0
    assert "2 shard(s) written, 0 up to date" in capsys.readouterr().out
    assert main(["compact", "--run", str(tmp_path / "run")]) == 0
    assert "0 shard(s) written, 2 up to date" in capsys.readouterr().out
    assert main(["compact", "--run", str(tmp_path / "elsewhere")]) == 2
    assert "elsewhere/features missing: nothing to convert" in capsys.readouterr().err
