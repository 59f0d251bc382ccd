"""Code task and sandbox: extraction, test formats, and adversarial programs (loops, memory, files, cheating)."""
from __future__ import annotations

import os
import time

import pytest

from thinkrl.tasks import make_task
from thinkrl.tasks.code import extract_code, parse_tests
from thinkrl.tasks.sandbox import run_io_tests, run_tests, unshare_available
from thinkrl.types import Sample

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]


def fenced(code: str, lang: str = "python") -> str:
    return f"Here you go:\n```{lang}\n{code}\n```\n"


def test_extract_code_takes_the_last_python_block():
    resp = fenced("x = 1") + "and better:\n" + fenced("x = 2") + fenced("echo hi", "bash")
    assert extract_code(resp).strip() == "x = 2"
    assert extract_code(fenced("y = 3", "")).strip() == "y = 3"  # untagged block as a fallback
    assert extract_code(fenced("y = 3", "") + fenced("z = 4", "py")).strip() == "z = 4"
    assert extract_code("```python\nunclosed = 1\n") is None
    assert extract_code("no code") is None


def test_parse_tests_formats():
    assert parse_tests(["assert f()"]) == ("assert", ["assert f()"], "")
    assert parse_tests({"test_list": ["assert f()"], "test_setup_code": "import math"}) == ("assert", ["assert f()"], "import math")
    assert parse_tests('{"inputs": ["1\\n"], "outputs": ["2\\n"]}') == ("io", [("1\n", "2\n")], "")
    with pytest.raises(ValueError, match="inputs"):
        parse_tests({"inputs": ["1"], "outputs": []})
    with pytest.raises(ValueError):
        parse_tests({"nothing": 1})


def test_reward_is_the_fraction_of_tests_passed():
    task = make_task("code", {"timeout": 2})
    s = Sample(id="add", prompt="Write add(a, b).", answer=ADD_TESTS)
    assert task.reward(fenced("def add(a, b):\n    return a + b"), s) == 0.75  # the last test is wrong on purpose
    assert task.reward(fenced("def add(a, b):\n    return a * b"), s) == 0.25  # only add(2, 2) == 4 holds
    assert task.reward("def add(a, b): return a + b", s) == 0.0  # no code block
    assert task.reward(fenced("def add(a, b) return"), s) == 0.0  # syntax error
    assert "```python" in task.build_prompt(s)[-1]["content"]
    with pytest.raises(ValueError, match="colour"):
        make_task("code", {"colour": 1})


def test_stdin_stdout_tests():
    code = "a, b = map(int, input().split())\nprint(a + b)\nexit()"
    res = run_io_tests(code, [("1 2\n", "3\n"), ("2 2", "4  \n\n"), ("2 2", "5")], timeout=2)
    assert (res.passed, res.total) == (2, 3)
    assert res.details[2] == "fail wrong output"
    s = Sample(id="io", prompt="Add two numbers.", answer={"inputs": ["1 2", "5 5"], "outputs": ["3", "10"]})
    assert make_task("code").reward(fenced(code), s) == 1.0


def test_infinite_loop_scores_zero_within_the_timeout():
    t0 = time.perf_counter()
    res = run_tests("n = 0\nwhile n >= 0:\n    n += 1", ["assert True", "assert True"], timeout=0.5)
    assert res.passed == 0 and res.details == ["setup timeout", "setup timeout"]
    # a loop that swallows the per-test alarm is killed at the wall-clock limit
    stubborn = "n = 0\nwhile True:\n    try:\n        while n >= 0:\n            n += 1\n    except BaseException:\n        pass"
    res = run_tests(stubborn, ["assert True"], timeout=0.5, total_timeout=1.5)
    assert res.passed == 0 and res.status == "timeout"
    assert time.perf_counter() - t0 < 6.0
    # a loop inside one test fails that test only
    res = run_tests("def f(x):\n    while x >= 0:\n        x += 1", ["assert f(-1) is None", "assert f(1) is None"], timeout=0.5)
    assert res.details == ["pass", "timeout"]


def test_huge_memory_scores_zero():
    res = run_tests("x = bytearray(8 << 30)", ["assert len(x) > 0"], memory_mb=256, timeout=2)
    assert res.passed == 0 and res.details == ["setup memory"]


ISOLATION = pytest.mark.parametrize("namespaces", [None, False], ids=["default", "process"])  # the hook in both


@ISOLATION
def test_files_outside_the_work_dir_are_refused(namespaces):
    assert os.path.exists("/etc/passwd")
    res = run_tests("data = open('/etc/passwd').read()", ["assert 'root' in data"], timeout=2, namespaces=namespaces)
    assert res.passed == 0 and res.details == ["setup fail PermissionError"]
    for code in ["import os\nx = os.listdir('/etc')", "import io\nx = io.FileIO('/etc/hostname').read()",
                 "import os\nos.remove('/tmp/thinkrl-not-there')", "open('/tmp/thinkrl-escape.txt', 'w').write('x')",
                 "import os\nos.symlink('/etc/passwd', 'p')"]:
        assert run_tests(code, ["assert True"], timeout=2, namespaces=namespaces).passed == 0, code
    assert not os.path.exists("/tmp/thinkrl-escape.txt")
    # its own directory is fine, and the standard library can be imported
    own = "import json, collections\nopen('a.txt', 'w').write('hi')\ndata = open('a.txt').read()"
    ok = run_tests(own, ["assert data == 'hi'"], timeout=2, namespaces=namespaces)
    assert ok.passed == 1


@ISOLATION
def test_processes_sockets_and_limits_are_refused(namespaces):
    for code in ["import subprocess\nsubprocess.run(['true'])", "import os\nos.fork()", "import os\nos.system('true')",
                 "import socket\nsocket.socket()", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                 "import ctypes\nctypes.CDLL('libc.so.6')"]:
        res = run_tests(code, ["assert True"], timeout=2, namespaces=namespaces)
        assert res.passed == 0 and res.details == ["setup fail PermissionError"], (code, res)


def test_cheating_by_exiting_or_printing_does_not_pass():
    assert run_tests("import os\nos._exit(0)", ["assert True"], timeout=2).passed == 0
    fake = "import sys\nfor i in range(3):\n    print('pass', i)\n    sys.stderr.write(f'{i} pass\\n')"
    assert run_tests(fake, ["assert False"] * 3, timeout=2).passed == 0


@pytest.mark.skipif(not unshare_available(), reason="needs unshare -rn (user + network namespaces)")
def test_code_runs_in_its_own_network_namespace():
    mine = os.readlink("/proc/self/ns/net")
    probe = "import os\nns = os.readlink('/proc/self/ns/net')"
    res = run_tests(probe, [f"assert ns != {mine!r}", "assert ns.startswith('net:')"], timeout=2)
    assert res.details == ["pass", "pass"]
    same = run_tests(probe, [f"assert ns == {mine!r}"], timeout=2, namespaces=False)
    assert same.details == ["pass"]


@pytest.mark.skipif(not unshare_available(), reason="needs unshare")
def test_a_host_that_breaks_the_confinement_falls_back_with_a_warning(monkeypatch):
    import thinkrl.tasks.sandbox as sb

    where = "def confine(job):\n" if os.geteuid() == 0 else "def main():\n"  # userns mode does not call confine
    monkeypatch.setattr(sb, "RUNNER", sb.RUNNER.replace(where, where + "    raise OSError('mount refused here')\n", 1))
    sb.isolation_mode.cache_clear()
    try:
        with pytest.warns(RuntimeWarning) as warned:
            assert sb.isolation_mode() == "process"
        assert "mount refused here" in " ".join(str(w.message) for w in warned)
        with pytest.raises(RuntimeError, match="namespaces=True"):
            run_tests("x = 1", ["assert x == 1"], namespaces=True)
    finally:
        sb.isolation_mode.cache_clear()


def test_runs_from_any_working_directory(tmp_path, monkeypatch):
    # the trainer's directory is covered in the namespaces mode, also when it lies under a covered temp dir
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert run_tests("x = 1", ["assert x == 1"], timeout=2).passed == 1
    monkeypatch.chdir("/")
    assert run_tests("x = 1", ["assert x == 1"], timeout=2).passed == 1
