"""The code sandbox under attack: one hostile snippet per test, each contained or a documented limit.

Most attacks first switch the sandbox's audit hook off from inside (`UNHOOK`: it finds the hook's
closure through ``gc``) and then go through libc with ``ctypes``, so what is tested is what the kernel
enforces (namespaces, read-only mounts, the unprivileged uid, rlimits), not the Python-level hook.
Every snippet must score 0, change nothing outside (`outside` checks a canary directory, a project file,
/etc and the shared temp dirs before and after), and leave no process of its uid behind (`attack`).
The limits that a subprocess sandbox cannot close are pinned here as what they are and documented in
docs/real_models.md ("The code sandbox").
"""
from __future__ import annotations

import glob
import hashlib
import os
import secrets
import select
import shutil
import socket
import tempfile
import textwrap
from pathlib import Path

import pytest

from thinkrl.tasks.sandbox import (MAX_PROCESSES, UID_BASE, UID_SPAN, isolation_mode, live_processes, run_io_tests,
                                   run_tests)

pytestmark = pytest.mark.skipif(isolation_mode() != "namespaces",
                                reason="the kernel-level containment needs root and working namespaces (unshare)")

REPO = Path(__file__).resolve().parents[2]
PROJECT_FILE = REPO / "thinkrl" / "tasks" / "code.py"
MARK = "thinkrl-hostile-" + secrets.token_hex(4)  # names the attacks try to create outside

# Switch the audit hook off from inside the sandbox, then get libc: the hook is not a boundary.
UNHOOK = textwrap.dedent("""
    import gc, os, ctypes
    for _o in gc.get_objects():
        if type(_o).__name__ == "function" and _o.__name__ == "hook" and _o.__closure__:
            for _c in _o.__closure__:
                if type(_c.cell_contents) is list and _c.cell_contents == [False]:
                    _c.cell_contents[0] = True
    libc = ctypes.CDLL(None, use_errno=True)
    os.write(2, b"unhooked %d\\n" % libc.getpid())
    def say(*a):
        os.write(2, (" ".join(map(str, a)) + "\\n").encode())
""")


def attack(code: str, bypass: bool = True, tests=("assert solved()",), **kw):
    """Run a hostile snippet; the process tree must be gone afterwards and the hook really off (bypass)."""
    kw.setdefault("timeout", 3.0)  # generous: a busy machine must not turn a memory error into a timeout
    res = run_tests((UNHOOK if bypass else "") + textwrap.dedent(code), list(tests), memory_mb=kw.pop("memory_mb", 256), **kw)
    assert res.isolation == "namespaces" and res.uid is not None
    assert live_processes(res.uid) == [], "processes of the sandbox uid survived the call"
    if bypass:
        assert "unhooked 1" in res.stderr, res.stderr  # the hook was off and libc ran, as pid 1 of its namespace
    assert res.passed == 0, res
    return res


def said(res) -> dict[str, str]:
    """`say(key, outcome)` lines from the snippet's stderr."""
    return dict(line.split(" ", 1) for line in res.stderr.splitlines() if " " in line and not line.startswith("unhooked"))


def _sha(path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        return type(e).__name__


def _sandbox_shm() -> list[str]:
    """SysV shared-memory segments on the host owned by a sandbox uid (there must be none)."""
    rows = [line.split() for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
    return [" ".join(r) for r in rows if len(r) > 7 and r[7].isdigit() and UID_BASE <= int(r[7]) < UID_BASE + UID_SPAN]


@pytest.fixture
def outside():
    """A world-writable canary dir (mode 777, a 666 file) beside the repo, on the host's own filesystem."""
    d = tempfile.mkdtemp(prefix="thinkrl-canary-", dir=REPO.parent)
    os.chmod(d, 0o777)
    canary = Path(d) / "canary.txt"
    canary.write_text("secret-" + secrets.token_hex(8))
    os.chmod(canary, 0o666)

    def state():
        return (sorted(os.listdir(d)), _sha(canary), _sha(PROJECT_FILE), (REPO / MARK).exists(), _sha("/etc/hostname"),
                os.path.exists(f"/etc/{MARK}"), os.path.exists(f"/usr/{MARK}"), sorted(glob.glob(f"/tmp/{MARK}*") + glob.glob(f"/dev/shm/{MARK}*")
                                                        + glob.glob(f"/var/tmp/{MARK}*")), _sandbox_shm())

    before = state()
    try:
        yield Path(d), canary
        assert state() == before, "something changed outside the sandbox"
    finally:
        shutil.rmtree(d)


def test_the_bypass_really_turns_the_hook_off():
    res = run_tests(UNHOOK, ["assert libc.getpid() == 1", "assert os.getuid() >= 2 ** 30", "assert os.getppid() == 0"], timeout=1)
    assert res.details == ["pass", "pass", "pass"] and "unhooked 1" in res.stderr
    assert live_processes(res.uid) == []


def test_reads_outside(outside):
    d, canary = outside
    plain = attack("data = open('/etc/passwd').read()", bypass=False, tests=["assert 'root' in data"])
    assert plain.details == ["setup fail PermissionError"]
    res = attack(f"""
        for key, path in [("project", {str(PROJECT_FILE)!r}), ("root_home", "/root/.bashrc"), ("shadow", "/etc/shadow"),
                          ("passwd", "/etc/passwd"), ("canary", {str(canary)!r}), ("proc_trainer", "/proc/{os.getpid()}/cmdline"),
                          ("system", "/usr/bin/env")]:
            try:
                say(key, "read " + repr(open(path, "rb").read(16)))
            except OSError as e:
                say(key, "denied " + type(e).__name__)
    """)
    out = said(res)
    # its root holds only /usr, the standard library, five devices, its own /proc and its work dir
    assert {k: v.split()[0] for k, v in out.items()} == {"project": "denied", "root_home": "denied", "shadow": "denied",
                                                          "passwd": "denied", "canary": "denied", "proc_trainer": "denied",
                                                          "system": "read"}, out
    assert out["system"] == "read " + repr(Path("/usr/bin/env").read_bytes()[:16])  # documented limit: system files


def test_writes_outside(outside):
    d, canary = outside
    res = attack(f"""
        import os
        targets = {{"canary": {str(canary)!r}, "canary_dir": {str(d / MARK)!r}, "project": {str(PROJECT_FILE)!r},
                   "project_dir": {str(REPO / MARK)!r}, "etc": "/etc/hostname", "etc_new": "/etc/{MARK}",
                   "tmp": "/tmp/{MARK}", "shm": "/dev/shm/{MARK}", "var_tmp": "/var/tmp/{MARK}", "usr": "/usr/{MARK}"}}
        for key, path in targets.items():
            fd = libc.open(path.encode(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)  # no bytes written
            say(key, "opened" if fd >= 0 else "denied " + os.strerror(ctypes.get_errno()))
        for key, fn in [("unlink", lambda: os.unlink({str(canary)!r})), ("rename", lambda: os.rename({str(canary)!r}, "x")),
                        ("chmod", lambda: os.chmod({str(canary)!r}, 0o600)), ("utime", lambda: os.utime({str(canary)!r}, (0, 0))),
                        ("mkdir", lambda: os.mkdir({str(d / MARK)!r}))]:
            try:
                fn()
                say(key, "done")
            except OSError as e:
                say(key, "denied " + e.strerror)
    """)
    out = said(res)
    assert len(out) == 15 and all(v.startswith("denied") for v in out.values()), out
    assert out["usr"] == "denied Read-only file system"  # the system directories are read-only binds
    # its own directory is writable
    ok = run_tests("open('mine.txt', 'w').write('x' * 1000)", ["assert open('mine.txt').read() == 'x' * 1000"], timeout=1)
    assert ok.passed == 1


def test_network_sockets(outside):
    d, _ = outside
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    unix_path = str(d / "s")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen(8)
    try:
        plain = attack(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=0.5)", bypass=False)
        assert plain.details == ["setup fail PermissionError"]
        res = attack(f"""
            import socket
            for key, fam, addr in [("tcp", socket.AF_INET, ("127.0.0.1", {port})), ("unix", socket.AF_UNIX, {unix_path!r}),
                                   ("internet", socket.AF_INET, ("1.1.1.1", 53))]:
                try:
                    s = socket.socket(fam)
                    s.settimeout(0.5)
                    s.connect(addr)
                    say(key, "connected")
                except OSError as e:
                    say(key, "denied " + type(e).__name__)
        """)
        out = said(res)
        # an empty network namespace, and the seccomp filter refuses socket() itself: a world-writable unix
        # socket on the host filesystem would otherwise be reachable (sockets ignore read-only mounts)
        assert all(v == "denied PermissionError" for v in out.values()), out
        assert select.select([server, unix], [], [], 0)[0] == []  # neither listening socket received anything
    finally:
        server.close()
        unix.close()
        os.unlink(unix_path)


def test_fork_bounded_then_fork_bomb(outside):
    # bounded first: 50 sleeping children; RLIMIT_NPROC of the sandbox uid stops it at MAX_PROCESSES - 1
    res = attack("""
        import os, time
        n = 0
        for i in range(50):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
            except OSError as e:
                break
        say("forks", n)
    """)
    assert int(said(res)["forks"]) == MAX_PROCESSES - 1
    plain = attack("import os\nos.fork()", bypass=False)
    assert plain.details == ["setup fail PermissionError"]
    # the real thing: every process forks forever; bounded by the same limit, all gone at the deadline
    bomb = attack("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, total_timeout=1.0)
    assert "timeout" in bomb.details[0]  # the per-test alarm or the wall-clock kill


def test_memory_bomb(outside):
    once = attack("x = bytearray(512 << 20)", bypass=False, memory_mb=256)  # twice the limit, once
    assert once.details == ["setup memory"]
    grow = attack("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", bypass=False, memory_mb=256)
    assert grow.details == ["setup memory"]
    res = attack("""
        libc.mmap.restype = ctypes.c_void_p
        p = libc.mmap(None, ctypes.c_size_t(4 << 30), 3, 0x22, -1, ctypes.c_long(0))  # 4 GiB anonymous, through libc
        say("mmap", "failed" if p in (None, 2 ** 64 - 1) else "mapped")
    """, memory_mb=256)
    assert said(res)["mmap"] == "failed"


def test_infinite_loops(outside):
    c_loop = attack("import itertools\nsum(itertools.count())", bypass=False, total_timeout=1.0)  # one C call: no alarm lands
    assert c_loop.status == "timeout"
    res = attack("""
        import signal
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        libc.alarm(0)
        while True:
            pass
    """, total_timeout=1.0)
    assert res.status == "timeout"


def test_huge_output(outside):
    out = attack("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", bypass=False, total_timeout=3)
    assert out.details == ["setup fail OSError"]  # RLIMIT_FSIZE on the captured stdout file
    err = attack("import os\nwhile True:\n    os.write(2, b'y' * 65536)", bypass=False, total_timeout=1.0)
    assert "timeout" in err.details[0] and len(err.stderr) <= 2000  # drained and capped, not buffered
    fake = attack("""
        import os, secrets
        while True:
            os.write(3, f"{secrets.token_hex(16)} 0 pass\\n".encode() * 100)
    """, total_timeout=1.0)
    assert fake.details[0] in ("not run", "timeout")  # forged verdicts count for nothing; the channel is capped
    files = attack("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'z' * (8 << 20))\n    i += 1", bypass=False, total_timeout=3)
    assert files.details == ["setup fail OSError"]  # the tmpfs work dir is full (ENOSPC), not the host disk


def test_kill_its_parent(outside):
    me, parent = os.getpid(), os.getppid()
    plain = attack("import os\nos.kill(os.getppid(), 9)", bypass=False)
    assert plain.details == ["setup fail PermissionError"]
    res = attack(f"""
        import os
        for key, pid in [("ppid", os.getppid()), ("all", -1), ("group", 0), ("trainer", {me}), ("trainer_parent", {parent})]:
            say(key, libc.kill(pid, 9), os.strerror(ctypes.get_errno()))
    """)
    out = said(res)
    assert out["ppid"].startswith("0 ")  # getppid() is 0: its parent is outside its PID namespace
    assert out["trainer"].startswith("-1 ") and out["trainer_parent"].startswith("-1 ")  # not visible from inside
    assert os.getpid() == me  # still here; and the sandbox's own wrapper answered normally
    assert res.status in ("ok", "crashed")


def test_daemon_left_behind(outside):
    res = attack("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                for s in range(1, 32):
                    try:
                        import signal
                        signal.signal(s, signal.SIG_IGN)
                    except (OSError, ValueError):
                        pass
                time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
        say("daemon", "started")
    """)
    assert said(res)["daemon"] == "started"  # and `attack` checked that no process of its uid is left
    # the runner itself leaves the process group and drops its parent-death signal, then hangs
    escaped = attack("""
        import os, signal, time
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # no per-test timeout: only the wall clock is left
        os.setsid()
        libc.prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG = 0
        time.sleep(60)
    """, total_timeout=1.0)
    assert escaped.status == "timeout"


def test_ctypes_tricks(outside):
    plain = attack("import ctypes\nctypes.CDLL('libc.so.6').getpid()", bypass=False)
    assert plain.details == ["setup fail PermissionError"]
    res = attack("""
        import os
        MS_REMOUNT, MS_BIND = 32, 4096
        say("setuid0", libc.setuid(0))
        say("remount_rw", libc.mount(None, b"/", None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None))
        say("userns", libc.unshare(0x10000000 | 0x20000))  # CLONE_NEWUSER | CLONE_NEWNS: seccomp says no
        r = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
        if r == 0:
            os._exit(0)
        say("clone_userns", r)
        fd = libc.open(b"/etc/hostname", os.O_WRONLY | os.O_APPEND)
        say("write_etc", fd)
        say("shm", libc.shmget(0, 4096, 0o1666))  # IPC_PRIVATE, IPC_CREAT | 0666: dies with its IPC namespace
        say("setrlimit", "raised" if __import__("resource").getrlimit(6)[1] > 16 else "kept")  # RLIMIT_NPROC
    """)
    out = said(res)
    assert out["setuid0"] == "-1" and out["remount_rw"] == "-1"
    assert out["userns"] == "-1" and out["clone_userns"] == "-1" and out["write_etc"] == "-1"
    assert int(out["shm"]) >= 0  # created inside; `outside` checks /proc/sysvipc/shm is unchanged on the host
    assert out["setrlimit"] == "kept"


def test_io_mode_is_confined_the_same_way(outside):
    res = run_io_tests("import os\nprint(os.getuid() >= 2 ** 30, os.getcwd().startswith('/tmp/thinkrl-sbx-'))",
                       [("", "True True")], timeout=1)
    assert res.passed == 1 and res.isolation == "namespaces" and live_processes(res.uid) == []


def test_documented_limit_a_pass_can_be_forged_from_memory():
    # the tests run in the answer's interpreter: it can find the report token and write its own verdicts
    forge = UNHOOK + textwrap.dedent("""
        for _o in gc.get_objects():
            if type(_o).__name__ == "function" and _o.__name__ == "report":
                _o(0, "pass")
    """)
    res = run_tests(forge, ["assert solved()"], timeout=1)
    assert res.passed == 1 and live_processes(res.uid) == []
