"""Imports run one way: cli -> system -> {rollout, train, algo, data, tasks, eval, models} -> types. Nothing below
system (nor the config, the logging sinks, the device and error helpers every layer uses) imports system or cli
(checked on the source, every import statement, top level or inside functions)."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "thinkrl"
LOWER = ["rollout", "train", "algo", "data", "tasks", "eval", "models", "types.py", "config.py", "logs.py", "device.py",
         "errors.py"]
UPPER = ("thinkrl.system", "thinkrl.cli", "thinkrl.quickstart", "thinkrl.bench", "thinkrl.tools")


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("part", LOWER)
def test_no_import_from_below_into_system_or_cli(part):
    files = [PKG / part] if part.endswith(".py") else sorted((PKG / part).rglob("*.py"))
    bad = [f"{f.relative_to(PKG.parent)} imports {m}" for f in files for m in sorted(imports(f))
           if m.startswith(UPPER)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from thinkrl.system.setup import build_run\n")
    assert "thinkrl.system.setup" in imports(f)
