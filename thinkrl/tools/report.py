"""`thinkrl report RUN_DIR [RUN_DIR ...] [-o report.html]`: one self-contained HTML page of a run's curves.

The page opens with no network (plotly's script is inlined once) and overlays every run given, one colour per
run, named by its directory. It reads, for each RUN_DIR:

- `metrics.jsonl`: one JSON object per line with `step`; SFT records carry `phase: "sft"`, evaluations during
  training are the `eval/`-prefixed keys of the step they ran at;
- every `eval.json` under RUN_DIR (the run's final evaluation, `thinkrl eval --output` directories,
  per-checkpoint evaluations), for the accuracy-versus-inference-cost plot and the summary table.

A plot whose metrics no run logged is left out and listed under "not logged by these runs"; a record missing a
key is skipped for that key only. A RUN_DIR without `metrics.jsonl` stops the report with one line naming it; a
line of `metrics.jsonl` that is not a JSON object is skipped with one warning line (`file:line`), shown in the
report too, so a run still being written (a half-written last line) can be looked at.
"""
from __future__ import annotations

import argparse
import fnmatch
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HELP = "one self-contained HTML report of one or more run directories (curves, cost frontier, summary)"

# Evaluation keys written before `pass@1` / `avg@k` / `num_problems` (thinkrl.eval): read as the new names.
OLD_EVAL_NAMES = {"acc/greedy": "pass@1", "eval/n": "num_problems", re.compile(r"acc/mean@(\d+)"): r"avg@\1"}


class ReportError(ValueError):
    pass


@dataclass
class Run:
    name: str  # the legend label: the shortest path suffix that tells the runs apart
    path: Path
    records: list[dict]  # metrics.jsonl records other than SFT ones (numbers only), eval keys normalised
    sft: list[dict]  # the `phase: "sft"` records
    evals: list[dict] = field(default_factory=list)  # every eval.json under the run dir, + "source" (its path)
    warnings: list[str] = field(default_factory=list)


def _new_name(name: str) -> str | None:
    for old, new in OLD_EVAL_NAMES.items():
        if isinstance(old, re.Pattern) and old.fullmatch(name):
            return old.sub(new, name)
        if old == name:
            return new
    return None


def normalise_eval(d: dict, prefix: str = "") -> dict:
    """Rename the old evaluation keys (`OLD_EVAL_NAMES`) under `prefix` to the new ones; a new key present wins."""
    out = dict(d)
    for key in d:
        new = _new_name(key[len(prefix):]) if key.startswith(prefix) else None
        if new is not None and prefix + new not in d:
            out[prefix + new] = out.pop(key)
    return out


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def read_metrics(path: Path, warn=None) -> tuple[list[dict], list[str]]:
    """metrics.jsonl -> (records with a `step`, one warning line per line skipped)."""
    records, warnings = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            warnings.append(f"{path}:{i}: not a JSON object with an integer step (skipped)")
            continue
        records.append(rec)
    for w in warnings:
        (warn or (lambda m: print(f"thinkrl report: warning: {m}", file=sys.stderr)))(w)
    return records, warnings


def load_run(path: str | Path, name: str | None = None, warn=None) -> Run:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        inside = sorted(str(p.parent) for p in path.glob("*/metrics.jsonl")) if path.is_dir() else []
        hint = f" (run dirs inside it: {' '.join(inside)})" if inside else ""
        raise ReportError(f"{path}: no metrics.jsonl, not a run directory{hint}")
    raw, warnings = read_metrics(metrics, warn)
    sft = [_numbers(r) for r in raw if r.get("phase") == "sft"]
    records = [normalise_eval(_numbers(r), "eval/") for r in raw if r.get("phase") != "sft"]
    evals = []
    for f in sorted(path.rglob("eval.json")):
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            warnings.append(f"{f}: not JSON (skipped)")
            continue
        if isinstance(d, dict):
            evals.append({**normalise_eval(_numbers(d)), "source": str(f.relative_to(path))})
    return Run(name or path.name, path, records, sft, evals, warnings)


def run_names(paths: list[Path]) -> list[str]:
    """Each path's shortest trailing part that no other path ends with (`a/rl`, `b/rl`, `sft`)."""
    parts = [Path(p).resolve().parts for p in paths]

    def name(i: int) -> str:
        for n in range(1, len(parts[i]) + 1):
            tail = parts[i][-n:]
            if all(p[-n:] != tail for j, p in enumerate(parts) if j != i):
                return "/".join(tail)
        return str(paths[i])

    return [name(i) for i in range(len(parts))]


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, accuracy) points, by increasing cost: no other point costs as little
    or less and is as accurate or more, one of them strictly. Of equal points the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    out, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            out.append(i)
            best = points[i][1]
    return out


# ------------------------------------------------------------------ the plots
@dataclass
class Plot:
    title: str
    keys: list[str]  # fnmatch patterns over the metric names; each matching name is one line per run
    y: str = ""
    source: str = "rl"  # rl: the RL records; sft: the `phase: "sft"` ones
    log: bool = False  # a log y axis (values <= 0 are not drawn)
    exclude: tuple[str, ...] = ()  # patterns of names left to another plot


PLOTS = [
    Plot("Reward", ["reward/mean", "eval/reward/greedy"], "reward"),
    Plot("Accuracy (train; eval pass@1, avg@k, maj@k)", ["acc/mean", "eval/pass@1", "eval/avg@*", "eval/maj@*"],
         "accuracy"),
    Plot("All-correct / all-wrong groups", ["group/all_correct_frac", "group/all_wrong_frac"], "fraction of groups"),
    Plot("Response length (train)", ["len/response_mean", "len/response_p*", "len/response_max"], "tokens"),
    Plot("Response length (eval)", ["eval/len/mean", "eval/len/p*", "eval/len/max"], "tokens"),
    Plot("Truncated responses", ["len/truncated_frac", "eval/truncated_frac"], "fraction"),
    Plot("Policy loss", ["loss/policy"]),
    Plot("KL to the reference", ["kl/mean"]),
    Plot("Entropy", ["entropy/mean"]),
    Plot("Clip fraction", ["clip/frac"], "fraction of tokens"),
    Plot("Gradient norm", ["grad/norm", "grad_norm"]),
    Plot("Staleness (policy versions behind)", ["staleness/mean", "staleness/max"], "versions"),
    Plot("Train/inference mismatch (log scale)", ["mismatch/*"], log=True, exclude=("mismatch/seq_ratio*",)),
    Plot("Train/inference sequence ratio", ["mismatch/seq_ratio*"], "pi_train / pi_infer"),
    Plot("Throughput", ["perf/tokens_per_s", "perf/gen_tokens_per_s"], "tokens/s"),
    Plot("SFT loss", ["loss/sft"], "loss", source="sft"),
]
TIME_SPLIT = {"generation (waiting for the batch)": "perf/wait_seconds", "training": "perf/train_seconds_total",
              "weight sync": "perf/sync_seconds"}
CONFIG = {"displaylogo": False, "displayModeBar": "hover"}  # plotly's toolbar on hover only
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def _records(run: Run, source: str) -> list[dict]:
    return run.sft if source == "sft" else run.records


def expand(patterns: list[str], runs: list[Run], source: str, exclude: tuple[str, ...] = ()) -> list[str]:
    present = sorted({k for r in runs for rec in _records(r, source) for k in rec})
    out = []
    for p in patterns:
        out += [k for k in present if fnmatch.fnmatchcase(k, p) and k not in out
                and not any(fnmatch.fnmatchcase(k, x) for x in exclude)]
    return out


def series(run: Run, key: str, source: str = "rl") -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; an RL run's `eval/X` series also takes X from its eval.json files that name a step."""
    pts = {rec["step"]: rec[key] for rec in _records(run, source) if key in rec}
    if source == "rl" and key.startswith("eval/") and run.records:  # not an SFT run's: its steps are not RL's
        for e in run.evals:
            step = e.get("step", e.get("steps"))
            if isinstance(step, int) and key[5:] in e and step not in pts:
                pts[step] = e[key[5:]]
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def _colours(runs: list[Run]) -> dict[str, str]:
    from plotly.colors import qualitative

    return {r.name: qualitative.Plotly[i % len(qualitative.Plotly)] for i, r in enumerate(runs)}


def _layout(fig, title: str, x: str, y: str):
    fig.update_layout(title=dict(text=title, font=dict(size=15)), template="plotly_white", height=340,
                      margin=dict(l=55, r=15, t=45, b=45), legend=dict(font=dict(size=10)),
                      xaxis_title=x, yaxis_title=y)
    return fig


def line_figure(plot: Plot, runs: list[Run]):
    """One trace per (run, metric), or None when no run logged any of the plot's metrics."""
    import plotly.graph_objects as go

    keys = expand(plot.keys, runs, plot.source, plot.exclude)
    colour, fig = _colours(runs), go.Figure()
    for run in runs:
        for j, key in enumerate(keys):
            x, y = series(run, key, plot.source)
            if not x:
                continue
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{run.name} · {key}" if len(keys) > 1 else run.name,
                                     legendgroup=run.name, mode="lines+markers" if len(x) <= 40 else "lines",
                                     line=dict(color=colour[run.name], dash=DASHES[j % len(DASHES)]),
                                     marker=dict(size=5)))
    if not fig.data:
        return None
    if plot.log:
        fig.update_yaxes(type="log", exponentformat="power")
    return _layout(fig, plot.title, "step", plot.y)


def time_split_figure(runs: list[Run]):
    """Stacked bars: seconds spent waiting for rollouts, training and syncing weights, summed over each run."""
    import plotly.graph_objects as go

    totals = {r.name: {part: sum(rec[k] for rec in r.records if k in rec) for part, k in TIME_SPLIT.items()}
              for r in runs if any(k in rec for rec in r.records for k in TIME_SPLIT.values())}
    if not totals:
        return None
    fig = go.Figure([go.Bar(name=part, x=list(totals), y=[t[part] for t in totals.values()])
                     for part in TIME_SPLIT])
    fig.update_layout(barmode="stack")
    return _layout(fig, "Time split (generation / training / weight sync)", "run", "seconds (sum over steps)")


def cost_points(run: Run) -> list[tuple[float, float, str]]:
    """(generated tokens per answer, pass@1, label) of every evaluation of the run with `tokens_per_problem` and
    `pass@1`. Tokens per answer = tokens_per_problem / (1 + k) (the greedy answer and k samples), so evaluations
    with different k compare: a greedy-only evaluation during training and the final one with k = 4 are priced
    for the same one answer per problem."""
    def point(d: dict, prefix: str, label: str):
        per_answer = d[prefix + "tokens_per_problem"] / (1 + d.get(prefix + "k", 0))
        return per_answer, d[prefix + "pass@1"], label

    out = [point(rec, "eval/", f"{run.name} step {rec['step']}")
           for rec in run.records if "eval/tokens_per_problem" in rec and "eval/pass@1" in rec]
    out += [point(e, "", f"{run.name} {e['source']}" + (f" (step {e['step']})" if "step" in e else ""))
            for e in run.evals if "tokens_per_problem" in e and "pass@1" in e]
    return out


def cost_figure(runs: list[Run]):
    """Accuracy vs generated tokens per answer over every evaluation of every run, the Pareto frontier marked."""
    import plotly.graph_objects as go

    colour, fig, everything = _colours(runs), go.Figure(), []
    for run in runs:
        pts = cost_points(run)
        everything += pts
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], text=[p[2] for p in pts],
                                     mode="markers", name=run.name, marker=dict(color=colour[run.name], size=8),
                                     hovertemplate="%{text}<br>%{x:.1f} tokens/answer<br>pass@1 %{y:.3f}"))
    if not everything:
        return None
    front = [everything[i] for i in pareto_frontier([(p[0], p[1]) for p in everything])]
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines", name="Pareto frontier",
                             line=dict(color="black", shape="hv", width=1.5)))
    return _layout(fig, "Accuracy vs inference cost (every evaluation)", "generated tokens per answer", "pass@1")


def figures(runs: list[Run]) -> tuple[list, list[str]]:
    """(plotly figures in page order, titles of the plots no run has data for)."""
    figs, missing = [], []
    built = [(p.title, line_figure(p, runs)) for p in PLOTS if p.source == "rl"]
    built += [("Time split (generation / training / weight sync)", time_split_figure(runs)),
              ("Accuracy vs inference cost", cost_figure(runs))]
    built += [(p.title, line_figure(p, runs)) for p in PLOTS if p.source == "sft"]
    for title, fig in built:
        (figs.append(fig) if fig is not None else missing.append(title))
    return figs, missing


# ------------------------------------------------------------------ the summary table
def _last(records: list[dict], key: str):
    return next((r[key] for r in reversed(records) if key in r), None)


def summary(run: Run) -> dict:
    """One row of the summary table; None where the run did not log it. The final evaluation is the run dir's
    eval.json, else the eval.json under it with the largest step."""
    recs = run.records or run.sft
    stepped = sorted((e for e in run.evals if "step" in e), key=lambda e: e["step"])
    final = next((e for e in run.evals if e["source"] == "eval.json"), stepped[-1] if stepped else None)
    evals = [r["eval/pass@1"] for r in run.records if "eval/pass@1" in r] + [e["pass@1"] for e in run.evals
                                                                             if "pass@1" in e]
    ks = sorted((int(k[5:]), k) for k in (final or {}) if re.fullmatch(r"pass@\d+", k) and k != "pass@1")
    tokens = [r["perf/train_tokens"] for r in run.records if "perf/train_tokens" in r]
    return {
        "run": run.name,
        "kind": "RL" if run.records else "SFT",
        "steps": max((r["step"] for r in recs), default=None),
        "final reward": _last(run.records, "reward/mean"),
        "final train acc": _last(run.records, "acc/mean"),
        "final eval pass@1": final["pass@1"] if final and "pass@1" in final else _last(run.records, "eval/pass@1"),
        "best eval pass@1": max(evals, default=None),
        "final pass@k": f"{final[ks[-1][1]]:.3f} (k={ks[-1][0]})" if ks else None,
        "final SFT loss": _last(run.sft, "loss/sft"),
        "train tokens": sum(tokens) if tokens else None,
        "wall time (s)": _last(run.records, "time"),
    }


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
    return html.escape(str(v))


# ------------------------------------------------------------------ the page
STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{font-size:22px;margin:0 0 4px}
table{border-collapse:collapse;font-size:13px;margin:10px 0 18px}td,th{border:1px solid #ddd;padding:4px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:10px}
.plot{border:1px solid #eee;height:340px}.note{font-size:13px;color:#555}"""


def render(runs: list[Run]) -> str:
    """The whole page as a string: plotly's script once, then the summary table and the plots."""
    from plotly.offline import get_plotlyjs

    figs, missing = figures(runs)
    rows = [summary(r) for r in runs]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    plots = "".join(f'<div class="plot">{fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{i}", config=CONFIG)}'
                    "</div>" for i, fig in enumerate(figs))
    dirs = "".join(f"<li><b>{html.escape(r.name)}</b>: {html.escape(str(r.path))} ({len(r.records)} RL records, "
                   f"{len(r.sft)} SFT records, {len(r.evals)} eval.json)</li>" for r in runs)
    notes = "".join(f"<li>{html.escape(w)}</li>" for r in runs for w in r.warnings)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>thinkrl report: "
            f"{html.escape(', '.join(r.name for r in runs))}</title><style>{STYLE}</style>"
            f"<script>{get_plotlyjs()}</script></head><body><h1>thinkrl report</h1><ul class='note'>{dirs}</ul>"
            f"<table><tr>{head}</tr>{body}</table><div class='grid'>{plots}</div>"
            + (f"<p class='note'>Not logged by these runs: {html.escape('; '.join(missing))}.</p>" if missing else "")
            + (f"<p class='note'>Skipped input:</p><ul class='note'>{notes}</ul>" if notes else "")
            + "</body></html>")


def write_report(run_dirs: list[str | Path], output: str | Path, warn=None) -> Path:
    """Read the run dirs (all of them first: a bad one stops before anything is written) and write the page."""
    if not run_dirs:
        raise ReportError("give at least one RUN_DIR")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name, warn) for p, name in zip(paths, run_names(paths))]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(runs), encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="thinkrl report", description=HELP)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--output", "-o", default="report.html", help="the HTML file to write (default: report.html)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = write_report(a.run_dirs, a.output)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
