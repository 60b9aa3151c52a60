"""Quality measures, summary, CSV, plots and the Markdown table of benchmarks/tradeoff.py.

Every figure comes from the points file the sweep wrote (WORK/tradeoff/points.jsonl);
tradeoff.py calls `write` at its end, and rerunning it when every point exists only rebuilds
the report.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from benchmarks import tasks

PRIMARY = {"code": "pass_rate", "short_answer": "accuracy", "continuation": "cosine"}
MAX_QUALITY_LOSS = 0.01
METHOD_STYLE = {"lossless": ("black", "o"), "judge": ("tab:red", "s"), "top_alpha": ("tab:blue", "^"),
                "entropy": ("tab:green", "D")}


def _item_scores(points, reference, items):
    """Per point: {measure: [per-item value, in item order]}; code checks are cached by text."""
    by_id = {i.id: i for i in items}
    code_cache, cosine_cache = {}, {}
    refs = {i.id: reference["texts"][i.id] for i in items if i.family == "continuation"}
    pairs = sorted({(t, refs[item["id"]]) for p in points for item in p["items"]
                    if item["family"] == "continuation" for t in [item["text"]]})
    if pairs:
        values = tasks.Embedder().cosine([a for a, _ in pairs], [b for _, b in pairs])
        cosine_cache = dict(zip(pairs, values))
    for point in points:
        scores = {"code": [], "short_answer": [], "continuation": [], "continuation_exact": []}
        for row in point["items"]:
            item = by_id[row["id"]]
            if item.family == "code":
                key = (item.id, row["text"])
                if key not in code_cache:
                    code_cache[key] = int(tasks.code_passes(item.problem, row["text"]))
                scores["code"].append(code_cache[key])
            elif item.family == "short_answer":
                scores["short_answer"].append(int(tasks.answer_correct(row["text"], item.answers)))
            else:
                scores["continuation"].append(cosine_cache[(row["text"], refs[item.id])])
                scores["continuation_exact"].append(int(row["text"] == refs[item.id]))
        point["scores"] = scores


def _summarise(points):
    baselines = {(p["proposer"], p["k"]): p for p in points if p["method"] == "lossless"}
    rows = []
    for p in points:
        base = baselines.get((p["proposer"], p["k"]))
        row = {key: p[key] for key in ("proposer", "k", "method", "knob", "drafts", "draft_tokens", "accepted",
                                       "mean_acceptance_length", "acceptance_rate", "tokens_per_s",
                                       "tokens_per_s_batch1")}
        qualifies = base is not None
        for task, values in p["scores"].items():
            mean, low, high = tasks.mean_interval(values)
            row[f"{task}_n"] = len(values)
            row[f"{task}"], row[f"{task}_ci95"] = mean, [low, high]
            if base is not None and values:
                base_values = base["scores"][task]
                base_mean = sum(base_values) / len(base_values)
                diff, dlow, dhigh = tasks.paired_difference(values, base_values)
                scale = base_mean if base_mean else float("nan")
                row[f"{task}_rel_change"] = diff / scale
                row[f"{task}_rel_change_ci95"] = [dlow / scale, dhigh / scale]
                if task in PRIMARY and -diff / scale > MAX_QUALITY_LOSS:
                    qualifies = False
        row["within_1pct"] = qualifies
        if base is not None:
            row["acceptance_length_vs_lossless"] = p["mean_acceptance_length"] / base["mean_acceptance_length"]
            row["tokens_per_s_vs_lossless"] = p["tokens_per_s"] / base["tokens_per_s"]
            row["tokens_per_s_batch1_vs_lossless"] = p["tokens_per_s_batch1"] / base["tokens_per_s_batch1"]
        rows.append(row)
    return rows


def _headlines(rows):
    out = []
    for key in sorted({(r["proposer"], r["k"]) for r in rows}):
        group = [r for r in rows if (r["proposer"], r["k"]) == key]
        lossless = next((r for r in group if r["method"] == "lossless"), None)
        if lossless is None:
            continue
        ok = [r for r in group if r["within_1pct"] and r["method"] != "lossless"]
        best = lambda method_set, field: max(  # noqa: E731
            (r for r in ok if r["method"] in method_set), key=lambda r: r[field], default=None)
        judge = best({"judge"}, "mean_acceptance_length")
        free = best({"top_alpha", "entropy"}, "mean_acceptance_length")
        judge_speed = best({"judge"}, "tokens_per_s")
        out.append({
            "proposer": key[0], "k": key[1],
            "lossless_acceptance_length": lossless["mean_acceptance_length"],
            "judge": _pick(judge), "best_training_free": _pick(free), "judge_fastest": _pick(judge_speed),
            "judge_vs_lossless": judge and judge["acceptance_length_vs_lossless"],
            "judge_vs_training_free": judge and free and
            judge["mean_acceptance_length"] / free["mean_acceptance_length"],
            "judge_tokens_per_s_vs_lossless": judge_speed and judge_speed["tokens_per_s_vs_lossless"],
            "judge_tokens_per_s_batch1_vs_lossless": judge_speed and judge_speed["tokens_per_s_batch1_vs_lossless"],
        })
    return out


def _pick(row):
    if row is None:
        return None
    return {k: row[k] for k in ("method", "knob", "mean_acceptance_length", "tokens_per_s", "tokens_per_s_batch1")}


def _plots(rows, results: Path, tag: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for proposer in sorted({r["proposer"] for r in rows}):
        for y_field, y_label, name in (("mean_acceptance_length", "mean acceptance length", "acceptance"),
                                       ("tokens_per_s", "output tokens/s (concurrent)", "speed")):
            fig, axes = plt.subplots(1, 3, figsize=(14, 4))
            for ax, task in zip(axes, PRIMARY):
                for r in rows:
                    if r["proposer"] != proposer or f"{task}_rel_change" not in r:
                        continue
                    color, marker = METHOD_STYLE[r["method"]]
                    ax.scatter(100 * r[f"{task}_rel_change"], r[y_field], color=color, marker=marker,
                               s=30 + 12 * r["k"], alpha=0.8)
                ax.axvline(-100 * MAX_QUALITY_LOSS, color="grey", linestyle=":")
                ax.set_xlabel(f"{task}: {PRIMARY[task]} change vs lossless (%)")
                ax.set_ylabel(y_label)
            for method, (color, marker) in METHOD_STYLE.items():
                axes[0].scatter([], [], color=color, marker=marker, label=method)
            axes[0].legend(fontsize=8, title="marker size: draft length")
            fig.suptitle(f"{proposer}: {y_label} vs quality (Gemma 3 270M)")
            fig.tight_layout()
            path = results / f"{tag}_{proposer}_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path.name)
    return files


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(rows, headlines, setup, reference, plots) -> str:
    lines = [
        f"Measured {setup['date']} on {setup['machine']}, vLLM {setup['vllm']}; target {setup['target']}, "
        f"draft_model draft = {setup['draft']}. Greedy decoding; concurrent = all items with up to "
        f"{setup['concurrency']} in flight; batch 1 = {setup['batch1_items']} continuation items one at a time. "
        f"Target alone: {reference['tokens_per_s']:.1f} tok/s concurrent, "
        f"{reference['tokens_per_s_batch1']:.1f} tok/s at batch 1. Command: `{setup['command']}`.",
        "",
        "| proposer | k | method | knob | accept. length | accept. rate | tok/s conc. | tok/s batch 1 "
        "| code pass (n) | short answer acc. (n) | cont. cosine (n) | cont. exact | within 1% |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"lossless": 0, "judge": 1, "top_alpha": 2, "entropy": 3}
    for r in sorted(rows, key=lambda r: (r["proposer"], r["k"], order[r["method"]], -(r["knob"] or 0))):
        def q(task, digits=3):
            if not r.get(f"{task}_n"):
                return "n/a"
            low, high = r[f"{task}_ci95"]
            return f"{r[task]:.{digits}f} [{low:.2f}, {high:.2f}] ({r[f'{task}_n']})"

        lines.append(
            f"| {r['proposer']} | {r['k']} | {r['method']} | {'' if r['knob'] is None else r['knob']} "
            f"| {r['mean_acceptance_length']:.2f} | {r['acceptance_rate']:.3f} | {r['tokens_per_s']:.1f} "
            f"| {r['tokens_per_s_batch1']:.1f} | {q('code')} | {q('short_answer')} | {q('continuation')} "
            f"| {_fmt(r.get('continuation_exact'))} | {'yes' if r['within_1pct'] else 'no'} |"
        )
    lines += ["", "At most 1% relative quality loss on every task (code pass rate, short-answer accuracy, "
              "continuation cosine; point estimates against the same server's lossless run):", ""]
    for h in headlines:
        j, f = h["judge"], h["best_training_free"]
        judge = (f"judge {j['mean_acceptance_length']:.2f} (threshold {j['knob']}) = "
                 f"{h['judge_vs_lossless']:.2f}x lossless" if j else "no judge point qualifies")
        free = (f"best training-free {f['mean_acceptance_length']:.2f} ({f['method']} {f['knob']})"
                if f else "no training-free point qualifies")
        line = f"- {h['proposer']}, k={h['k']}: lossless {h['lossless_acceptance_length']:.2f} tokens/step; {judge}; {free}"
        if h["judge_vs_training_free"]:
            line += f"; judge / training-free {h['judge_vs_training_free']:.2f}x"
        if h["judge_fastest"]:
            line += (f"; fastest qualifying judge point {_fmt(h['judge_tokens_per_s_vs_lossless'])}x lossless tok/s "
                     f"concurrent, {_fmt(h['judge_tokens_per_s_batch1_vs_lossless'])}x at batch 1")
        lines.append(line)
    lines += ["", "Plots: " + ", ".join(f"`benchmarks/results/{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def write(points, reference, items, results: Path, tag: str, setup: dict) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    _item_scores(points, reference, items)
    rows = _summarise(points)
    headlines = _headlines(rows)
    plots = _plots(rows, results, tag)
    report = {"setup": setup, "reference": {k: v for k, v in reference.items() if k != "texts"},
              "headlines": headlines, "points": rows,
              "items": [{"proposer": p["proposer"], "k": p["k"], "method": p["method"], "knob": p["knob"],
                         "items": p["items"], "scores": p["scores"]} for p in points]}
    (results / f"{tag}.json").write_text(json.dumps(report, indent=1))
    fields = [k for k in rows[0] if not isinstance(rows[0][k], list)] if rows else []
    with (results / f"{tag}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    markdown = _markdown(rows, headlines, setup, reference, plots)
    (results / f"{tag}.md").write_text(markdown)
    print(markdown)
    return report
