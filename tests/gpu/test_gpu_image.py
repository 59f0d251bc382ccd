"""What `make gpu-check` runs needs nothing beyond the GPU image and the wheels it carries (thinkrl's own
dependencies: fastapi, uvicorn, httpx, plotly): with the optional packages (math-verify, ortools, hypothesis, TRL,
datasets, tensorboard, wandb, ...) unimportable, a tiny quickstart and `bench rl-step --skip-trl` run; with the
carried dependencies unimportable too, `import thinkrl` and the benchmark registry still work (the features that
need them import them lazily). CPU tests: they run in the default suite, not only on a GPU."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

OPTIONAL = ["math_verify", "ortools", "hypothesis", "datasets", "trl", "tensorboard", "wandb", "openai", "ray",
            "accelerate", "flash_attn", "gguf"]
CARRIED = ["fastapi", "uvicorn", "httpx", "plotly", "starlette", "pydantic"]


def _run(code: str, absent: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # a None in sys.modules: `import x` raises ModuleNotFoundError, importlib.util.find_spec(x) says None (absent)
    block = f"import sys\nsys.modules.update(dict.fromkeys({absent!r}))\n"
    return subprocess.run([sys.executable, "-c", block + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_the_blocker_blocks(tmp_path):
    r = _run("import fastapi", ["fastapi"], tmp_path)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and "fastapi" in r.stderr


def test_import_and_the_bench_registry_need_none_of_them(tmp_path):
    r = _run("""
        import thinkrl, thinkrl.cli, thinkrl.quickstart, thinkrl.system.train, thinkrl.rollout.engine
        from thinkrl.bench import registered_benches
        assert {"generate", "train", "rl-step"} <= set(registered_benches())
    """, OPTIONAL + CARRIED, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


def test_quickstart_and_rl_step_run_without_the_optional_packages(tmp_path):
    r = _run("""
        import json, torch
        torch.set_num_threads(1)
        from thinkrl.bench import registered_benches
        from thinkrl.cli import main
        main(["quickstart", "-o", "qs", "train.sft_steps=2", "train.steps=1", "model.hidden_size=32",
              "model.num_layers=1", "data.num_train=64", "data.num_eval=8", "rollout.batch_prompts=2", "rollout.n=2",
              "rollout.max_new_tokens=6", "eval.k=0", "log.progress=false"])
        res = registered_benches()["rl-step"](["--skip-trl", "--steps", "1", "--warmup", "0", "--prompts", "2",
                                               "--n", "2", "--max-new-tokens", "6", "--sft-steps", "1",
                                               "--num-train", "64", "--threads", "1", "--hidden", "32",
                                               "--layers", "1"])
        print(json.dumps({"trl": res["trl"]}))
    """, OPTIONAL, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "qs" / "summary.json").exists()
    assert "skipped" in json.loads(r.stdout.strip().splitlines()[-1])["trl"]
