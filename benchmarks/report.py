"""What both experiments' reports share: how a method is drawn, where the legend goes, and the
files a report writes (RESULTS/<tag>.json, .csv and .md). The analyses differ because the
experiments measure different things: the Gemma sweep (tradeoff_report.py) scores quality
against the target alone; the Qwen benchmark (chat_tradeoff_report.py) pairs answers with
lossless and certifies points."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# One colour and marker per method, in every plot of either experiment.
METHOD_STYLE = {"lossless": ("black", "o"), "judge": ("tab:red", "s"), "judge_hidden": ("tab:orange", "v"),
                "judge_both": ("tab:purple", "P"), "top_alpha": ("tab:blue", "^"), "entropy": ("tab:green", "D"),
                "fly": ("tab:brown", "X"), "fly_w2": ("peru", "x"), "fly_w4": ("sienna", "x")}
OTHER_STYLE = ("tab:gray", "x")


def legend_beside(target, methods, title: str) -> None:
    """A legend of `methods` beside the axes or figure `target`, never on the points."""
    import matplotlib.pyplot as plt

    handles = [plt.Line2D([], [], linestyle="", color=METHOD_STYLE.get(m, OTHER_STYLE)[0],
                          marker=METHOD_STYLE.get(m, OTHER_STYLE)[1], label=m) for m in methods]
    anchor = (1.01, 1.0) if isinstance(target, plt.Axes) else (0.9, 0.5)
    target.legend(handles=handles, fontsize=8, title=title, title_fontsize=8,
                  loc="upper left" if isinstance(target, plt.Axes) else "center left", bbox_to_anchor=anchor,
                  borderaxespad=0.0)


def write_files(results: Path, tag: str, report: dict, rows: list[dict], fields: list[str], markdown: str) -> None:
    """RESULTS/<tag>.json (everything), .csv (one row per point, `fields`) and .md (printed too)."""
    (results / f"{tag}.json").write_text(json.dumps(report, indent=1))
    with (results / f"{tag}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (results / f"{tag}.md").write_text(markdown)
    print(markdown)
