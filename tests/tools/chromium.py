"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ending
in NUL on file descriptors 3 and 4), with no driver and no Python package: open a page, collect its console
errors and uncaught exceptions, evaluate JavaScript, take a screenshot. Network is off (every host name fails to
resolve), so a page that needs the network shows it as console errors.

    with Chromium("/usr/bin/chromium", tmp_dir) as browser:
        errors = browser.open("file:///.../report.html")
        value = browser.evaluate("document.title")
        png = browser.screenshot()
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import subprocess
import threading
import time


class Chromium:
    def __init__(self, executable: str, profile_dir, width: int = 1400, height: int = 1000, timeout: float = 30.0):
        self.timeout = timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def as_fds_3_and_4():  # in the child, before exec: its end of each pipe as fds 3 (commands) and 4 (replies)
            r, w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             "--disable-background-networking", "--disable-component-update", "--host-resolver-rules=MAP * ~NOTFOUND",
             f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=as_fds_3_and_4, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id, self._replies, self.events = 0, {}, queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self.events.put(msg)
        os.close(self._from_chrome)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._next_id in self._replies, self.timeout):
                raise TimeoutError(f"chromium: no reply to {method} in {self.timeout}s")
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"chromium: {method}: {reply['error'].get('message')}")
        return reply["result"]

    def open(self, url: str) -> list[str]:
        """Navigate and wait for the load event; returns the console errors and uncaught exceptions seen."""
        self.call("Page.navigate", session=True, url=url)
        errors, deadline = [], time.monotonic() + self.timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"chromium: {url} did not load in {self.timeout}s") from None
            if ev.get("method") == "Page.loadEventFired":
                return errors + self.errors()
            errors += self._error(ev)

    def errors(self) -> list[str]:
        """Console errors and exceptions reported since the last look."""
        out = []
        while not self.events.empty():
            out += self._error(self.events.get())
        return out

    @staticmethod
    def _error(ev: dict) -> list[str]:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            return [f"exception: {d.get('exception', {}).get('description') or d.get('text')}"]
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            return ["console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])]
        if m == "Log.entryAdded" and p["entry"]["level"] == "error":
            return [f"log: {p['entry']['text']} {p['entry'].get('url', '')}".strip()]
        return []

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"chromium: {expression[:60]}...: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def screenshot(self, full_page: bool = True, scale: float = 1.0, max_height: int = 16384) -> bytes:
        params = {"format": "png"}
        if full_page:
            h = min(int(self.evaluate("document.documentElement.scrollHeight")), max_height)
            w = int(self.evaluate("document.documentElement.scrollWidth"))
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": w, "height": h, "scale": scale})
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, **params)["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
