"""`thinkrl bench serve`, short: a few clients for a few seconds against a `thinkrl serve` process, every request
kind answered without error, then an overload phase after which the server is still up."""
import json
import subprocess
import sys


def test_bench_serve_smoke():
    out = subprocess.run([sys.executable, "-m", "thinkrl.cli", "bench", "serve", "--clients", "5", "--seconds", "2",
                          "--overload-seconds", "1", "--max-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["errors"] == 0 and res["requests"] == sum(res["by_kind"].values()) > 0
    assert all(res["by_kind"][k] > 0 for k in ("completions", "completions_stream", "chat", "chat_stream",
                                               "generate"))
    assert res["tokens_per_s"] > 0 and 0 < res["p50_s"] <= res["p99_s"] and res["peak_rss_mb"] > 0
    o = res["overload"]
    assert o["other_errors"] == 0 and o["retry_after_missing"] == 0 and o["server_up_after"] and res["server_alive"]
    assert o["requests"] == o["ok"] + o["rejected_503"] and o["rejected_503"] > 0 and o["ok"] >= 5
