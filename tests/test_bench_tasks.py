"""The benchmark's task families and quality measures (no engine)."""

from __future__ import annotations

from benchmarks import tasks


def test_train_and_eval_prompts_never_overlap():
    train, evaluation = tasks.load_items("train"), tasks.load_items("eval")
    assert not {i.id for i in train} & {i.id for i in evaluation}
    assert not {i.prompt for i in train} & {i.prompt for i in evaluation}
    for family in tasks.FAMILIES:
        assert sum(i.family == family for i in evaluation) >= 40
        assert sum(i.family == family for i in train) >= 18
    # Few-shot examples are not questions of either split.
    questions = {i.id for i in train + evaluation}
    assert not {f"qa:{q}" for q, _ in tasks.SHOTS} & questions


def test_short_answer_matching():
    assert tasks.answer_correct(" Paris\nQ: What", ("Paris",))
    assert tasks.answer_correct(" paris, France.", ("Paris",))
    assert tasks.answer_correct(" 42.", ("42",))
    assert not tasks.answer_correct(" Lyon", ("Paris",))
    assert not tasks.answer_correct(" 420", ("42",))


def test_code_check_runs_the_tests_in_a_limited_subprocess():
    problem = next(i.problem for i in tasks.load_items("eval", ("code",)))
    assert tasks.code_passes(problem, problem["canonical_solution"])
    assert not tasks.code_passes(problem, "    return None\n")
    assert not tasks.code_passes(problem, "    while True:\n        pass\n", timeout_s=3)
    # Leaving early with status 0 is not a pass: the tests must have run to the end.
    assert not tasks.code_passes(problem, "    import os; os._exit(0)\n" + problem["canonical_solution"])


def test_code_check_reads_no_terminal_and_leaves_no_process_behind(tmp_path):
    """A completion that asks for input fails at once; one that starts a process and hangs
    is stopped with everything it started (the check used to kill the direct child only)."""
    import os
    import time

    problem = next(i.problem for i in tasks.load_items("eval", ("code",)))
    started = time.monotonic()
    assert not tasks.code_passes(problem, "    input()\n" + problem["canonical_solution"], timeout_s=30)
    assert time.monotonic() - started < 20
    pid_file = tmp_path / "grandchild.pid"
    spawn = (f"    import subprocess, time\n    p = subprocess.Popen(['sleep', '60'])\n"
             f"    open({str(pid_file)!r}, 'w').write(str(p.pid))\n    time.sleep(60)\n")
    assert not tasks.code_passes(problem, spawn, timeout_s=3)
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {grandchild} started by the completion survived the check")


def test_intervals():
    mean, low, high = tasks.mean_interval([1] * 90 + [0] * 10)
    assert mean == 0.9 and 0.82 < low < 0.84 and 0.94 < high < 0.96  # Wilson
    diff, dlow, dhigh = tasks.paired_difference([1, 1, 0, 1], [1, 1, 1, 1])
    assert diff == -0.25 and dlow < -0.25 < dhigh


def test_the_gemma_reports_rebuild_from_their_committed_results_unchanged(tmp_path):
    """`tradeoff.py --report-only` with no sweep on this machine (a fresh clone) rebuilds each
    report from its committed JSON, compared as its recorded command compared it: the same
    points, headlines and table."""
    import json
    import shutil
    from pathlib import Path

    from benchmarks import tradeoff

    committed = Path(__file__).resolve().parent.parent / "benchmarks/results"
    for tag in ("tradeoff", "tradeoff_hidden_head"):  # the first was compared with the second
        shutil.copy(committed / f"{tag}.json", tmp_path)
        assert tradeoff.main(["--testbed", str(tmp_path / "no-testbed"), "--report-only", "--tag", tag,
                              "--results", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
        before = json.loads((committed / f"{tag}.json").read_text())
        after = json.loads((tmp_path / f"{tag}.json").read_text())
        assert after["points"] == before["points"] and after["headlines"] == before["headlines"]
        table = (tmp_path / f"{tag}.md").read_text().replace(str(tmp_path), "benchmarks/results")
        assert table == (committed / f"{tag}.md").read_text()


def test_a_gemma_report_without_batch1_timings_says_not_measured(tmp_path):
    """A sweep run with `--batch1-items 0` has no batch-1 speeds: the report says n/a for
    them instead of failing on the missing figure."""
    import json
    from pathlib import Path

    from benchmarks import tradeoff

    report = json.loads((Path(__file__).resolve().parent.parent / "benchmarks/results/tradeoff.json").read_text())
    report["setup"]["command"] = "python benchmarks/tradeoff.py --batch1-items 0"
    report["setup"]["batch1_items"] = 0
    report["reference"]["tokens_per_s_batch1"] = None
    for row in report["points"]:
        row["tokens_per_s_batch1"] = None
    (tmp_path / "tradeoff.json").write_text(json.dumps(report))
    assert tradeoff.main(["--testbed", str(tmp_path / "no-testbed"), "--report-only", "--results", str(tmp_path),
                          "--work", str(tmp_path / "work")]) == 0
    rebuilt = json.loads((tmp_path / "tradeoff.json").read_text())
    assert all(r["tokens_per_s_batch1_vs_lossless"] is None for r in rebuilt["points"] if r["method"] != "lossless")
    assert all(r["tokens_per_s_vs_lossless"] for r in rebuilt["points"] if r["method"] != "lossless")
    assert "n/a tok/s at batch 1" in (tmp_path / "tradeoff.md").read_text()
