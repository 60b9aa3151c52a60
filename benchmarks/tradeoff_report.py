"""Quality measures, summary, CSV, plots and the Markdown table of benchmarks/tradeoff.py.

Every figure comes from the points tradeoff.py builds from its per-request store (or, with
no store, from the committed report: its points carry their scores); tradeoff.py calls `write`
at its end, and rerunning it when every point exists only rebuilds the report.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks import tasks
from benchmarks.report import METHOD_STYLE, legend_beside, write_files

PRIMARY = {"code": "pass_rate", "short_answer": "accuracy", "continuation": "cosine"}
MAX_QUALITY_LOSS = 0.01
BUDGETS = (0.01, 0.05, 0.10)  # relative quality-loss budgets of the matched-quality comparison
# Below this many items a normal-approximation interval means nothing; the table says so.
MIN_ITEMS_FOR_INTERVAL = 20
JUDGE, TRAINING_FREE = {"judge"}, {"top_alpha", "entropy"}
PLOTTED_METHODS = ("lossless", "judge", "top_alpha", "entropy")


def _item_scores(points, reference, items):
    """Per point: {measure: [per-item value, in item order]}; code checks are cached by text.
    Points that carry their scores (rebuilt from a committed report) keep them."""
    points = [p for p in points if "scores" not in p]
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
        losses = {}
        for task, values in p["scores"].items():
            mean, low, high = tasks.mean_interval(values)
            row[f"{task}_n"] = len(values)
            row[f"{task}"], row[f"{task}_ci95"] = mean, [low, high]
            if base is not None and values:
                base_values = base["scores"][task]
                base_mean = sum(base_values) / len(base_values)
                diff, dlow, dhigh = tasks.paired_difference(values, base_values)
                if base_mean:
                    row[f"{task}_rel_change"] = diff / base_mean
                    row[f"{task}_rel_change_ci95"] = [dlow / base_mean, dhigh / base_mean]
                if task in PRIMARY:
                    # A task lossless scores 0 on has no relative change: any drop disqualifies.
                    losses[task] = -diff / base_mean if base_mean else (0.0 if diff >= 0 else math.inf)
        if base is not None:
            row["quality_loss"] = losses  # relative loss per primary task (negative: a gain)
            row["worst_quality_loss"] = max(losses.values(), default=0.0)
            row["acceptance_length_vs_lossless"] = p["mean_acceptance_length"] / base["mean_acceptance_length"]
            row["tokens_per_s_vs_lossless"] = p["tokens_per_s"] / base["tokens_per_s"]
            # None without batch-1 passes (--batch1-items 0)
            row["tokens_per_s_batch1_vs_lossless"] = (p["tokens_per_s_batch1"] / base["tokens_per_s_batch1"]
                                                      if p["tokens_per_s_batch1"] and base["tokens_per_s_batch1"]
                                                      else None)
        row["within_1pct"] = base is not None and row["worst_quality_loss"] <= MAX_QUALITY_LOSS
        rows.append(row)
    return rows


def _best_within(group, methods, budget, task=None, field="mean_acceptance_length"):
    """The relaxed point of `methods` with the highest `field` whose loss is within `budget`
    on `task` (every primary task when None)."""
    def loss(r):
        return r["worst_quality_loss"] if task is None else r["quality_loss"].get(task, 0.0)
    ok = [r for r in group if r["method"] in methods and "quality_loss" in r and loss(r) <= budget]
    return max(ok, key=lambda r: r[field], default=None)


def _groups(rows):
    for key in sorted({(r["proposer"], r["k"]) for r in rows}):
        group = [r for r in rows if (r["proposer"], r["k"]) == key]
        lossless = next((r for r in group if r["method"] == "lossless"), None)
        if lossless is not None:
            yield key, lossless, group


def _headlines(rows):
    out = []
    for (proposer, k), lossless, group in _groups(rows):
        judge = _best_within(group, JUDGE, MAX_QUALITY_LOSS)
        free = _best_within(group, TRAINING_FREE, MAX_QUALITY_LOSS)
        judge_speed = _best_within(group, JUDGE, MAX_QUALITY_LOSS, field="tokens_per_s")
        out.append({
            "proposer": proposer, "k": k,
            "lossless_acceptance_length": lossless["mean_acceptance_length"],
            "judge": _pick(judge), "best_training_free": _pick(free), "judge_fastest": _pick(judge_speed),
            "judge_vs_lossless": judge and judge["acceptance_length_vs_lossless"],
            "judge_vs_training_free": judge and free and
            judge["mean_acceptance_length"] / free["mean_acceptance_length"],
            "judge_tokens_per_s_vs_lossless": judge_speed and judge_speed["tokens_per_s_vs_lossless"],
            "judge_tokens_per_s_batch1_vs_lossless": judge_speed and judge_speed["tokens_per_s_batch1_vs_lossless"],
            # The same comparison at looser budgets, on every task and on each task alone.
            "budgets": {f"{budget:g}": {"judge": _pick(_best_within(group, JUDGE, budget)),
                                         "best_training_free": _pick(_best_within(group, TRAINING_FREE, budget))}
                        for budget in BUDGETS},
            "per_task_within_1pct": {
                task: {"judge": _pick(_best_within(group, JUDGE, MAX_QUALITY_LOSS, task)),
                       "best_training_free": _pick(_best_within(group, TRAINING_FREE, MAX_QUALITY_LOSS, task))}
                for task in PRIMARY if task in lossless["quality_loss"]},
        })
    return out


def _pick(row):
    if row is None:
        return None
    return {k: row[k] for k in ("method", "knob", "mean_acceptance_length", "acceptance_length_vs_lossless",
                                "tokens_per_s", "tokens_per_s_batch1", "worst_quality_loss")}


def _plots(rows, results: Path, tag: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for proposer in sorted({r["proposer"] for r in rows}):
        for y_field, y_label, name in (("mean_acceptance_length", "mean acceptance length (tokens/step)", "acceptance"),
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
                ax.annotate(f"{100 * MAX_QUALITY_LOSS:g}% loss budget", (-100 * MAX_QUALITY_LOSS, 1.0),
                            xycoords=("data", "axes fraction"), xytext=(-2, -4), textcoords="offset points",
                            fontsize=7, color="grey", rotation=90, va="top", ha="right")
                ax.set_xlabel(f"{task}: {PRIMARY[task]} change vs lossless (%)")
                ax.set_ylabel(y_label)
            legend_beside(fig, PLOTTED_METHODS, "marker size:\ndraft length")
            fig.suptitle(f"{proposer}: {y_label} vs quality (Gemma 3 270M)")
            fig.tight_layout(rect=(0, 0, 0.9, 1))
            path = results / f"{tag}_{proposer}_{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path.name)
    return files


def _fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pair(entry) -> str:
    def one(point):
        if point is None:
            return "-"
        name = point["knob"] if point["method"] == "judge" else f"{point['method']} {point['knob']}"
        return f"{point['mean_acceptance_length']:.2f} ({point['acceptance_length_vs_lossless']:.2f}x, {name})"

    return f"{one(entry['judge'])} / {one(entry['best_training_free'])}"


def _resolution(rows) -> str:
    """What one item is worth, relative to the first lossless run (the others are alike)."""
    lossless = next((r for r in rows if r["method"] == "lossless"), None)
    if lossless is None:
        return " n/a"
    parts = []
    for task in PRIMARY:
        n, mean = lossless.get(f"{task}_n"), lossless.get(task)
        if n and mean:
            parts.append(f"{task} {n} items" if task == "continuation" else f"{task} {100 / (n * mean):.1f}%")
    return f" {', '.join(parts)} (lossless {lossless['proposer']} k={lossless['k']})."


def _markdown(rows, headlines, setup, reference, plots, previous=None) -> str:
    lines = [
        f"Measured {setup['date']} on {setup['machine']}, vLLM {setup['vllm']}; target {setup['target']}, "
        f"draft_model draft = {setup['draft']}. Greedy decoding; concurrent = all items with up to "
        f"{setup['concurrency']} in flight; batch 1 = {setup['batch1_items']} continuation items one at a time. "
        f"Target alone: {reference['tokens_per_s']:.1f} tok/s concurrent, "
        f"{_fmt(reference['tokens_per_s_batch1'], 1)} tok/s at batch 1. "
        + (f"The judge reads {', '.join(setup['head_features'])}. " if setup.get("head_features") else "")
        + (f"**Partial: {setup['points_missing']} of {setup['points_planned']} points not measured yet** "
           "(rerun the sweep to finish). " if setup.get("points_missing") else "")
        + f"Command: `{setup['command']}`.",
        "",
        "| proposer | k | method | knob | accept. length | accept. rate | tok/s conc. | tok/s batch 1 "
        "| code pass (n) | short answer acc. (n) | cont. cosine (n) | cont. exact | within 1% |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"lossless": 0, "judge": 1, "top_alpha": 2, "entropy": 3}
    for r in sorted(rows, key=lambda r: (r["proposer"], r["k"], order[r["method"]], -(r["knob"] or 0))):
        def q(task, digits=3, r=r):
            if not r.get(f"{task}_n"):
                return "n/a"
            low, high = r[f"{task}_ci95"]
            return f"{r[task]:.{digits}f} [{low:.2f}, {high:.2f}] ({r[f'{task}_n']})"

        lines.append(
            f"| {r['proposer']} | {r['k']} | {r['method']} | {'' if r['knob'] is None else r['knob']} "
            f"| {r['mean_acceptance_length']:.2f} | {r['acceptance_rate']:.3f} | {r['tokens_per_s']:.1f} "
            f"| {_fmt(r['tokens_per_s_batch1'], 1)} | {q('code')} | {q('short_answer')} | {q('continuation')} "
            f"| {_fmt(r.get('continuation_exact'))} | {'yes' if r['within_1pct'] else 'no'} |"
        )
    lines += ["", "Quality change against the same server's lossless run, relative, paired item by item, "
              "with a 95% interval:", "",
              "| proposer | k | method | knob | accept. length (x lossless) | code | short answer | continuation cosine |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["proposer"], r["k"], order[r["method"]], -(r["knob"] or 0))):
        if r["method"] == "lossless" or "quality_loss" not in r:
            continue

        def change(task, r=r):
            if f"{task}_rel_change" not in r:
                return "n/a"
            if r[f"{task}_n"] < MIN_ITEMS_FOR_INTERVAL:
                return f"{100 * r[f'{task}_rel_change']:+.1f}% (n={r[f'{task}_n']}, no interval)"
            low, high = r[f"{task}_rel_change_ci95"]
            return f"{100 * r[f'{task}_rel_change']:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"

        lines.append(f"| {r['proposer']} | {r['k']} | {r['method']} | {r['knob']} | {r['mean_acceptance_length']:.2f} "
                     f"({r['acceptance_length_vs_lossless']:.2f}x) | {change('code')} | {change('short_answer')} "
                     f"| {change('continuation')} |")
    lines += ["", "Resolution (one item of a task, relative to lossless):" + _resolution(rows)]
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
    budgets = [f"{budget:g}" for budget in BUDGETS]
    lines += ["", "Matched quality: the highest mean acceptance length (x lossless) of the judge / of the best "
              "training-free rule among points whose loss is within the budget, on every task and on each task "
              "alone (-: no point qualifies):", "",
              "| proposer | k | " + " | ".join(f"every task <= {100 * float(b):g}%" for b in budgets) + " | "
              + " | ".join(f"{task} alone <= 1%" for task in PRIMARY) + " |",
              "|---|---|" + "---|" * (len(budgets) + len(PRIMARY))]
    for h in headlines:
        cells = [_pair(h["budgets"][b]) for b in budgets]
        cells += [_pair(h["per_task_within_1pct"][task]) if task in h["per_task_within_1pct"] else "n/a"
                  for task in PRIMARY]
        lines.append(f"| {h['proposer']} | {h['k']} | " + " | ".join(cells) + " |")
    if previous is not None:
        lines += ["", *_comparison(headlines, previous)]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def _comparison(headlines, previous: dict) -> list[str]:
    """This sweep's matched-quality judge against an earlier sweep's (another head on the
    same items), with this sweep's best training-free rule beside them."""
    before = {(h["proposer"], h["k"]): h for h in previous["headlines"]}
    label = previous["setup"].get("head_features") or ["hidden"]  # sweeps before format 2 served hidden-state heads
    budgets = [f"{budget:g}" for budget in BUDGETS]
    lines = [f"Against the earlier sweep's judge (reads {', '.join(label)}; measured {previous['setup']['date']}): "
             "highest mean acceptance length within each budget, earlier judge / this judge / this sweep's best "
             "training-free rule (-: no point qualifies; n/a: not measured):", "",
             "| proposer | k | " + " | ".join(f"every task <= {100 * float(b):g}%" for b in budgets) + " | "
             + " | ".join(f"{task} alone <= 1%" for task in PRIMARY) + " |",
             "|---|---|" + "---|" * (len(budgets) + len(PRIMARY))]

    def cell(picks, method):
        if picks is None:
            return "n/a"
        return "-" if picks[method] is None else f"{picks[method]['mean_acceptance_length']:.2f}"

    for h in headlines:
        old = before.get((h["proposer"], h["k"]), {})
        columns = [(old.get("budgets", {}).get(b), h["budgets"][b]) for b in budgets]
        columns += [(old.get("per_task_within_1pct", {}).get(task), h["per_task_within_1pct"].get(task))
                    for task in PRIMARY]
        cells = [" / ".join([cell(earlier, "judge"), cell(now, "judge"), cell(now, "best_training_free")])
                 for earlier, now in columns]
        lines.append(f"| {h['proposer']} | {h['k']} | " + " | ".join(cells) + " |")
    return lines


def write(points, reference, items, results: Path, tag: str, setup: dict, previous: dict | None = None) -> dict:
    """`previous`: the JSON report of an earlier sweep on the same items (another head), whose
    matched-quality judge points the Markdown lists beside this sweep's."""
    results.mkdir(parents=True, exist_ok=True)
    _item_scores(points, reference, items)
    rows = _summarise(points)
    headlines = _headlines(rows)
    plots = _plots(rows, results, tag)
    report = {"setup": setup, "reference": {k: v for k, v in reference.items() if k != "texts"},
              "headlines": headlines, "points": rows,
              "items": [{"proposer": p["proposer"], "k": p["k"], "method": p["method"], "knob": p["knob"],
                         "items": p["items"], "scores": p["scores"]} for p in points]}
    fields = [k for k in rows[0] if not isinstance(rows[0][k], list)] if rows else []
    markdown = _markdown(rows, headlines, setup, reference, [tasks.shown_path(results / p) for p in plots], previous)
    write_files(results, tag, report, rows, fields, markdown)
    return report
