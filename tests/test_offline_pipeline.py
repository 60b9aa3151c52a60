"""The label/train pipeline on real vLLM engines (tiny random models)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfjudge_vllm.offline.engine import EngineSettings, engine, hidden_states
from selfjudge_vllm.offline.label import LabelSettings, run_label
from selfjudge_vllm.offline.store import COMPACT_FEATURES, RunDir, load_run
from selfjudge_vllm.offline.train import TrainSettings, train
from tests import reference
from tests.engine_helpers import PROMPTS, run_engine, spec_config

pytestmark = pytest.mark.engine

SUFFIX_LENGTHS = (0, 3, 20)  # 20 runs past the end of 12-token responses: cut windows
ENGINE = EngineSettings(dtype="float32", max_model_len=256)


# The tiny models "answer" with number words; the final answer is the last one.
NUMBER_WORDS = r"\b(one|two|three|four|five|six|seven|eight|nine|ten)\b"


def _prompt_file(path, prompts, answers=False):
    rows = [dict({"id": f"p{i}", "prompt": p}, **({"answer": "one"} if answers else {}))
            for i, p in enumerate(prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _settings(tiny_pair, prompts_path, shard_size=3, answer_pattern=None):
    target, draft = tiny_pair
    return LabelSettings(
        target=str(target), draft=str(draft), prompts=str(prompts_path),
        suffix_lengths=SUFFIX_LENGTHS, max_new_tokens=12, shard_size=shard_size, engine=ENGINE,
        answer_pattern=answer_pattern,
    )


def _long_prompts(target_dir, lengths):
    """Prompts whose token counts straddle vLLM's 128-token KV block, so some substituted
    windows reuse a cached prefix and some mismatches sit exactly on a block boundary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    words = " ".join(PROMPTS).split()
    prompts = []
    for k, length in enumerate(lengths):
        text, i = "", k
        while len(tok(text)["input_ids"]) < length:
            text = (text + " " + words[i % len(words)]).strip()
            i += 1
        prompts.append(text)
    return prompts


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp("label")
    prompts = PROMPTS[:6] + _long_prompts(tiny_pair[0], [118, 121, 124, 127])
    path = _prompt_file(root / "prompts.jsonl", prompts, answers=True)
    settings = _settings(tiny_pair, path, shard_size=4, answer_pattern=NUMBER_WORDS)
    run = run_label(settings, root / "run", progress=lambda x, **k: x)
    return run


def test_scores_equal_a_transformers_float32_reference(labelled_run, tiny_pair):
    target_dir, draft_dir = tiny_pair
    target, draft = reference.load(target_dir), reference.load(draft_dir)
    records, _, _ = load_run(labelled_run.root)
    responses = {}
    for i in range(3):  # 10 prompts in shards of 4
        for r in labelled_run.read_records("responses", i):
            responses[r["id"]] = r["prompt"] + r["response"]
    assert len(records) > 20
    worst = 0.0
    checked_cut = False
    with torch.no_grad():
        lp_y = {rid: torch.log_softmax(target(torch.tensor([y])).logits[0], -1).double()
                for rid, y in responses.items()}
        draft_top = {rid: draft(torch.tensor([y])).logits[0].argmax(-1) for rid, y in responses.items()}
        for rec in records:
            y, m, d = responses[rec["id"]], rec["m"], rec["draft"]
            assert int(draft_top[rec["id"]][m - 1]) == d  # the draft's teacher-forced top-1
            y_sub = y[:m] + [d] + y[m + 1:]
            lp_sub = torch.log_softmax(target(torch.tensor([y_sub])).logits[0], -1).double()
            for n in SUFFIX_LENGTHS:
                end = min(m + n + 1, len(y))
                checked_cut |= m + n + 1 > len(y)
                s_orig = torch.stack([lp_y[rec["id"]][i - 1, y[i]] for i in range(m, end)]).mean()
                prefix = lp_sub[m - 1, d]
                kept = [lp_sub[i - 1, y[i]] for i in range(m + 1, end)]
                best = [lp_sub[i - 1].max() for i in range(m + 1, end)]
                for mode, suffix in (("kept", kept), ("max", best)):
                    expected = float(s_orig - (prefix + sum(suffix, torch.tensor(0.0, dtype=torch.float64))) / (end - m))
                    got = rec["scores"][mode][str(n)]
                    worst = max(worst, abs(got - expected))
    assert checked_cut
    # The prefix cache served some windows, and a mismatch on a block boundary was redone.
    assert any(r["cached_prefix"] > 0 for r in records)
    assert any(r["cached_prefix"] == 0 and r["m"] % 128 == 0 and r["m"] > 0 for r in records)
    print(f"max |score - reference| = {worst:.2e} over {len(records)} mismatches")
    assert worst < 1e-3, worst


def _drafter(workdir, tiny_pair, kind: str):
    from selfjudge_vllm.testing.tiny_models import build_tiny_eagle

    if kind == "draft_model":
        return tiny_pair[1]
    return build_tiny_eagle(workdir / f"models/{kind}", tiny_pair[0], version=1 if kind == "eagle" else 3)


def _serve_and_capture(tiny_pair, head, prompt_text, what: str, kind: str = "draft_model", drafter=None):
    """Generate 20 greedy tokens (batch 1) with a reject-all head and capture, per draft row,
    what the head read (`what`: "hidden" or "evidence") and the row's verified context: the
    prompt, the tokens accepted before it and the draft tokens before it in its step.
    Returns [(row tensor, context token ids, draft token)]."""
    from vllm import LLM, SamplingParams

    target, draft = tiny_pair
    captured = []

    def capture(worker):
        runtime = worker.model_runner._selfjudge_runtime
        judge_logits = runtime.head.judge_logits

        def spy(hidden, evidence=None):
            read = hidden if what == "hidden" else evidence
            captured.append((read.clone(), runtime.pending.draft_token_ids.clone()))
            return judge_logits(hidden, evidence)

        runtime.head.judge_logits = spy

    llm = LLM(model=str(target), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              speculative_config=spec_config(kind, drafter or draft),
              additional_config={"selfjudge": {"head": str(head)}})
    try:
        llm.collective_rpc(capture)
        out = llm.generate([prompt_text], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    finally:
        del llm
    prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    rows, done = [], 1  # lossless: every step verifies from the tokens accepted so far
    for read, drafts in captured:
        drafts = drafts.tolist()
        for i, d in enumerate(drafts):
            rows.append((read[i], prompt + tokens[:done] + drafts[:i], d))
        accepted = 0
        while accepted < len(drafts) and done + accepted < len(tokens) and drafts[accepted] == tokens[done + accepted]:
            accepted += 1
        done += accepted + 1
    assert len(rows) >= 8
    return rows


@pytest.mark.parametrize("kind", ["draft_model", "eagle", "eagle3"])
def test_offline_features_equal_what_the_plugin_captures_at_serving(workdir, tiny_pair, kind):
    """Capture the hidden rows the judge scores during generation; extract the same
    positions offline with the pooling engine; compare. With EAGLE proposers too: the
    judge reads the target's hidden state at each draft's position whatever drafted it."""
    from selfjudge_vllm.testing.tiny_models import write_head

    head = write_head(workdir / "heads/capture", tiny_pair[0], torch.zeros(64), bias=-20.0)
    rows = _serve_and_capture(tiny_pair, head, PROMPTS[0], "hidden", kind, _drafter(workdir, tiny_pair, kind))
    with engine(str(tiny_pair[0]), ENGINE, pooling=True) as pool:
        offline = [h[-1] for h in hidden_states(pool, [context + [d] for _, context, d in rows])]
    diff = max(float((a.float() - b.float()).abs().max()) for (a, _, _), b in zip(rows, offline))
    print(f"max |offline - serving| feature difference = {diff:.2e} over {len(rows)} rows")
    assert diff < 1e-4, diff


def test_substituted_hidden_rows_read_after_the_cached_prefix_equal_a_full_recompute(tiny_pair):
    """The features stage encodes the original responses first, then each y[:m] + [d]
    reading y[:m] from the prefix cache: the last row must be what a full recompute gives."""
    generator = torch.Generator().manual_seed(0)
    originals = [torch.randint(10, 500, (n,), generator=generator).tolist() for n in (150, 200, 250)]
    # (sequence, m), vLLM's CPU KV block being 128 tokens: m=5 has no cached block before it
    cuts = [(0, 5), (0, 140), (1, 128), (2, 200), (2, 249)]
    substituted = [originals[s][:m] + [(originals[s][m] + 7) % 490 + 10] for s, m in cuts]
    with engine(str(tiny_pair[0]), ENGINE, pooling=True) as pool:
        hidden_states(pool, originals)
        read_after_cache = hidden_states(pool, substituted, read_prefix_cache=True)
        recomputed = hidden_states(pool, substituted)
    assert [len(h) for h in recomputed] == [len(s) for s in substituted]
    assert sum(len(h) < len(s) for h, s in zip(read_after_cache, substituted)) >= 3, "the cache was not read"
    diff = max(float((a[-1].float() - b[-1].float()).abs().max()) for a, b in zip(read_after_cache, recomputed))
    print(f"max |cached prefix - recompute| last-row difference = {diff:.2e}")
    assert diff < 1e-4, diff


@pytest.mark.parametrize("kind", ["draft_model", "eagle3"])
def test_offline_logit_features_equal_what_the_plugin_computes_at_serving(workdir, tiny_pair, kind):
    """The logit features the plugin computes for every draft row while serving (format-2
    head, reject-all so output is lossless) equal the label pipeline's, computed from vLLM's
    prompt_logprobs at the same positions."""
    from selfjudge_vllm.features import LOGIT_FEATURES
    from selfjudge_vllm.offline.engine import prompt_logprobs
    from selfjudge_vllm.offline.label import verification_evidence
    from selfjudge_vllm.testing.tiny_models import write_head

    head = write_head(workdir / "heads/capture-v2", tiny_pair[0], None, bias=-20.0,
                      scalar_weight=[0.0, 0.0, 0.0], logit_features=LOGIT_FEATURES)
    rows = _serve_and_capture(tiny_pair, head, PROMPTS[1], "evidence", kind, _drafter(workdir, tiny_pair, kind))
    # The draft token and any token after it, so entry m+1 (the row after d) exists.
    sequences = [context + [d, 0] for _, context, d in rows]
    rows = [row for row, _, _ in rows]
    with engine(str(tiny_pair[0]), ENGINE) as llm:
        logprobs = prompt_logprobs(llm, sequences)
    worst = 0.0
    for seq, lp, online in zip(sequences, logprobs, rows):
        m = len(seq) - 2
        offline = verification_evidence(lp, lp, m, len(seq))
        worst = max(worst, max(abs(offline[f] - float(online[k])) for k, f in enumerate(LOGIT_FEATURES)))
    mismatches = sum(float(r[0]) < 0 for r in rows)
    print(f"max |offline - serving| logit feature difference = {worst:.2e} over {len(rows)} rows ({mismatches} mismatches)")
    assert mismatches > 0 and worst < 1e-4, worst


def test_prompts_to_served_judge(labelled_run, tiny_pair, tmp_path):
    report = train(labelled_run.root, tmp_path / "head", TrainSettings(suffix_length=3, reject_share=0.5))
    assert report["mismatches"] > 20 and 0 < report["reject_labels"] < report["mismatches"]
    assert set(json.loads((tmp_path / "head/config.json").read_text())["operating_points"]) >= {"best_f1", "youden"}
    target, draft = tiny_pair
    result = run_engine(target, spec_config("draft_model", draft), PROMPTS, {"max_tokens": 16, "temperature": 0.0},
                        {"selfjudge": {"head": str(tmp_path / "head"), "operating_point": "best_f1"}})
    assert result.judge["draft_tokens"] == result.num_draft_tokens > 0


def test_heads_trained_from_the_float16_features_agree_with_the_float32_ones(labelled_run, tmp_path):
    """`selfjudge label` writes the float16 copy; a clone holding only it (features/ removed)
    trains heads whose held-out ROC-AUC and P(accept) on the validation mismatches are within
    0.01 of the float32 heads', with the same C, and whose report says it read float16."""
    import shutil

    import numpy as np

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.offline.train import evidence_matrix, split_by_prompt

    assert labelled_run.complete_shards(COMPACT_FEATURES, ("jsonl", "safetensors")) == [0, 1, 2]
    clone = shutil.copytree(labelled_run.root, tmp_path / "clone", ignore=shutil.ignore_patterns("features"))
    records, substituted, _ = load_run(labelled_run.root)
    is_val = split_by_prompt([r["id"] for r in records], 0.2, 0)
    evidence = evidence_matrix(records)
    rows = is_val & np.isfinite(evidence).all(1)  # the validation mismatches the heads are compared on
    for features in ("hidden", "both"):
        settings = TrainSettings(suffix_length=3, reject_share=0.5, features=features)
        full = train(labelled_run.root, tmp_path / f"{features}-32", settings)
        half = train(clone, tmp_path / f"{features}-16", settings)
        assert (full["hidden_state_precision"], half["hidden_state_precision"]) == ("float32", "float16")
        assert half["tau"] == full["tau"] and half["feature_sets"][features]["C"] == full["feature_sets"][features]["C"]
        p_accept = []
        for head in (tmp_path / f"{features}-32", tmp_path / f"{features}-16"):
            artifact = JudgeArtifact.load(head)
            logit = substituted[rows].double().numpy() @ artifact.weight.double().numpy() + float(artifact.bias)
            if artifact.scalar_weight is not None:
                logit = logit + evidence[rows] @ artifact.scalar_weight.double().numpy()
            p_accept.append(1 / (1 + np.exp(-logit)))
        auc_gap = abs(half["validation_mismatch_roc_auc"] - full["validation_mismatch_roc_auc"])
        p_gap = float(np.abs(p_accept[0] - p_accept[1]).max())
        print(f"{features}: float32 vs float16 features: validation mismatch ROC-AUC "
              f"{full['validation_mismatch_roc_auc']:.4f} vs {half['validation_mismatch_roc_auc']:.4f}, "
              f"max |P(accept) difference| {p_gap:.2e} over {int(rows.sum())} validation mismatches")
        assert auc_gap <= 0.01 and p_gap <= 0.01


def test_judge_diagnostics_agree_with_the_training_report(labelled_run, tiny_pair, tmp_path):
    """benchmarks/diagnostics/judge_diagnostics.py recomputes, from the folded artifact, what `train`
    measured with scikit-learn; its log-probability ratios come from an independent
    transformers pass."""
    from benchmarks.diagnostics import judge_diagnostics

    report = train(labelled_run.root, tmp_path / "head", TrainSettings(suffix_length=3, reject_share=0.5))
    points = json.loads((tmp_path / "head/config.json").read_text())["operating_points"]
    sweep = {"points": [{"proposer": "draft_model", "k": 3, "method": "lossless", "knob": None,
                         "mean_acceptance_length": 1.5}]
             + [{"proposer": "draft_model", "k": 3, "method": "judge", "knob": p["threshold"],
                 "mean_acceptance_length": 2.0} for p in points.values()]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    out = tmp_path / "diagnostics.json"
    diagnostics = judge_diagnostics.main(["--run", str(labelled_run.root), "--head", str(tmp_path / "head"),
                                          "--sweep", str(tmp_path / "sweep.json"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(diagnostics))
    assert diagnostics["validation_mismatches"] == report["validation_mismatches"]
    assert diagnostics["roc_auc"]["judge_head"] == pytest.approx(report["validation_mismatch_roc_auc"], abs=1e-6)
    one_row = 1 / report["validation_mismatches"]  # a row exactly at a threshold may round either way
    by_threshold = {row["threshold"]: row for row in diagnostics["thresholds"]}
    for point in points.values():
        row = by_threshold[point["threshold"]]
        assert abs(row["mismatch_accept_share"] - point["metrics"]["mismatch_accept_share"]) <= one_row + 1e-12
        assert row["acceptance_length"] == {"draft_model k=3": 2.0}
    assert 0.0 < diagnostics["roc_auc"]["draft_log_ratio"] <= 1.0
    shares = [row["mismatch_accept_share"] for row in diagnostics["top_alpha"]]
    assert shares == sorted(shares)  # smaller alpha accepts more


def _label_cli(tiny_pair, prompts, out, shard_size):
    target, draft = tiny_pair
    return [sys.executable, "-m", "selfjudge_vllm.cli", "label", "--target", str(target), "--draft", str(draft),
            "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "12", "--max-model-len", "256",
            "--shard-size", str(shard_size), "--suffix-lengths", "0,3,20", "--dtype", "float32"]


def _kill_inside_the_scores_stage(cli: list[str], env: dict, run_dir, timeout_s: float) -> int:
    """Start `selfjudge label`, SIGKILL it and everything it started once the scores stage
    has written a shard; returns how many scores shards exist then."""
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    scores_dir = Path(run_dir) / "scores"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(scores_dir.glob("shard-*.jsonl"))) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(list(scores_dir.glob("shard-*.jsonl")))


def _assert_same_run(run: RunDir, reference: RunDir, shards: int) -> None:
    """Record for record and tensor for tensor, with no temporary files left."""
    for stage in ("responses", "mismatches", "scores", "features"):
        for i in range(shards):
            assert run.read_records(stage, i) == reference.read_records(stage, i), (run.root, stage, i)
        assert not list((run.root / stage).glob(".*tmp"))
    for i in range(shards):
        a, b = run.read_tensors("features", i), reference.read_tensors("features", i)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Its float16 copy too, file for file (the digests its provenance lists).
    copies = [json.loads((r.root / COMPACT_FEATURES / "provenance.json").read_text())["shards"] for r in (run, reference)]
    assert len(copies[0]) == shards and copies[0] == copies[1]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, tiny_pair) -> RunDir:
    """An uninterrupted `selfjudge label` run of 10 prompts in 5 shards: the reference the
    killed, staged and Ray runs must equal (one engine run shared by those tests)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    prompts = _prompt_file(root / "prompts.jsonl", PROMPTS[:10])
    subprocess.run(_label_cli(tiny_pair, prompts, root / "whole", 2), env=dict(os.environ), check=True,
                   capture_output=True, timeout=600)
    return RunDir(root / "whole")


def test_killed_label_run_resumes_to_the_same_records(tmp_path, tiny_pair, uninterrupted_run):
    """Stage by stage (`--stage`, two stages per command; a stage whose inputs are missing is
    refused), with the whole command SIGKILLed inside the scores stage in between: the run
    resumes to the uninterrupted run's records. One folder: the responses and mismatches
    stages are what the killed command finds done, and the last two stages, run on their
    own, are its resumption."""
    prompts = _prompt_file(tmp_path / "prompts.jsonl", PROMPTS[:10])
    env = dict(os.environ)
    cli = _label_cli(tiny_pair, prompts, tmp_path / "run", 2)
    early = subprocess.run(cli + ["--stage", "scores"], env=env, capture_output=True, text=True, timeout=600)
    assert early.returncode == 2 and "stage 'responses' lacks shard(s) 0-4 of 5" in early.stderr
    subprocess.run(cli + ["--stage", "responses", "--stage", "mismatches"], env=env, check=True, capture_output=True,
                   timeout=600)
    # Interrupted run: SIGKILL once the scores stage has written some but not all shards.
    written = _kill_inside_the_scores_stage(cli, env, tmp_path / "run", 300)
    assert 1 <= written < 5
    subprocess.run(cli + ["--stage", "scores", "--stage", "features"], env=env, check=True, capture_output=True,
                   timeout=600)
    _assert_same_run(RunDir(tmp_path / "run"), uninterrupted_run, 5)


def test_answer_outcomes_equal_a_transformers_continuation(labelled_run, tiny_pair):
    """Each outcome is the target's greedy continuation after the substitution."""
    import re

    from transformers import AutoTokenizer

    from selfjudge_vllm.answers import pattern_answer

    target_dir, _ = tiny_pair
    target = reference.load(target_dir)
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    pattern = re.compile(NUMBER_WORDS)
    responses = {r["id"]: r for i in range(3) for r in labelled_run.read_records("responses", i)}
    outcomes = [o for i in range(3) for o in labelled_run.read_records("outcomes", i)]
    records, _, _ = load_run(labelled_run.root)
    assert len(outcomes) == len(records)
    assert any(o["unchanged"] for o in outcomes) and not all(o["unchanged"] for o in outcomes)
    for o in outcomes[::7]:
        r = responses[o["id"]]
        draft_token = next(x["draft"] for x in records if (x["id"], x["m"]) == (o["id"], o["m"]))
        ids = r["prompt"] + r["response"][: o["m"] - len(r["prompt"])] + [draft_token]
        budget = 12 - (o["m"] - len(r["prompt"])) - 1
        with torch.no_grad():
            for _ in range(max(1, budget)):
                ids.append(int(target(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:  # vLLM stops there too
                    break
        assert o["substituted_answer"] == pattern_answer(tok.decode(ids[len(r["prompt"]):]), pattern)
        assert o["original_answer"] == pattern_answer(tok.decode(r["response"]), pattern)


def test_outcomes_added_later_on_the_complete_shards_equal_those_labelled_from_the_start(labelled_run, tiny_pair,
                                                                                           tmp_path):
    """A run labelled without an answer pattern, whose scores stage lacks a shard, gets its
    outcomes later on the shards it has (`--answer-pattern --allow-partial-run`): the records
    the run labelled with the pattern from the start has."""
    import shutil

    from selfjudge_vllm.offline.store import IncompleteRunError

    late = RunDir(shutil.copytree(labelled_run.root, tmp_path / "late"))
    shutil.rmtree(late.root / "outcomes")
    (late.root / "scores/shard-00001.jsonl").unlink()
    late.write_json("run.json", dict(late.read_json("run.json"), answer_pattern=None))
    prompts = Path(late.read_json("run.json")["prompts"])
    with_pattern = _settings(tiny_pair, prompts, shard_size=4, answer_pattern=NUMBER_WORDS)
    with pytest.raises(IncompleteRunError, match="lacks shard"):
        run_label(with_pattern, late.root, progress=lambda x, **k: x, stages=("outcomes",))
    run_label(with_pattern, late.root, progress=lambda x, **k: x, stages=("outcomes",), allow_partial=True)
    assert late.read_json("run.json")["answer_pattern"] == NUMBER_WORDS
    assert late.complete_shards("outcomes", allow_partial=True) == [0, 2]
    # A rerun that leaves the pattern out goes on with the run's.
    (late.root / "outcomes/shard-00002.jsonl").unlink()
    run_label(_settings(tiny_pair, prompts, shard_size=4), late.root, progress=lambda x, **k: x,
              stages=("outcomes",), allow_partial=True)
    assert late.complete_shards("outcomes", allow_partial=True) == [0, 2]
    for i in (0, 2):
        assert late.read_records("outcomes", i) == labelled_run.read_records("outcomes", i)


def test_train_with_tau_calibrated_on_answers(labelled_run, tmp_path):
    report = train(labelled_run.root, tmp_path / "head", TrainSettings(suffix_length=3, tau_from_answers=True))
    calibration = report["tau_calibration"]
    assert calibration["mismatches"] > 0 and 0 <= calibration["balanced_accuracy"] <= 1
    # The run has answer outcomes, so the artifact names operating points by answer-change budget.
    points = json.loads((tmp_path / "head/config.json").read_text())["operating_points"]
    budgets = [points[f"estimated_changes_{b}pct"] for b in (1, 2, 5)]
    assert [p["threshold"] for p in budgets] == sorted((p["threshold"] for p in budgets), reverse=True)
    assert all(p["metrics"]["estimated_response_change_share"] <= b / 100 for p, b in zip(budgets, (1, 2, 5)))


@pytest.fixture(scope="module")
def readme_pair(workdir):
    """Tiny models with the 2048 positions the README's default context (--max-model-len) needs."""
    from selfjudge_vllm.testing.tiny_models import build_target_and_draft

    return build_target_and_draft(workdir / "models-2048", max_positions=2048)


def _user_env() -> dict:
    """A user's shell: none of the engine settings the test suite sets for itself."""
    return {k: v for k, v in os.environ.items()
            if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND")}


def test_readme_label_command_runs_as_written_with_the_engine_variables_unset(tmp_path, readme_pair):
    """README: `selfjudge label --target ... --draft ... --prompts prompts.jsonl --out runs/r1
    --max-new-tokens 128`, nothing else: the CPU defaults (bounded KV cache, float32 without
    native bf16) let it start and finish, and the log says which defaults it chose."""
    target, draft = readme_pair
    # One prompt: the command is the README's; what is in the user's prompt file is not (each
    # prompt's 128 tokens from random tiny models are mismatches by the dozen, each scored).
    prompts = _prompt_file(tmp_path / "prompts.jsonl", PROMPTS[:1])
    selfjudge = str(Path(sys.executable).parent / "selfjudge")
    proc = subprocess.run([selfjudge, "label", "--target", str(target), "--draft", str(draft), "--prompts", str(prompts),
                           "--out", str(tmp_path / "runs/r1"), "--max-new-tokens", "128"],
                          env=_user_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selfjudge: CPU: KV cache bounded to" in proc.stderr
    run = RunDir(tmp_path / "runs/r1")
    assert run.complete_shards("features", ("jsonl", "safetensors")) == [0]


def test_an_engine_that_cannot_start_is_reported_in_selfjudge_terms(tmp_path, readme_pair):
    target, draft = readme_pair
    prompts = _prompt_file(tmp_path / "prompts.jsonl", PROMPTS[:1])
    # The suite's one-process engine mode (one interpreter, not three): the message is built
    # from whatever vLLM raised, the same in either mode; the README test runs the user's mode.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    proc = subprocess.run([sys.executable, "-m", "selfjudge_vllm.cli", "label", "--target", str(target),
                           "--draft", str(draft), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
                           "--kv-cache-gib", "100000"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("selfjudge label:")]
    assert len(ours) == 1 and "vLLM could not start an engine for" in ours[0] and "100000 GiB: --kv-cache-gib" in ours[0]


def test_label_on_local_ray_equals_a_local_run_and_resumes_after_a_kill(tmp_path, tiny_pair, uninterrupted_run):
    """`selfjudge label --ray` on a local Ray (2 tasks per stage, each with its own engine)
    writes the same run, record for record and tensor for tensor, as a run here; killed in
    the scores stage and run again on Ray, it loses and duplicates nothing."""
    prompts = _prompt_file(tmp_path / "prompts.jsonl", PROMPTS[:10])
    # Ray kills tasks when the whole node is above 95% memory, which a shared test machine can
    # be while the tiny engines need little: its memory monitor is off for this test.
    env = dict(os.environ, RAY_memory_monitor_refresh_ms="0")
    ray_cli = _label_cli(tiny_pair, prompts, tmp_path / "ray", 2) + ["--ray", "--ray-workers", "2"]
    # The driver, its local Ray and every task are killed.
    assert 1 <= _kill_inside_the_scores_stage(ray_cli, env, tmp_path / "ray", 400) < 5
    done = subprocess.run(ray_cli, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(ray, 2 tasks)" in done.stderr
    _assert_same_run(RunDir(tmp_path / "ray"), uninterrupted_run, 5)
