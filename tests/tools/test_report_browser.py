"""The report in a real browser: headless Chromium (Debian's `chromium`) opens the page with the network off; no
console errors or exceptions, every plot drawn with data, a screenshot written.

Chromium is looked for at /usr/bin/chromium (or on PATH); when absent and running as root with apt-get, the set-up
installs Debian's `chromium` package, else the tests are skipped with one line. `THINKRL_REPORT_HTML=page.html`
checks that report instead of one built from fixture runs, and `THINKRL_REPORT_SCREENSHOT=out.png` keeps the
screenshot (the README's image is made so, from a real run's report)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from chromium import Chromium
from report_runs import make_rl_run, make_sft_run

from thinkrl.tools.report import figures, load_run, write_report

# every plotly div: its SVG, traces, points, and the SVG marks drawn (line paths with a shape, markers, bars)
PLOT_CHECK = """(async () => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  for (let i = 0; i < 200 && !divs.every(d => d.querySelector('.main-svg')); i++)
    await new Promise(r => setTimeout(r, 50));
  return divs.map(d => ({id: d.id, svg: d.querySelectorAll('.main-svg').length, traces: (d.data || []).length,
    points: (d.data || []).reduce((n, t) => n + (t.y || []).length, 0),
    drawn: [...d.querySelectorAll('.scatterlayer path.js-line')].filter(p => (p.getAttribute('d') || '').length > 2)
             .length + d.querySelectorAll('.scatterlayer .point, .barlayer .point').length}));
})()"""


def find_chromium() -> str | None:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            try:
                ok = subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if ok and cmd[1] == "install":
                break
        exe = shutil.which("chromium")
    return exe


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no headless Chromium (/usr/bin/chromium; `apt-get install -y chromium` not possible here): "
                    "the report's browser test is skipped")
    with Chromium(exe, tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


def empty_plots(stats: list[dict]) -> list[str]:
    return [s["id"] for s in stats if not (s["svg"] and s["traces"] and s["points"] and s["drawn"])]


def test_report_opens_with_every_plot_drawn(browser, tmp_path):
    page = os.environ.get("THINKRL_REPORT_HTML")
    if page:
        expected = None
    else:
        runs = [make_sft_run(tmp_path / "a" / "sft"), make_rl_run(tmp_path / "a" / "rl"),
                make_rl_run(tmp_path / "b" / "rl", steps=12)]
        page = write_report(runs, tmp_path / "report.html")
        expected = len(figures([load_run(r) for r in runs])[0])
    errors = browser.open(Path(page).resolve().as_uri())
    stats = browser.evaluate(PLOT_CHECK)
    errors += browser.errors()
    assert errors == []
    assert stats and (expected is None or len(stats) == expected)
    assert empty_plots(stats) == []
    png = browser.screenshot(scale=0.7)  # the whole page, 980 px wide
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    shot = Path(os.environ.get("THINKRL_REPORT_SCREENSHOT") or tmp_path / "report.png")
    shot.write_bytes(png)


def test_the_check_sees_errors_and_empty_plots(browser, tmp_path):
    """The same checks on a page with a console error, an exception and an empty plot: all three are caught."""
    from plotly.offline import get_plotlyjs

    bad = tmp_path / "bad.html"
    bad.write_text(f"<html><head><script>{get_plotlyjs()}</script></head><body>"
                   "<div id='full' class='plotly-graph-div'></div><div id='empty' class='plotly-graph-div'></div>"
                   "<script>Plotly.newPlot('full', [{x: [1, 2], y: [3, 4]}]); Plotly.newPlot('empty', []);"
                   "console.error('broken'); notDefined();</script></body></html>")
    errors = browser.open(bad.as_uri())
    stats = browser.evaluate(PLOT_CHECK)
    errors += browser.errors()
    assert any("broken" in e for e in errors) and any("notDefined" in e for e in errors)
    assert empty_plots(stats) == ["empty"]
