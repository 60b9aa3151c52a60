"""The figures the docs quote are the committed results files' figures."""
from __future__ import annotations

from pathlib import Path

from benchmarks import docs_sync


def test_the_docs_blocks_equal_what_the_results_files_give():
    wanted = docs_sync.blocks()
    files = {path: path.read_text() for path, _ in wanted}
    assert docs_sync.stale(files, wanted) == [], "run: python -m benchmarks.docs_sync"


def test_sync_rewrites_only_the_stale_block():
    page = Path("page.md")
    text = ("intro\n<!-- a:begin (made) -->\nold\n<!-- a:end -->\nmiddle\n"
            "<!-- b:begin -->\nkept\n<!-- b:end -->\nend\n")
    wanted = {(page, "a"): "new\n", (page, "b"): "kept\n"}
    assert docs_sync.stale({page: text}, wanted) == ["page.md: block a differs from what the results files give"]
    synced = docs_sync.sync({page: text}, wanted)[page]
    assert synced == text.replace("\nold\n", "\nnew\n")
    assert docs_sync.stale({page: synced}, wanted) == []
    assert docs_sync.stale({page: "no blocks\n"}, {(page, "a"): "x\n"}) == ["page.md: no a block"]


def test_the_readme_table_reads_each_figure_from_the_report():
    report = {
        "setup": {"held_out_items": 344},
        "points": [dict(key=key, proposer=key.split("-k")[0], k=int(key.split("-k")[1].split("/")[0]), n=400,
                        method=key.split("/")[1].rsplit("-", 1)[0], knob=float(key.rsplit("-", 1)[1]),
                        stopped_early=None, changes=3, acceptance_length_vs_lossless=1.234,
                        held_out_accuracy_change=-0.0125, held_out_accuracy_change_lower95=-0.031)
                   for key, _ in docs_sync.README_ROWS],
        "certified": [{"proposer": "ngram", "k": 8, "measure": "accuracy", "budget": 0.02,
                       "families": {"training_free": {"certified": "ngram-k8/entropy-3.0", "upper_bound": 0.0168}}}],
        "test_points": [{"key": "ngram-k8/lossless", "method": "lossless", "n": 300},
                        {"key": "ngram-k8/entropy-3.0", "method": "entropy", "n": 300, "paired_n": 300,
                         "changes": 2, "change_rate": 2 / 300, "accuracy_change": 0.0,
                         "acceptance_length_vs_lossless": 1.0123}],
    }
    table = docs_sync.readme_results(report)
    assert ("| `ngram` k=8 | `entropy` 3.0 | 1.23x | 3 | -1.25% (-3.10%) | 2% (bound 1.68%) "
            "| 1.01x; 2 (0.67%); +0.00% |") in table
    assert "| `ngram` k=4 | `entropy` 3.0 | 1.23x | 3 | -1.25% (-3.10%) | no | - |" in table  # not certified: not planned
    assert "on 300 test items" in table and "on the 344 held-out items" in table


def test_a_benchmark_not_run_yet_has_a_block_that_says_so(tmp_path):
    """The chat benchmark's blocks before its first run: rendered from the absence of its
    results, so `docs_sync --check` holds now and fails once the report is written."""
    wanted = docs_sync.chat_meaning_blocks(tmp_path)
    assert set(name for _, name in wanted) == {"chat_meaning", "chat_results"}
    assert all("has not been run yet" in body for body in wanted.values())
    page = Path("README.md")
    text = "<!-- chat_results:begin -->\nold\n<!-- chat_results:end -->\n"
    readme = {(page, "chat_results"): wanted[(docs_sync.ROOT / "README.md", "chat_results")]}
    assert docs_sync.stale({page: docs_sync.sync({page: text}, readme)[page]}, readme) == []
    (tmp_path / "chat_meaning").mkdir()
    (tmp_path / "chat_meaning" / "report.md").write_text("# the report\n")
    assert docs_sync.chat_meaning_blocks(tmp_path)[(docs_sync.ROOT / "docs" / "benchmarks.md", "chat_meaning")] == (
        "# the report\n")


def test_stale_checks_every_block_of_a_name_and_wants_one():
    page = Path("page.md")
    block = "<!-- a:begin -->\nnew\n<!-- a:end -->\n"
    wanted = {(page, "a"): "new\n"}
    assert docs_sync.stale({page: block}, wanted) == []
    two = block + "middle\n<!-- a:begin (a copy) -->\nold\n<!-- a:end -->\n"
    assert docs_sync.stale({page: two}, wanted) == ["page.md: 2 a blocks, expected one"]
