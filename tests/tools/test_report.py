"""thinkrl report: the Pareto frontier on hand cases, what the page holds for runs with and without each metric,
the old evaluation names, and bad input (a dir without metrics.jsonl, a malformed line)."""
import json
import re

import pytest
from report_runs import make_rl_run, make_sft_run, rl_record

from thinkrl.cli import main as cli_main
from thinkrl.tools.report import (PLOTS, ReportError, Run, cost_figure, cost_points, figures, load_run,
                                  normalise_eval, pareto_frontier, render, run_names, series, summary, write_report)


def test_pareto_frontier_hand_cases():
    pts = [(1, 0.5), (2, 0.4), (3, 0.7), (3, 0.6), (0.5, 0.1)]
    assert pareto_frontier(pts) == [4, 0, 2]  # (2, .4) is dominated by (1, .5); (3, .6) by (3, .7)
    assert pareto_frontier([(1, 1), (1, 1)]) == [0]  # equal points: the first
    assert pareto_frontier([(1, 0.2), (1, 0.9)]) == [1]  # same cost: the more accurate
    assert pareto_frontier([(2, 0.5), (1, 0.5)]) == [1]  # same accuracy: the cheaper
    assert pareto_frontier([(3, 0.9), (2, 0.8), (1, 0.7)]) == [2, 1, 0]  # a trade-off: all of them
    assert pareto_frontier([]) == []


def test_frontier_property_no_kept_point_is_dominated():
    import random

    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(rng.randint(1, 8))]
        front = set(pareto_frontier(pts))
        for i, (x, y) in enumerate(pts):
            dominated = any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in pts)
            duplicate_kept = any(pts[j] == (x, y) for j in front if j != i)
            assert (i in front) == (not dominated and not duplicate_kept)


def test_report_of_two_runs(tmp_path):
    rl, sft = make_rl_run(tmp_path / "a" / "rl"), make_sft_run(tmp_path / "a" / "sft")
    out = write_report([rl, sft], tmp_path / "r.html")
    page = out.read_text()
    figs, missing = figures([load_run(rl), load_run(sft)])
    assert missing == []  # the fixture logs every metric of the contract
    assert page.count("Plotly.newPlot(") == len(figs) == len(PLOTS) + 2  # + time split and cost frontier
    assert page.count("plotly.js v") <= 2 and len(page) > 3_000_000  # the library inlined (its header once)
    assert not re.search(r"<(script|link)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I)  # no network
    assert {p.title for p in PLOTS} <= {f.layout.title.text for f in figs}
    assert all(f'id="plot-{i}"' in page for i in range(len(figs)))
    names = {t.name for f in figs for t in f.data}
    assert {"rl · reward/mean", "rl · eval/reward/greedy", "rl", "sft", "Pareto frontier"} <= names  # legend: dirs


def test_series_and_eval_json_points(tmp_path):
    run = load_run(make_rl_run(tmp_path / "rl", steps=20))
    steps, vals = series(run, "eval/pass@1")
    assert steps == [5, 10, 15, 20]  # the final eval.json (steps=20) fills step 20, not logged in metrics
    assert vals == pytest.approx([0.3, 0.4, 0.5, 0.7])
    assert series(run, "kl/mean")[1][:2] == pytest.approx([0.001, 0.002])
    assert series(run, "groups") == ([], [])  # a list, not a number


def test_cost_plot_points_and_frontier(tmp_path):
    run = load_run(make_rl_run(tmp_path / "rl", steps=20))
    greedy_only = {"step": 1, "eval/pass@1": 0.5, "eval/tokens_per_problem": 30.0}  # no k: k = 0, one answer
    assert cost_points(Run("g", run.path, [greedy_only], []))[0][:2] == (30.0, 0.5)
    fig = cost_figure([run])
    pts, front = fig.data[0], fig.data[-1]
    # tokens per answer = tokens_per_problem / (1 + k), k = 4: eval records at steps 5, 10, 15 (105..115 tokens,
    # pass@1 .3-.5), the final eval.json (130, .7) and evals/step_000010 (90, .45)
    flat = lambda xs, ys: [v for p in sorted(zip(xs, ys)) for v in p]  # noqa: E731
    assert flat(pts.x, pts.y) == pytest.approx(flat([18, 21, 22, 23, 26], [0.45, 0.3, 0.4, 0.5, 0.7]))
    assert flat(front.x, front.y) == pytest.approx(flat([18, 23, 26], [0.45, 0.5, 0.7]))
    assert front.name == "Pareto frontier"


def test_summary_row(tmp_path):
    row = summary(load_run(make_rl_run(tmp_path / "rl", steps=20)))
    assert row["steps"] == 20 and row["kind"] == "RL"
    assert row["final reward"] == pytest.approx(0.3) and row["final eval pass@1"] == pytest.approx(0.7)
    assert row["best eval pass@1"] == pytest.approx(0.7) and row["final pass@k"] == "0.800 (k=4)"
    assert row["train tokens"] == pytest.approx(2000.0) and row["wall time (s)"] == pytest.approx(40.0)
    sft = make_sft_run(tmp_path / "sft", steps=30)
    (sft / "eval.json").unlink()  # no final eval.json: the one with the largest step
    for step, acc in ((30, 0.35), (10, 0.2)):
        (sft / "evals" / str(step)).mkdir(parents=True)
        (sft / "evals" / str(step) / "eval.json").write_text(json.dumps({"step": step, "pass@1": acc}))
    sft = summary(load_run(sft))
    assert sft["final eval pass@1"] == pytest.approx(0.35) and sft["best eval pass@1"] == pytest.approx(0.35)
    assert sft["kind"] == "SFT" and sft["steps"] == 30 and sft["final SFT loss"] == pytest.approx(2 / 30)


def test_missing_metrics_are_listed_not_crashed(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    runs = [load_run(d)]
    figs, missing = figures(runs)
    assert len(figs) == 1 and "KL to the reference" in missing and "Accuracy vs inference cost" in missing
    assert "Not logged by these runs" in render(runs)


def test_old_eval_names_are_read_as_the_new_ones(tmp_path):
    assert normalise_eval({"eval/acc/greedy": 0.5, "eval/acc/mean@4": 0.4, "eval/eval/n": 9, "x": 1}, "eval/") == \
        {"eval/pass@1": 0.5, "eval/avg@4": 0.4, "eval/num_problems": 9, "x": 1}
    assert normalise_eval({"acc/greedy": 0.5, "pass@1": 0.6}) == {"acc/greedy": 0.5, "pass@1": 0.6}  # new wins
    d = tmp_path / "old"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/acc/greedy": 0.25}) + "\n")
    assert series(load_run(d), "eval/pass@1") == ([5], [0.25])


def test_malformed_line_is_skipped_with_file_and_line(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    lines = [json.dumps(rl_record(1)), '{"step": 2, "reward/me', json.dumps(rl_record(3)), "[1, 2]"]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    seen = []
    run = load_run(d, warn=seen.append)
    assert [r["step"] for r in run.records] == [1, 3]
    assert seen == [f"{d / 'metrics.jsonl'}:2: not a JSON object with an integer step (skipped)",
                    f"{d / 'metrics.jsonl'}:4: not a JSON object with an integer step (skipped)"]
    assert "metrics.jsonl:2: not a JSON object" in render([run])


def test_run_dir_without_metrics_is_one_line(tmp_path, capsys):
    qs = tmp_path / "quickstart"
    make_rl_run(qs / "rl")
    with pytest.raises(ReportError, match=r"quickstart: no metrics.jsonl, not a run directory \(run dirs inside"):
        load_run(qs)
    out = tmp_path / "r.html"
    assert cli_main(["report", str(qs / "rl"), str(tmp_path / "nope"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope: no metrics.jsonl" in err[0]
    assert not out.exists()  # every run dir is read before anything is written


def test_cli_writes_the_page(tmp_path, capsys):
    rl = make_rl_run(tmp_path / "x" / "rl")
    rl2 = make_rl_run(tmp_path / "y" / "rl", steps=10)
    out = tmp_path / "out" / "report.html"
    assert cli_main(["report", str(rl), str(rl2), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert "<title>thinkrl report: x/rl, y/rl</title>" in out.read_text()  # same names told apart by their parents
    assert run_names([tmp_path / "x" / "rl", tmp_path / "y" / "rl", tmp_path / "z"]) == ["x/rl", "y/rl", "z"]
