"""`thinkrl bench serve`: `thinkrl serve` under load, on loopback.

The server (`thinkrl serve`, embedded engine, the micro model unless --model is given) runs in its own process
with max_queue = --clients. Phase 1: --clients concurrent clients for --seconds, each sending one request after
another, in turn the OpenAI SDK's completions and chat (streaming and not, the streams with include_usage) and
SGLang-native /generate; every answer must be a 200 with the tokens it announced (`errors` counts the rest).
Phase 2 (overload, --overload-seconds): twice as many clients as the queue holds, on /generate, with the engine
held (`/pause_generation` in_place, so the queue is full whatever the machine's speed); the server must answer the
excess with 503 + Retry-After and stay up (checked after `/continue_generation` with /health and one generation).
Reported: requests, errors, latency p50/p99 (s), completion tokens/s, peak RSS of the server process (MB, its
VmHWM: `peak_rss_mb_load` after phase 1, `peak_rss_mb` after both), the 503 count of the overload phase and
whether the server was up after it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from thinkrl.bench import register_bench

KINDS = ("completions", "completions_stream", "chat", "chat_stream", "generate")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="thinkrl bench serve")
    p.add_argument("--clients", type=int, default=200, help="concurrent clients of phase 1 (also the server's "
                   "max_queue)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of phase 1")
    p.add_argument("--overload-seconds", type=float, default=5.0, help="length of phase 2 (0: skip it)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--model", default="", help="checkpoint directory to serve (default: the micro model)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.clients < 1 or a.seconds <= 0 or a.overload_seconds < 0 or a.max_tokens < 1:
        p.error("--clients, --seconds, --max-tokens must be positive; --overload-seconds >= 0")
    return a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _micro_dir(d: Path) -> str:
    from thinkrl.models.micro import build_micro_model, build_tokenizer
    tok = build_tokenizer()
    build_micro_model(tok, seed=0).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _start_server(model_dir: str, port: int, max_queue: int) -> subprocess.Popen:
    code = ("import sys; from thinkrl.rollout.server import main; "
            f"sys.exit(main(['--model', {model_dir!r}, '--port', '{port}', '--max-queue', '{max_queue}']))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def _wait_up(http, url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"thinkrl serve exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        try:
            if (await http.get(url + "/health")).status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"thinkrl serve did not come up in {timeout:.0f} s")


async def _one(kind: str, oai, http, url: str, model: str, max_tokens: int) -> int:
    """One request of `kind`; returns its completion tokens (raises on anything but a well-formed 200)."""
    msgs = [{"role": "user", "content": "12+30"}]
    usage = {"include_usage": True}
    if kind == "completions":
        r = await oai.completions.create(model=model, prompt="12+30=", max_tokens=max_tokens)
        return r.usage.completion_tokens
    if kind == "completions_stream":
        n, text = None, ""
        async for c in await oai.completions.create(model=model, prompt="12+30=", max_tokens=max_tokens,
                                                    stream=True, stream_options=usage):
            text += "".join(ch.text for ch in c.choices)
            n = c.usage.completion_tokens if c.usage else n
        if n is None:
            raise ValueError("stream ended without its usage chunk")
        return n
    if kind == "chat":
        r = await oai.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens)
        return r.usage.completion_tokens
    if kind == "chat_stream":
        n, done = None, False
        async for c in await oai.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                                         stream=True, stream_options=usage):
            done |= any(ch.finish_reason for ch in c.choices)
            n = c.usage.completion_tokens if c.usage else n
        if n is None or not done:
            raise ValueError("stream ended without its finish_reason or usage chunk")
        return n
    r = await http.post(url + "/generate", json={"text": "12+30=", "sampling_params": {"max_new_tokens": max_tokens},
                                                 "return_logprob": True})
    r.raise_for_status()
    meta = r.json()["meta_info"]
    if len(meta["output_token_logprobs"]) != meta["completion_tokens"]:
        raise ValueError("/generate: log-probs and tokens differ in number")
    return meta["completion_tokens"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _load(a, url: str, model: str, pid: int) -> dict:
    import httpx
    import openai
    limits = httpx.Limits(max_connections=4 * a.clients + 16, max_keepalive_connections=4 * a.clients + 16)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as http:
        oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120,
                                 http_client=httpx.AsyncClient(timeout=120, limits=limits, trust_env=False))
        lat, toks, errors, samples = [], [0], [0], []
        by_kind = dict.fromkeys(KINDS, 0)

        async def client(i: int, end: float):
            k = i
            while time.monotonic() < end:
                kind = KINDS[k % len(KINDS)]
                k += 1
                t0 = time.perf_counter()
                try:
                    n = await _one(kind, oai, http, url, model, a.max_tokens)
                    toks[0] += n  # (not `toks[0] += await ...`: that reads toks[0] before the await)
                    lat.append(time.perf_counter() - t0)
                    by_kind[kind] += 1
                except Exception as e:
                    errors[0] += 1
                    if len(samples) < 5:
                        samples.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")

        t0 = time.monotonic()
        await asyncio.gather(*[client(i, t0 + a.seconds) for i in range(a.clients)])
        wall = time.monotonic() - t0
        res = {"requests": len(lat) + errors[0], "errors": errors[0], "p50_s": round(_pct(lat, 0.5), 4),
               "p99_s": round(_pct(lat, 0.99), 4), "tokens_per_s": round(toks[0] / wall, 1),
               "requests_per_s": round(len(lat) / wall, 1), "by_kind": by_kind, "wall_s": round(wall, 2)}
        if samples:
            res["error_samples"] = samples
        res["peak_rss_mb_load"] = round(_peak_rss_mb(pid), 1)  # before the overload phase
        if a.overload_seconds > 0:
            res["overload"] = await _overload(a, http, url)
        await oai.close()
        return res


async def _overload(a, http, url: str) -> dict:
    """2 x max_queue clients on /generate while the engine is held (/pause_generation in_place: a backend slower
    than its clients, so the queue fills): the excess gets 503 + Retry-After; after /continue_generation the held
    requests complete and the server is up."""
    counts = {"requests": 0, "ok": 0, "rejected_503": 0, "retry_after_missing": 0, "other_errors": 0}

    async def client(end: float):
        while time.monotonic() < end:
            counts["requests"] += 1
            try:
                r = await http.post(url + "/generate", json={"text": "12+30=", "sampling_params": {
                    "max_new_tokens": a.max_tokens}})
            except Exception:
                counts["other_errors"] += 1
                continue
            if r.status_code == 200:
                counts["ok"] += 1
            elif r.status_code == 503:
                counts["rejected_503"] += 1
                counts["retry_after_missing"] += "retry-after" not in r.headers
                await asyncio.sleep(0.2)
            else:
                counts["other_errors"] += 1

    async def release():
        await asyncio.sleep(a.overload_seconds)
        (await http.post(url + "/continue_generation")).raise_for_status()

    (await http.post(url + "/pause_generation", json={"mode": "in_place"})).raise_for_status()
    t0 = time.monotonic()
    await asyncio.gather(release(), *[client(t0 + a.overload_seconds) for _ in range(2 * a.clients)])
    health = (await http.get(url + "/health")).status_code
    r = await http.post(url + "/generate", json={"text": "1+1=", "sampling_params": {"max_new_tokens": 2}})
    return {"clients": 2 * a.clients, **counts, "server_up_after": health == 200 and r.status_code == 200}


@register_bench("serve", help="thinkrl serve under 200 concurrent OpenAI-SDK and SGLang-native clients on loopback")
def bench_serve(argv: list[str]) -> dict:
    a = _args(argv)
    import httpx
    with tempfile.TemporaryDirectory(prefix="thinkrl-bench-serve-") as tmp:
        model_dir = a.model or _micro_dir(Path(tmp) / "micro")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"serve bench: {model_dir} on {url}, {a.clients} clients x {a.seconds:g} s, then overload "
              f"{a.overload_seconds:g} s; cores={os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)
        proc = _start_server(model_dir, port, max_queue=a.clients)
        try:
            async def go():
                async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
                    await _wait_up(http, url, proc)
                    model = (await http.get(url + "/v1/models")).json()["data"][0]["id"]
                return await _load(a, url, model, proc.pid)
            res = asyncio.run(go())
            res.update(peak_rss_mb=round(_peak_rss_mb(proc.pid), 1), server_alive=proc.poll() is None,
                       clients=a.clients, seconds=a.seconds, max_tokens=a.max_tokens, cores=os.cpu_count())
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    o = res.get("overload", {})
    print(f"  {res['requests']} requests, {res['errors']} errors, p50 {res['p50_s']} s, p99 {res['p99_s']} s, "
          f"{res['tokens_per_s']} tokens/s, server peak RSS {res['peak_rss_mb']} MB"
          + (f"; overload: {o['rejected_503']} x 503 of {o['requests']}, up after: {o['server_up_after']}"
             if o else ""))
    return res
