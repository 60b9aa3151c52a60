"""`selfjudge calibrate`: its guarantee by simulation through the command's own pairing code,
its input errors, and (marked `server`) the whole command on tiny models: lossless is
certified where an accept-all judge is not, fixed-sequence testing stops at the first failure,
a certified judge point lands in a head the server can serve by name, a rerun at another
budget is exploratory, and a run killed with SIGKILL continues to the same report."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from selfjudge_vllm import calibrate, certify
from selfjudge_vllm.answers import AnswerKind
from selfjudge_vllm.cli import main

DELTA = 0.05


def _simulated_responses(rng, n, measure, risk):
    """(candidate, lossless) responses of n paired items, each changed with probability `risk`;
    under answer_changes every candidate text differs too, so only answers count."""
    mine, base = {}, {}
    for i in range(n):
        changed = rng.random() < risk
        filler = "y" if measure == "answer_changes" else ""
        base[str(i)] = {"text": "#### 1"}
        mine[str(i)] = {"text": f"{filler}#### {2 if changed else 1}"}
    return mine, base


def _certifies(rng, n, measure, risk, budget, runs):
    answer = AnswerKind("numeric")
    rows = {str(i): {"id": str(i), "answer": "1"} for i in range(n)}
    count = 0
    for _ in range(runs):
        judgement = calibrate.Judgement(answer, rows)
        mine, base = _simulated_responses(rng, n, measure, risk)
        result = calibrate.paired_risk(judgement, measure, mine, base, list(rows))
        count += result.p_value(measure, budget, DELTA) <= DELTA
    return count / runs


@pytest.mark.parametrize("measure", ["text_changes", "answer_changes"])
def test_a_change_measure_at_the_budget_certifies_at_most_delta(measure):
    rng = np.random.default_rng(1)
    runs, budget = 2000, 0.05
    at_budget = _certifies(rng, 300, measure, budget, budget, runs)
    assert at_budget <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / runs), at_budget
    assert _certifies(rng, 600, measure, budget / 3, budget, 200) > 0.9


def test_accuracy_at_the_budget_certifies_at_most_delta():
    """Each paired item is lost (right -> wrong) with P = g + B, gained with P = g, else right
    both ways: the true accuracy lost is B exactly."""
    rng = np.random.default_rng(2)
    budget, n, runs = 0.05, 200, 400
    answer = AnswerKind("numeric")

    def share(risk, gained_p, items, count):
        hits = 0
        for _ in range(count):
            u = rng.random(items)
            # per item: lost (right -> wrong), gained (wrong -> right), or unchanged (right both)
            outcome = np.where(u < gained_p + risk, "lost", np.where(u < 2 * gained_p + risk, "gained", "same"))
            base = {str(i): {"text": "#### 2" if o == "gained" else "#### 1"} for i, o in enumerate(outcome)}
            mine = {str(i): {"text": "#### 2" if o == "lost" else "#### 1"} for i, o in enumerate(outcome)}
            local_rows = {str(i): {"id": str(i), "answer": "1"} for i in range(items)}
            result = calibrate.paired_risk(calibrate.Judgement(answer, local_rows), "accuracy", mine, base,
                                           list(local_rows))
            assert result.lost - result.gained == int((outcome == "lost").sum() - (outcome == "gained").sum())
            hits += result.p_value("accuracy", budget, DELTA) <= DELTA
        return hits / count

    at_budget = share(budget, 0.03, n, runs)
    assert at_budget <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / runs), at_budget
    assert share(budget / 3, 0.0, 800, 40) > 0.9


def test_paired_risk_counts_each_measure_on_the_items_both_have():
    answer = AnswerKind("numeric")
    rows = {i: {"id": i, "answer": "1"} for i in "abcd"}
    base = {"a": {"text": "#### 1"}, "b": {"text": "#### 1"}, "c": {"text": "#### 2"}, "d": {"text": "#### 1"}}
    mine = {"a": {"text": "so #### 1"}, "b": {"text": "#### 3"}, "c": {"text": "#### 1"}}  # d not served
    j = calibrate.Judgement(answer, rows)
    text = calibrate.paired_risk(j, "text_changes", mine, base, list(rows))
    answers = calibrate.paired_risk(j, "answer_changes", mine, base, list(rows))
    accuracy = calibrate.paired_risk(j, "accuracy", mine, base, list(rows))
    assert (text.n, text.changes) == (3, 3)
    assert (answers.n, answers.changes) == (3, 2)
    assert (accuracy.lost, accuracy.gained, accuracy.observed("accuracy")) == (1, 1, 0.0)


def test_early_stop_only_once_certification_is_ruled_out():
    """The largest certifiable count is exact: one more change fails, it passes."""
    for n, budget, level in ((300, 0.05, 0.025), (40, 0.2, 0.05), (10, 0.01, 0.05)):
        most = calibrate.largest_certifiable_count(n, budget, level)
        if most >= 0:
            assert certify.binomial_p_value(most, n, budget) <= level
        assert certify.binomial_p_value(most + 1, n, budget) > level


def test_the_largest_certifiable_loss_is_exact():
    """One more item lost fails, the count passes; more gains allow more losses."""
    for n, budget, level, gained in ((344, 0.02, 0.0125, 11), (344, 0.05, 0.0125, 0), (60, 0.01, 0.05, 0)):
        most = calibrate.largest_certifiable_loss(n, budget, level, gained)
        if most >= 0:
            assert certify.p_value("accuracy", n, budget, lost=most, gained=gained, level=level) <= level
        assert certify.p_value("accuracy", n, budget, lost=most + 1, gained=gained, level=level) > level
    assert calibrate.largest_certifiable_loss(344, 0.05, 0.0125, 11) > calibrate.largest_certifiable_loss(
        344, 0.05, 0.0125, 0)


@pytest.mark.parametrize("measure", ["answer_changes", "accuracy"])
def test_the_prompts_a_budget_needs_are_exact(measure):
    """The fewest calibration prompts on which a point that changes nothing certifies: one
    fewer does not (at 1% and level 0.05 / 4 rules: 437 for a change measure)."""
    for budget, level in ((0.01, 0.0125), (0.02, 0.05), (0.05, 0.025)):
        n = calibrate.prompts_for_zero_risk(measure, budget, level)
        assert calibrate.zero_risk_certifies(measure, n, budget, level)
        assert not calibrate.zero_risk_certifies(measure, n - 1, budget, level)
    assert measure != "answer_changes" or calibrate.prompts_for_zero_risk(measure, 0.01, 0.0125) == 437


def test_confidence_above_99_9_percent_still_certifies_accuracy():
    """With gamma fixed at 0.001 a level at or below it could never certify accuracy, and the
    search for the prompts it needs doubled n until scipy failed (TypeError). Now: a finite,
    exact count."""
    for budget, level in ((0.02, 0.0005), (0.05, 0.001)):
        n = calibrate.prompts_for_zero_risk("accuracy", budget, level)
        assert calibrate.zero_risk_certifies("accuracy", n, budget, level)
        assert not calibrate.zero_risk_certifies("accuracy", n - 1, budget, level)
    assert calibrate.largest_certifiable_loss(2000, 0.05, 0.001) > 0


def test_calibrate_at_confidence_0_999_says_what_accuracy_needs(tmp_path, capsys, monkeypatch):
    """`--confidence 0.999 --measure accuracy`: a clear message before serving (how many
    prompts it takes), not a traceback; the engine is not started here."""
    def no_engine(self):
        raise RuntimeError("no engine in this test")

    monkeypatch.setattr(calibrate.Session, "get", no_engine)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "a", "answer": "1"}) + "\n" for i in range(20)))
    # the default rules (three without a head): each tested at 0.001 / 3
    argv = _args(tmp_path, prompts, **{"--confidence": "0.999", "--measure": "accuracy", "--answer": "numeric",
                                       "--budget": "0.02"})
    assert main(argv) == calibrate.EXIT_FAILED
    said = capsys.readouterr()
    assert "not even a point that changes nothing can be certified within 2%" in said.out
    assert "no engine in this test" in said.err


def test_an_unreachable_budget_is_said_before_serving(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    settings = calibrate.CalibrateSettings(target="t", speculative_config={"method": "ngram"}, prompts=prompts,
                                           out=tmp_path, measure="accuracy", budget=0.01, test_share=0.3)
    reach = calibrate.resolution(settings, 344, 0.0125)
    assert not reach["zero_risk_certifies"] and reach["prompts_needed_for_zero_risk"] > 437
    assert "not even a point that changes nothing can be certified within 1% (only one that gains" in reach["note"]
    assert calibrate.resolution(settings, reach["prompts_needed_for_zero_risk"], 0.0125)["note"] is None


def test_the_upper_bound_is_the_smallest_budget_that_certifies():
    for measure, kw in (("answer_changes", {"changes": 7}), ("accuracy", {"lost": 9, "gained": 3})):
        bound = certify.risk_upper_bound(measure, 200, 0.025, **kw)
        assert (certify.p_value(measure, 200, bound + 1e-4, **kw, level=0.025) <= 0.025
                < certify.p_value(measure, 200, bound - 1e-3, **kw, level=0.025))


def test_split_is_seeded_by_prompt_and_stable():
    ids = [f"p{i}" for i in range(2000)]
    cal, test = calibrate.split_ids(ids, 0.3, seed=0)
    assert abs(len(test) / len(ids) - 0.3) < 0.04 and set(cal) | set(test) == set(ids) and not set(cal) & set(test)
    # a prompt's side does not depend on the other prompts; another seed splits otherwise
    assert calibrate.split_ids(ids[:100], 0.3, seed=0)[1] == [i for i in test if i in set(ids[:100])]
    assert calibrate.split_ids(ids, 0.3, seed=1)[1] != test


def test_the_engine_serves_every_candidate_rule_and_needs_a_head_only_for_the_judge(tmp_path):
    from selfjudge_vllm.config import parse_section

    settings = calibrate.CalibrateSettings(target="t", speculative_config={"method": "ngram"}, prompts=tmp_path,
                                           out=tmp_path, measure="text_changes", budget=0.05, dtype="float32")
    command, _ = calibrate.server_command(settings, 8000)
    section = json.loads(command[command.index("--additional-config") + 1])
    config = parse_section(section)  # valid without a head: the judge is not offered
    assert "judge" not in config.rules and set(config.rules) == {"top_alpha", "entropy", "fly"}


def test_server_settings_reach_the_engine_the_binding_and_the_served_config(tmp_path):
    """What the operator serves under (--selfjudge-config) is what calibrate served under: it
    goes into the engine's section, binds the folder, and the printed config carries it."""
    from selfjudge_vllm.config import parse_section

    given = {"scope": "reasoning", "reasoning_end_token_id": 7, "fly_window": 4}
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    settings = calibrate.CalibrateSettings(target="t", speculative_config={"method": "ngram"}, prompts=prompts,
                                           out=tmp_path, measure="text_changes", budget=0.05, dtype="float32",
                                           selfjudge_settings=given)
    calibrate.check_settings(settings)
    command, _ = calibrate.server_command(settings, 8000)
    config = parse_section(json.loads(command[command.index("--additional-config") + 1]))
    assert (config.scope, config.reasoning_end_token_id, config.fly_window) == ("reasoning", 7, 4)
    served = calibrate.served_config("fly", 0.6, None, None, given)
    assert served == {"selfjudge": {"rule": "fly", "fly_threshold": 0.6, **given}}
    assert parse_section(served).fly_window == 4
    assert calibrate.served_config(None, None, None, None, given) == {"selfjudge": {"enabled": False}}
    assert calibrate.bound_settings(settings)["selfjudge_settings"] == given
    plain = calibrate.CalibrateSettings(target="t", speculative_config={"method": "ngram"}, prompts=prompts,
                                        out=tmp_path, measure="text_changes", budget=0.05)
    assert calibrate.bound_settings(plain)["selfjudge_settings"] is None  # as folders written before the option


class _Servers:
    """server_process.Server's stand-in: records each command and log; `fail` makes the
    server whose --served-model-name it is fail to start, as vLLM's out-of-memory does."""

    def __init__(self, fail=None):
        self.started, self.fail = [], fail

    def __call__(self, command, log_path, startup_timeout=240.0, env=None):
        self.started.append((command, str(log_path)))
        if command[command.index("--served-model-name") + 1] == self.fail:
            raise RuntimeError("server exited with 1:\ntorch.OutOfMemoryError: CUDA out of memory")
        return types.SimpleNamespace(base="http://127.0.0.1:1", stop=lambda: None)


def _judge_settings(tmp_path, **over):
    base = dict(target="t", speculative_config={"method": "ngram"}, prompts=tmp_path / "p.jsonl", out=tmp_path / "o",
                measure="judged_loss", budget=0.05, scorer_model="judge-model")
    return calibrate.CalibrateSettings(**{**base, **over})


def test_a_judge_model_beside_the_target_gets_a_gpu_share_and_the_target_is_told_to_leave_room(monkeypatch, tmp_path):
    """--scorer-model on a GPU: the judge's `vllm serve` starts while calibrate's engine is up,
    so it gets SCORER_GPU_SHARE of the GPU's memory, and when --vllm-args leaves the target
    vLLM's default 0.9 calibrate says the target needs room (a CPU machine: neither)."""
    from selfjudge_vllm import meaning, server_process

    servers = _Servers()
    monkeypatch.setattr(server_process, "Server", servers)
    monkeypatch.setattr(meaning.LLMJudgeClient, "__init__", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(calibrate, "_has_cuda", lambda: True)
    (tmp_path / "o").mkdir()
    settings = _judge_settings(tmp_path)
    session = calibrate.Session(settings)
    session.get()
    calibrate.ScorerSession(settings, session).client()
    (target, target_log), (judge, judge_log) = servers.started
    share = judge.index("--gpu-memory-utilization")
    assert judge[share + 1] == "0.2" == f"{calibrate.SCORER_GPU_SHARE:g}" and judge_log.endswith("scorer-server.log")
    assert "--gpu-memory-utilization" not in target and target_log.endswith("/server.log")
    note = calibrate.judge_memory_note(settings)
    assert '--vllm-args="--gpu-memory-utilization 0.7"' in note and "judge-model" in note
    for args in (("--gpu-memory-utilization", "0.7"), ("--gpu-memory-utilization=0.7",)):
        assert calibrate.judge_memory_note(_judge_settings(tmp_path, vllm_args=args)) is None
    assert calibrate.judge_memory_note(_judge_settings(tmp_path, scorer_model=None)) is None  # the target judges
    monkeypatch.setattr(calibrate, "_has_cuda", lambda: False)
    assert calibrate.judge_memory_note(settings) is None
    servers.started.clear()
    calibrate.ScorerSession(settings, session).client()
    assert "--gpu-memory-utilization" not in servers.started[0][0]


def test_a_judge_server_that_fails_to_start_is_reported_with_its_own_log(monkeypatch, tmp_path, capsys):
    """The judge model's server fails (out of GPU memory beside the target): calibrate says so
    before serving, and the error names OUT/scorer-server.log and what to do, not the
    target's OUT/server.log."""
    from selfjudge_vllm import server_process
    from tests import simulated_engine as sim

    monkeypatch.setattr(server_process, "Server", _Servers(fail="judge"))
    monkeypatch.setattr(calibrate, "_has_cuda", lambda: True)
    sim.SimulatedEngine({("top_alpha", 0.5): 0.3}, seed=0).install(monkeypatch)
    prompts = sim.write_prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "out"
    argv = _args(tmp_path, prompts, **{"--measure": "judged_loss", "--scorer-model": "judge-model",
                                       "--rules": "top_alpha", "--grid": "top_alpha=0.5", "--test-share": "0"})
    assert main(argv) == calibrate.EXIT_FAILED
    captured = capsys.readouterr()
    assert "calibrate: warning: the judge model judge-model is served on this GPU beside the target" in captured.out
    assert (f"the judge model's vllm serve (judge-model) did not start; its log is {out / 'scorer-server.log'}"
            in captured.err)
    assert '--gpu-memory-utilization 0.7' in captured.err and "CUDA out of memory" in captured.err
    assert str(out / "server.log") not in captured.err


def test_the_operating_point_name_and_served_configs():
    assert calibrate.operating_point_name("accuracy", 0.02) == "certified_accuracy_2pct"
    assert calibrate.operating_point_name("text_changes", 0.025) == "certified_text_changes_2p5pct"
    assert calibrate.served_config(None, None, None, None) == {"selfjudge": {"enabled": False}}
    assert calibrate.served_config("fly", 0.3, None, None) == {"selfjudge": {"rule": "fly", "fly_threshold": 0.3}}


def _args(tmp_path, prompts, **over):
    base = {"--target": str(tmp_path / "no-model"), "--speculative-config": '{"method": "ngram", '
            '"num_speculative_tokens": 4}', "--prompts": str(prompts), "--out": str(tmp_path / "out"),
            "--measure": "text_changes", "--budget": "0.05"}
    base.update(over)
    argv = ["calibrate"]
    for k, v in base.items():
        if v is not None:
            argv += [k, v]
    return argv


@pytest.mark.parametrize("over, lines, message", [
    ({"--budget": "1.5"}, None, "--budget must lie strictly between 0 and 1"),
    ({"--budget": "0"}, None, "--budget must lie strictly between 0 and 1"),
    ({"--measure": "accuracy"}, None, "needs answers: give --answer numeric"),
    ({"--measure": "accuracy", "--answer": "numeric"}, ['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'],
     "needs 'answer' in every prompt; 1 of 2 lack it"),
    ({}, ['{"prompt": "a"}', "not json"], "not valid JSON"),
    ({"--rules": "judge"}, None, "the judge family needs --head"),
    ({"--grid": "top_alpha=0.2,0.5"}, None, "strictest (largest) first"),
    ({"--grid": "fly=0.31234567,0.3123456"}, None, "0.31234567 has more significant digits than a point's key"),
    ({"--answer": "pattern", "--answer-pattern": "("}, None, "not a valid regex"),
    ({"--speculative-config": "{"}, None, "--speculative-config is not valid JSON"),
    ({"--confidence": "1"}, None, "--confidence must lie strictly between 0 and 1"),
    ({"--selfjudge-config": "["}, None, "--selfjudge-config is not valid JSON"),
    ({"--selfjudge-config": '{"rule": "judge", "threshold": 0.1}'}, None, "not rule, threshold (calibrate chooses"),
    ({"--selfjudge-config": '{"fly_window": 0}'}, None, "--selfjudge-config: invalid --additional-config"),
    ({"--selfjudge-config": '["scope"]'}, None, "--selfjudge-config must be a JSON object"),
])
def test_bad_input_is_refused_before_any_engine_starts(tmp_path, capsys, over, lines, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines or ['{"prompt": "a"}', '{"prompt": "b"}']) + "\n")
    assert main(_args(tmp_path, prompts, **over)) == calibrate.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "store").exists()


def test_an_unknown_measure_is_refused(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit):
        main(_args(tmp_path, prompts, **{"--measure": "speed"}))
    assert "invalid choice: 'speed'" in capsys.readouterr().err


def test_a_folder_served_with_other_settings_is_refused(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "settings.json").write_text(json.dumps({"target": "other"}))
    assert main(_args(tmp_path, prompts)) == calibrate.EXIT_BAD_INPUT
    assert "holds responses served with other settings (target" in capsys.readouterr().err


# -- the command on tiny models ------------------------------------------------------------------------


def _calibrate_argv(target, draft, head, prompts, out, budget, grid="0.9,0.1"):
    from tests.engine_helpers import CALIBRATE_TEST_DTYPE, spec_config

    return ["--target", str(target), "--speculative-config", json.dumps(spec_config("draft_model", draft)),
            "--prompts", str(prompts), "--out", str(out), "--head", str(head), "--rules", "judge",
            "--grid", f"judge={grid}", "--measure", "text_changes", "--budget", str(budget), "--test-share", "0.25",
            "--max-tokens", "16", "--max-model-len", "256", "--concurrency", "8", *CALIBRATE_TEST_DTYPE]


@pytest.mark.server
@pytest.mark.timeout(1800)
def test_calibrate_certifies_lossless_not_an_accept_all_judge_and_resumes_after_kill(tiny_pair, workdir, tmp_path):
    """The head scores every draft token 0.5: at threshold 0.9 it accepts nothing beyond
    standard verification (texts equal lossless), at 0.1 everything (an accept-all judge).
    The first run is killed while serving and rerun: the rerun's decisions are the ones an
    uninterrupted run must take, with nothing lost and nothing served twice. (The engines run
    in vLLM's one-process worker mode, as the suite's others; a server in the default
    multiprocess mode is tested in test_server.py, test_guard.py and test_load.py.)"""
    import torch

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.testing.load import make_requests
    from selfjudge_vllm.testing.tiny_models import write_head

    target, draft = tiny_pair
    head = write_head(workdir / "heads/calibrate_half", target, torch.zeros(64), bias=0.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": r["prompt"]}) + "\n"
                               for i, r in enumerate(make_requests(32, seed=5))))
    calibration_ids, test_ids = calibrate.split_ids([f"q{i}" for i in range(32)], 0.25, seed=0)
    out = tmp_path / "cal"
    command = [sys.executable, "-m", "selfjudge_vllm.cli", "calibrate"]

    # 20% budget, killed with SIGKILL (the command and its engine) while serving, then rerun.
    child = subprocess.Popen(command + _calibrate_argv(target, draft, head, prompts, out, 0.2),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    requests = out / "store/requests.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and child.poll() is None:
        if requests.is_file() and len(requests.read_text().splitlines()) >= 12:
            break
        time.sleep(0.2)
    assert child.poll() is None, "the run ended before it could be killed"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert 12 <= len(requests.read_text().splitlines()) < 32  # killed inside the lossless responses
    loose = subprocess.run(command + _calibrate_argv(target, draft, head, prompts, out, 0.2),
                           capture_output=True, text=True, timeout=900)
    assert loose.returncode == calibrate.EXIT_RELAXED_CERTIFIED, loose.stdout + loose.stderr
    report = json.loads((out / "report.json").read_text())
    # The strict point is certified, the accept-all one changes most texts and is not: the
    # decisions of an uninterrupted run (every calibration prompt, no change, the exact
    # binomial p-value of 0 changes), its test part as well.
    strict, accept_all = report["points"]
    assert (strict["key"], strict["n"], strict["changes"], strict["certified"]) == (
        "judge-0.9", len(calibration_ids), 0, True)
    assert strict["p_value"] == pytest.approx(0.8 ** len(calibration_ids), rel=1e-9)
    assert strict["test"] == {"n": len(test_ids), "changes": 0, "lost": 0, "gained": 0, "observed_risk": 0.0}
    assert not accept_all["certified"] and accept_all["changes"] > 0.5 * accept_all["n"]
    assert report["certified"]["key"] == "judge-0.9"
    stored = [json.loads(line) for line in requests.read_text().splitlines()]
    served = {key: {r["id"] for r in stored if r["point"] == key} for key in {r["point"] for r in stored}}
    assert len({(r["point"], r["id"]) for r in stored}) == len(stored)  # nothing served twice
    assert (served["lossless"], served["judge-0.9"]) == (set(calibration_ids) | set(test_ids),) * 2  # nothing lost
    assert len(served["judge-0.1"]) == accept_all["n"]
    # Lossless's acceptance is known on the calibration prompts (its counters never mix them
    # with the test prompts, nor count the responses of the killed run twice), so the
    # certified point's speed-up is stated.
    assert report["lossless"]["mean_acceptance_length"] > 1.0
    assert report["certified"]["acceptance_vs_lossless"] == pytest.approx(
        strict["mean_acceptance_length"] / report["lossless"]["mean_acceptance_length"])
    name = "certified_text_changes_20pct"
    assert report["serve_with"]["selfjudge"]["operating_point"] == name
    certified_head = JudgeArtifact.load(out / "head")
    point = certified_head.config.operating_points[name]
    assert point.threshold == 0.9 and point.evidence["n"] == strict["n"] and point.evidence["changes"] == 0
    assert certified_head.resolve_threshold(None, name) == 0.9  # what the server resolves the name to
    inspect = subprocess.run([sys.executable, "-m", "selfjudge_vllm.cli", "inspect", str(out / "head")],
                             capture_output=True, text=True, timeout=120)
    assert f"operating point {name}" in inspect.stdout and "evidence prompts_sha256" in inspect.stdout

    # 1%, same folder: the certificate of this folder was computed at 20%, so this run is
    # exploratory and certifies nothing; it serves nothing (the strict point is stored and
    # fails at 1%, so fixed-sequence testing stops there) and keeps the certificate's report.
    certificate = (out / "report.json").read_text()
    tight = subprocess.run(command + _calibrate_argv(target, draft, head, prompts, out, 0.01),
                           capture_output=True, text=True, timeout=900)
    assert tight.returncode == calibrate.EXIT_EXPLORATORY, tight.stdout + tight.stderr
    explored = json.loads((out / "exploratory.json").read_text())
    assert explored["verdict"].startswith("exploratory, nothing certified") and explored["certified"] is None
    assert "budget (0.2 -> 0.01)" in explored["verdict"] and "exploratory" in tight.stdout
    assert [p["key"] for p in explored["points"]] == ["judge-0.9"] and explored["points"][0]["changes"] == 0
    assert explored["serve_with"] == {"selfjudge": {"enabled": False}}
    assert (out / "exploratory.png").stat().st_size > 0 and (out / "report.json").read_text() == certificate
    # said before serving, and in the report: 1% is out of reach on these few prompts
    assert "not even a point that changes nothing can be certified within 1%" in tight.stderr + tight.stdout
    assert explored["resolution"]["prompts_needed_for_zero_risk"] == 299  # one family at level 0.05
    assert [json.loads(line) for line in requests.read_text().splitlines()] == stored  # served nothing


@pytest.mark.server
@pytest.mark.timeout(1200)
def test_a_certificate_holds_for_the_scope_it_was_served_under(tiny_pair, workdir, tmp_path):
    """The accept-all judge of the test above changes most texts when it relaxes everywhere.
    Served with relaxation inside reasoning only, where the span opens at a token that ends
    every response (end of sequence: no response is inside it), it relaxes nothing: calibrate
    serves that policy end to end, certifies it, and the printed config and the certified
    head's evidence carry the scope, which is the only condition the certificate holds under."""
    import torch

    from selfjudge_vllm.artifact import JudgeArtifact
    from selfjudge_vllm.testing.load import make_requests
    from selfjudge_vllm.testing.tiny_models import write_head

    target, draft = tiny_pair
    head = write_head(workdir / "heads/calibrate_half", target, torch.zeros(64), bias=0.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": r["prompt"]}) + "\n"
                               for i, r in enumerate(make_requests(32, seed=5))))
    scope = {"scope": "reasoning", "reasoning_start_token_id": 1, "reasoning_end_token_id": 2}  # 1: </s>
    out = tmp_path / "cal"
    run = subprocess.run([sys.executable, "-m", "selfjudge_vllm.cli", "calibrate",
                          *_calibrate_argv(target, draft, head, prompts, out, 0.2, "0.1"),
                          "--selfjudge-config", json.dumps(scope)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == calibrate.EXIT_RELAXED_CERTIFIED, run.stdout + run.stderr
    report = json.loads((out / "report.json").read_text())
    (accept_all,) = report["points"]
    assert accept_all["key"] == "judge-0.1" and accept_all["n"] > 16  # the calibration part of 32
    assert accept_all["changes"] == 0 and accept_all["certified"]
    assert accept_all["test"]["observed_risk"] == 0.0
    name = "certified_text_changes_20pct"
    assert report["serve_with"] == {"selfjudge": {"head": str(out / "head"), "rule": "judge",
                                                "operating_point": name, **scope}}
    point = JudgeArtifact.load(out / "head").config.operating_points[name]
    assert point.threshold == 0.1 and point.evidence["selfjudge_settings"] == scope
