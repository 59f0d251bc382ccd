"""Run untrusted Python (a model's answer) against unit tests in a limited subprocess.

    res = run_tests(code, ["assert add(1, 2) == 3"], timeout=5)        # assert-style tests
    res = run_io_tests(code, [("1 2\\n", "3\\n")], timeout=5)           # stdin -> stdout tests
    res.passed, res.total, res.fraction, res.status

What is enforced, and how strongly (be honest about it):

* **Kernel-enforced**: a fresh process in its own session/process group, killed as a group
  (SIGKILL) at the wall-clock deadline; ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``
  (file size), ``RLIMIT_NOFILE``, no core dumps; cwd is a fresh temporary directory that is deleted
  afterwards; a minimal environment; ``python -I`` (no user site, no PYTHON* variables). When
  ``unshare -rn`` works on the host (Linux user namespaces), the process also runs in an empty
  network namespace (no network at all) and cannot raise its rlimits again.
* **Best effort (Python level)**: an audit hook (PEP 578), installed before the code runs, refuses
  opening files outside the temp dir and the Python installation (so ``open('/etc/passwd')``
  fails), writing/removing/renaming outside the temp dir, sockets, subprocesses, fork/exec,
  signals to other processes, ``resource.setrlimit`` and most of ``ctypes``. Audit hooks are not a
  security boundary: native extensions and clever introspection can get around them. Not covered:
  reading the Python installation (stdlib, site-packages: allowed on purpose), metadata calls that
  raise no audit event (``os.stat``, ``os.readlink``: a program can probe which paths exist), the
  total disk space written inside the temp dir (only each file is capped), and, without
  ``unshare``, the fact that the code runs as the trainer's user. Untrusted code at scale belongs in a
  container or VM (nsjail, gVisor, Firecracker); this module keeps honest mistakes and casual
  reward hacks (infinite loops, huge allocations, ``os._exit(0)``, printing fake results) from
  hurting training.
* Results travel with a random per-run token written only by the runner, so a program that exits
  early or prints "passed" does not pass. Objects with a rigged ``__eq__`` can still fool
  ``assert f(x) == y`` tests; stdin/stdout tests compare text and are not fooled that way.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

MAX_RESULT_BYTES = 1 << 20


@dataclass
class SandboxResult:
    passed: int
    total: int
    status: str  # "ok" | "timeout" | "crashed" | "error" (could not run at all)
    details: list[str] = field(default_factory=list)  # per test: "pass" or why it failed
    stderr: str = ""
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


@functools.lru_cache(maxsize=1)
def unshare_available() -> bool:
    """True if ``unshare -rn`` (user + network namespace) works here."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_tests(code: str, tests: list[str] | str, timeout: float = 5.0, memory_mb: int = 1024, setup: str = "",
              total_timeout: float | None = None, network_namespace: bool | None = None) -> SandboxResult:
    """Run `code`, then each assert-style test (a statement string) in the same namespace.

    `timeout` is per test (running `code` itself gets one more); a test passes if it raises nothing.
    `total_timeout` (default: ``timeout * (tests + 1) + 2``) is the wall-clock limit of the whole process.
    """
    tests = [tests] if isinstance(tests, str) else list(tests)
    job = {"mode": "assert", "code": code, "setup": setup, "tests": tests}
    return _run(job, len(tests), timeout, memory_mb, total_timeout, network_namespace)


def run_io_tests(code: str, cases: list[tuple[str, str]], timeout: float = 5.0, memory_mb: int = 1024,
                 total_timeout: float | None = None, network_namespace: bool | None = None) -> SandboxResult:
    """Run `code` once per case with the case's stdin; pass if stdout matches (trailing spaces ignored)."""
    cases = [(str(i), str(o)) for i, o in cases]
    return _run({"mode": "io", "code": code, "tests": cases}, len(cases), timeout, memory_mb, total_timeout, network_namespace)


def _allowed_read_roots() -> list[str]:
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(p for k in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(k)))
    return sorted(os.path.realpath(r) for r in roots if r)


def _run(job: dict, total: int, timeout: float, memory_mb: int, total_timeout: float | None,
         network_namespace: bool | None) -> SandboxResult:
    if total == 0:
        return SandboxResult(0, 0, "error", stderr="no tests")
    t0 = time.perf_counter()
    token = secrets.token_hex(16)
    wall = total_timeout if total_timeout else timeout * (total + 1) + 2.0  # code + each test + interpreter start
    with tempfile.TemporaryDirectory(prefix="thinkrl-sbx-") as tmp:
        job.update(token=token, timeout=timeout, memory=memory_mb << 20, cpu=int(wall) + 1,
                   read_roots=_allowed_read_roots(), work=os.path.realpath(tmp))
        with open(os.path.join(tmp, ".job.json"), "w") as f:
            json.dump(job, f)
        cmd = [sys.executable, "-I", "-c", RUNNER]
        use_ns = unshare_available() if network_namespace is None else network_namespace
        if use_ns:
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            return SandboxResult(0, total, "error", stderr=f"could not start python: {e}")
        out, err, timed_out = _collect(proc, wall)
    verdicts: dict[int, str] = {}
    for line in out.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] == token and parts[1].isdigit():
            verdicts.setdefault(int(parts[1]), parts[2] if len(parts) > 2 else "fail")
    details = [verdicts.get(i, "timeout" if timed_out else "not run") for i in range(total)]
    passed = sum(d == "pass" for d in details)
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "crashed")
    return SandboxResult(passed, total, status, details, err.decode("utf-8", "replace")[-2000:], time.perf_counter() - t0)


def _collect(proc: subprocess.Popen, wall: float) -> tuple[bytes, bytes, bool]:
    """Read stdout/stderr (bounded) until exit or deadline; kill the process group either way."""
    deadline = time.monotonic() + wall
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        sel.register(f, selectors.EVENT_READ)
    timed_out = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                if len(buf) < MAX_RESULT_BYTES:
                    buf += chunk[: MAX_RESULT_BYTES - len(buf)]
        if not timed_out:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers too
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out


# The trusted runner, executed as `python -I -c RUNNER` in the temp dir. It reads and deletes the job
# file, sets limits, installs the audit hook, then runs the untrusted code.
RUNNER = r'''
import io, json, os, resource, signal, sys

def main():
    with open(".job.json") as f:
        job = json.load(f)
    os.unlink(".job.json")
    token, mode, timeout = job["token"], job["mode"], float(job["timeout"])
    report_fd = os.dup(1)
    out_fd = os.open("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out_fd, 1)
    os.close(out_fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)

    def report(i, verdict):
        os.write(report_fd, f"{token} {i} {verdict}\n".encode())

    for res, val in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"]),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        try:
            soft, hard = resource.getrlimit(res)
            val = val if hard == resource.RLIM_INFINITY else min(val, hard)
            resource.setrlimit(res, (val, val))
        except (ValueError, OSError):
            pass

    work = job["work"]
    read_roots = tuple(job["read_roots"]) + (work,)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    denied = ("subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
              "os.kill", "os.killpg", "os.setuid", "os.setgid", "os.chroot", "socket.", "resource.setrlimit",
              "resource.prlimit", "sys.addaudithook", "pty.", "winreg.", "webbrowser.")
    path_write = ("os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.symlink", "os.link", "os.chmod",
                  "os.chown", "os.truncate", "os.utime", "os.chdir", "shutil.", "os.chflags", "os.setxattr",
                  "os.removexattr", "os.mkfifo", "os.mknod")
    busy = [False]

    def inside(p, roots):
        if isinstance(p, int):
            return True
        p = os.path.realpath(os.fsdecode(p))
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event.startswith(denied) or (event.startswith("ctypes.") and not (event == "ctypes.dlopen" and args[0] is None)):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open":
                path, _, flags = args
                if path is not None and not inside(path, (work,) if (flags or 0) & write_flags else read_roots):
                    raise PermissionError(f"sandbox: cannot open {path!r}")
            elif event in ("os.listdir", "os.scandir"):
                if args and args[0] is not None and not inside(args[0], read_roots):
                    raise PermissionError(f"sandbox: cannot list {args[0]!r}")
            elif event.startswith(path_write):
                for a in args:
                    if isinstance(a, (str, bytes)) and not inside(a, (work,)):
                        raise PermissionError(f"sandbox: {event} outside the work dir")
        finally:
            busy[0] = False

    class TestTimeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)

    def limited(fn):
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fn()
            return "pass"
        except TestTimeout:
            return "timeout"
        except MemoryError:
            return "memory"
        except SystemExit as e:  # exit() / sys.exit(0) at the end of a script is fine
            return "pass" if e.code in (None, 0) else "fail SystemExit"
        except BaseException as e:
            return "fail " + type(e).__name__
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    code = compile(job.get("setup", "") + "\n" + job["code"], "solution.py", "exec")
    tests = job["tests"]
    del job
    sys.addaudithook(hook)
    if mode == "assert":
        env = {"__name__": "__main__", "__builtins__": __builtins__}
        setup = limited(lambda: exec(code, env))
        for i, t in enumerate(tests):
            if setup != "pass":
                report(i, "setup " + setup)
                continue
            report(i, limited(lambda: exec(compile(t, f"test_{i}", "exec"), env)))
    else:
        for i, (stdin, expected) in enumerate(tests):
            out = io.StringIO()
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()))
            sys.stdout = out
            verdict = limited(lambda: exec(code, {"__name__": "__main__", "__builtins__": __builtins__}))
            sys.stdout = sys.__stdout__
            if verdict == "pass":
                norm = lambda s: "\n".join(line.rstrip() for line in s.strip().splitlines())
                verdict = "pass" if norm(out.getvalue()) == norm(expected) else "fail wrong output"
            report(i, verdict)
    os._exit(0)

main()
'''
