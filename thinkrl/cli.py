"""thinkrl quickstart | train | sft | eval | bench | simulate | puzzles | filter | serve"""
from __future__ import annotations

import argparse
import json
import os
import sys

COMMANDS = {
    "quickstart": "build the micro model, SFT it on an imperfect teacher, RL it, compare (CPU, minutes)",
    "train": "RL training from a config (sync or async)",
    "sft": "supervised fine-tuning on a chat data file (data.sft_path) or a task's demonstrations",
    "generate": "sample K answers per prompt with any engine, keep the verified ones: chat-format JSONL (resumable)",
    "pairs": "delta-learning preference pairs: a stronger model's answers (chosen) vs a weaker one's (rejected)",
    "dpo": "DPO on preference pairs (dpo.path; sigmoid | ipo | simpo), reference log-probs computed once",
    "eval": "pass@k, maj@k, avg@k, lengths and cost of models / a run's checkpoints on held-out problems",
    "bench": "benchmarks (generate, train, rl-step, async); --json for machine-readable output",
    "simulate": "discrete-event model of sync vs async RL throughput",
    "puzzles": "generate task data (temporal-clue puzzles with CP-SAT)",
    "filter": "offline difficulty filter by pass rate (Light-R1)",
    "report": "one self-contained HTML report of run directories (curves, cost frontier, summary table)",
    "serve": "HTTP inference server (SGLang-compatible native API + OpenAI subset)",
}


class CLIError(Exception):
    pass


def _config_parser(name: str, help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"thinkrl {name}", description=help)
    p.add_argument("--config", "-c", action="append", help="YAML config file (repeat to layer, e.g. quickstart + configs/algo/dapo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.lr=1e-5 rollout.n=8")
    return p


def _load(args):
    from thinkrl.config import load_config

    return load_config(args.config, args.overrides)


def cmd_quickstart(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="thinkrl quickstart", description=COMMANDS["quickstart"])
    p.add_argument("--output", "-o", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--control", action="store_true", help="also run more SFT for the RL phase's wall time (matched compute)")
    p.add_argument("--pipeline", help="stages to run, e.g. sft,dpo,rl (DPO on delta pairs between SFT and RL; "
                                      "--control then matches the wall time of every stage after SFT)")
    p.add_argument("--config", "-c", help="config to start from (default: the packaged quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.seed=1 train.steps=50")
    a = p.parse_intermixed_args(argv)
    from thinkrl.quickstart import quickstart

    quickstart(output=a.output, control=a.control, overrides=a.overrides, config=a.config, pipeline=a.pipeline)
    return 0


def cmd_train(argv: list[str]) -> int:
    p = _config_parser("train", COMMANDS["train"])
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    a = p.parse_intermixed_args(argv)
    cfg = _load(a)
    from thinkrl.system.launch import run_train

    res = run_train(cfg, resume=a.resume)  # train.world_size > 1: spawns the data-parallel ranks
    if res is not None:  # under torchrun, ranks other than 0 return None
        print(json.dumps(res))
    return 0


def cmd_sft(argv: list[str]) -> int:
    p = _config_parser("sft", COMMANDS["sft"])
    p.add_argument("--resume", action="store_true", help="continue from the last good checkpoint in run.output_dir")
    a = p.parse_intermixed_args(argv)
    cfg = _load(a)
    from thinkrl.system.rundir import RunDir
    from thinkrl.system.train import train_sft

    rundir = RunDir(cfg.run.output_dir)
    train_sft(cfg, rundir=rundir, resume=a.resume)  # checkpoints every train.save_every steps and at the end
    print(f"saved {rundir.checkpoints()[-1]}")
    return 0


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", "-d", default="train",
                   help="the prompts: train | eval (the config's splits) | a data file (all rows; default train)")
    p.add_argument("--samples", "-k", type=int, default=1, help="answers per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts in flight at a time, flushed after each (default 16)")


def cmd_generate(argv: list[str]) -> int:
    p = _config_parser("generate", COMMANDS["generate"])
    p.add_argument("--model", "-m", required=True, help="checkpoint / HF model directory, 'micro' or a model name "
                   "(rollout.engine=remote: the servers' model; the directory gives the tokenizer)")
    p.add_argument("--output", "-o", required=True, help="JSONL file the kept answers are appended to")
    p.add_argument("--keep", choices=["correct", "all"],
                   help="correct (reward >= algo.correct_threshold; the default when the task has a verifier) | all")
    _generation_args(p)
    a = p.parse_intermixed_args(argv)
    cfg = _load(a)
    from thinkrl.system.generate import generate

    generate(cfg, a.model, a.output, samples=a.samples, keep=a.keep, data=a.data, batch_size=a.batch_size)
    return 0


def cmd_pairs(argv: list[str]) -> int:
    p = _config_parser("pairs", COMMANDS["pairs"])
    p.add_argument("--output", "-o", required=True, help="JSONL of preference pairs (TRL's conversational format)")
    p.add_argument("--chosen", help="generation file of the stronger model")
    p.add_argument("--rejected", help="generation file of the weaker model")
    p.add_argument("--chosen-model", help="the stronger model: generate its answers (OUTPUT.chosen.jsonl) first")
    p.add_argument("--rejected-model", help="the weaker model: generate its answers (OUTPUT.rejected.jsonl) first")
    p.add_argument("--verified", action="store_true", help="keep only pairs with the chosen correct, the rejected wrong")
    _generation_args(p)
    a = p.parse_intermixed_args(argv)
    cfg = _load(a)
    from thinkrl.system.generate import make_pair_file

    make_pair_file(cfg, a.output, chosen=a.chosen, rejected=a.rejected, chosen_model=a.chosen_model,
                   rejected_model=a.rejected_model, samples=a.samples, verified=a.verified, data=a.data,
                   batch_size=a.batch_size)
    return 0


def cmd_dpo(argv: list[str]) -> int:
    p = _config_parser("dpo", COMMANDS["dpo"])
    p.add_argument("--resume", action="store_true", help="continue from the last good checkpoint in run.output_dir")
    a = p.parse_intermixed_args(argv)
    cfg = _load(a)
    from thinkrl.system.dpo import train_dpo
    from thinkrl.system.rundir import RunDir

    train_dpo(cfg, resume=a.resume)  # checkpoints every train.save_every steps and at the end
    print(f"saved {RunDir(cfg.run.output_dir).checkpoints()[-1]}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    p = _config_parser("eval", COMMANDS["eval"])
    p.add_argument("--model", "-m", action="append",
                   help="HF model directory, checkpoint, a run's checkpoints/ (each checkpoint) or a run directory; "
                        "repeatable (default: run.init_from, else model.path)")
    p.add_argument("--output", "-o", help="write DIR/eval.json and DIR/per_problem.jsonl (several models: DIR/<name>/)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON lines instead of a table")
    a = p.parse_intermixed_args(argv)
    cfg = _load(a)
    from thinkrl.system.evaluation import eval_models, format_table

    results = eval_models(cfg, a.model or [cfg.run.init_from or cfg.model.path], output=a.output)
    print("\n".join(json.dumps(r) for r in results) if a.json else format_table(results))
    return 0


def cmd_bench(argv: list[str]) -> int:
    from thinkrl.bench import registered_benches

    benches = registered_benches()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: thinkrl bench NAME [--json] [args]\n\nbenchmarks:")
        for name, fn in sorted(benches.items()):
            print(f"  {name:<10} {getattr(fn, 'help', '')}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in benches:
        raise CLIError(f"unknown benchmark {name!r}; valid: {', '.join(sorted(benches))}")
    as_json = "--json" in rest
    rest = [x for x in rest if x != "--json"]
    res = benches[name](rest)
    if as_json:
        print(json.dumps(res))
    return 0


def _delegate(module: str, attr: str = "main"):
    def run(argv: list[str]) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise CLIError(f"this command is not available: {e}") from None
        return int(getattr(mod, attr)(argv) or 0)

    return run


HANDLERS = {
    "quickstart": cmd_quickstart,
    "train": cmd_train,
    "sft": cmd_sft,
    "generate": cmd_generate,
    "pairs": cmd_pairs,
    "dpo": cmd_dpo,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "simulate": _delegate("thinkrl.tools.simulate"),
    "puzzles": _delegate("thinkrl.tasks.puzzles"),
    "filter": _delegate("thinkrl.tools.filter"),
    "report": _delegate("thinkrl.tools.report"),
    "serve": _delegate("thinkrl.rollout.server"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: thinkrl COMMAND [args]\n\ncommands:")
        for k, v in COMMANDS.items():
            print(f"  {k:<11} {v}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in HANDLERS:
        import difflib

        close = difflib.get_close_matches(cmd, list(HANDLERS), n=1)
        print(f"thinkrl: error: unknown command {cmd!r}" + (f" (did you mean {close[0]!r}?)" if close else ""), file=sys.stderr)
        return 2
    from thinkrl.config import ConfigError
    from thinkrl.errors import RunFault  # a run stopped by a fault (NaN steps, the engine process gone, a full disk)

    try:
        return HANDLERS[cmd](rest)
    except (ConfigError, CLIError, ValueError, FileNotFoundError, KeyError, RunFault) as e:
        if os.environ.get("THINKRL_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"thinkrl {cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"thinkrl {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
