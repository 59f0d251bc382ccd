#!/usr/bin/env bash
# thinkrl on a CUDA machine in one command (`make gpu-check`), within about 8 minutes:
#   1. installs thinkrl (pip install --no-deps -e .) and the dependencies the image lacks from carried wheels
#      (build/gpu-wheels, made by `make gpu-wheels`), never touching the image's torch;
#   2. the tests marked gpu (tests/gpu): engine log-probs vs the trainer in fp32 and bf16, packed attention
#      (and the kernel it runs), split invariance, RL steps sync and async;
#   3. bench generate / train / rl-step --device cuda on a compute-bound micro model (hidden 1024, 8 layers);
#   4. a shortened quickstart on CUDA (its accuracy and minutes).
# Every log and figure goes under $OUT (default build/gpu-check) as it is produced, so a timeout still leaves the
# finished stages' results; summary.txt gathers the figures. Without CUDA it stops at once and runs nothing.
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET (seconds for all stages, default 450).
# GPU_CHECK_REHEARSE=1 runs every stage on the CPU at toy sizes instead: a check of this script where no GPU is
# lent (its figures are the CPU's and say so: every JSON names its device).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REHEARSE=${GPU_CHECK_REHEARSE:-0}

if [ "$REHEARSE" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu-check: needs a CUDA GPU ($PY: torch.cuda.is_available() is not True here); nothing was run" >&2
  exit 2
fi

OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-450}
WHEELS=build/gpu-wheels
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_BREAK_SYSTEM_PACKAGES=1
START=$SECONDS
: > "$OUT/stages.tsv"

# stage NAME SECONDS CMD...: stdout to $OUT/NAME.out, stderr to $OUT/NAME.err, under the smaller of SECONDS and
# the budget left; one line per stage on the console and in stages.tsv (name, exit status, seconds)
stage() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    echo "gpu-check: $name skipped (budget of ${BUDGET}s spent)"
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/stages.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu-check: $name (at most ${limit}s) ..."
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  rc=$?
  [ "$rc" -eq 124 ] && echo "gpu-check: $name TIMED OUT after ${limit}s (partial output in $OUT/$name.out)"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/stages.tsv"
  echo "gpu-check: $name exit $rc in $((SECONDS - t0))s"
  tail -n 3 "$OUT/$name.err" | sed "s/^/  [$name stderr] /"
  return 0
}

# the last stdout line of a --json benchmark -> NAME.json
keep_json() { tail -n 1 "$OUT/$1.out" 2>/dev/null | "$PY" -c 'import json,sys; json.dump(json.loads(sys.stdin.read()), open(sys.argv[1], "w"), indent=2)' "$OUT/$1.json" 2>/dev/null || echo "gpu-check: $1 wrote no JSON"; }

# ---------------------------------------------------------------- environment and install
"$PY" - > "$OUT/env.json" <<'PY'
import json, platform, torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
               bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
else:
    env.update(gpu=None, rehearsal="GPU_CHECK_REHEARSE=1: every stage on the CPU at toy sizes")
print(json.dumps(env, indent=2))
PY
cat "$OUT/env.json"
TORCH_BEFORE=$("$PY" -c 'import torch; print(torch.__version__, torch.__file__)')

# thinkrl's own dependencies that the image lacks (the list make gpu-wheels downloaded), then thinkrl itself
# without dependencies; setuptools for its build comes from the wheels too
stage install 120 env PY="$PY" WHEELS="$WHEELS" bash -c '
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" $(cat "$WHEELS/packages.txt") &&
    "$PY" -m pip install --no-deps --no-index --find-links "$WHEELS" -e .
  else
    echo "no $WHEELS (run make gpu-wheels on a machine with network, then carry it)" >&2
    "$PY" -m pip install --no-deps --no-build-isolation -e .
  fi'
if ! "$PY" -c 'import thinkrl.cli' >/dev/null 2>&1 || [ "$(cd /tmp && "$PY" -c 'import thinkrl, os; print(os.path.dirname(os.path.dirname(thinkrl.__file__)))' 2>/dev/null)" != "$PWD" ]; then
  echo "gpu-check: thinkrl is not installed from this tree; running it from the tree (PYTHONPATH=$PWD)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
TORCH_AFTER=$("$PY" -c 'import torch; print(torch.__version__, torch.__file__)')
if [ "$TORCH_BEFORE" != "$TORCH_AFTER" ]; then
  echo "gpu-check: torch changed during the install ($TORCH_BEFORE -> $TORCH_AFTER); stopping" >&2
  exit 3
fi
THINKRL=("$PY" -m thinkrl.cli)

# sizes: a compute-bound model on the GPU (~125M parameters); toys in a rehearsal on the CPU
if [ "$REHEARSE" = 1 ]; then
  DEV=cpu TESTS_ENV=(THINKRL_GPU_TESTS_ON_CPU=1)
  MODEL=(--hidden 32 --layers 1 --heads 2 --kv-heads 1 --intermediate 64)
  GEN=(--prompts 2 --n 2 --new-tokens 8 --prompt-len 4:8 --threads 1)
  TRAIN=(--prompts 2 --n 2 --median 8 --max-tokens 256 --repeats 1)
  RL=(--sft-steps 2 --steps 1 --warmup 0 --prompts 2 --n 2 --max-new-tokens 6 --num-train 64 --threads 1)
  QS=(train.sft_steps=5 train.steps=2 model.hidden_size=32 model.num_layers=1 data.num_train=64 data.num_eval=8
      rollout.batch_prompts=2 rollout.n=2 rollout.max_new_tokens=6 eval.k=0)
else
  DEV=cuda TESTS_ENV=()
  MODEL=(--hidden 1024 --layers 8 --heads 16 --kv-heads 8 --intermediate 2816)
  GEN=(--prompts 64 --n 8 --new-tokens 256 --prompt-len 32:128)
  TRAIN=(--prompts 16 --n 8 --median 128 --max-tokens 16384 --repeats 3)
  RL=(--sft-steps 0 --steps 3 --warmup 1 --prompts 16 --n 8 --max-new-tokens 128)  # untrained: every sample is 128 tokens
  QS=(train.steps=60)  # the quickstart's SFT in full, RL for 60 of its 125 steps
fi

# ---------------------------------------------------------------- the gpu tests
stage tests 170 env "${TESTS_ENV[@]}" THINKRL_GPU_REPORT="$OUT/tests" "$PY" -m pytest -m gpu tests/gpu -q -rs -s \
  -p no:cacheprovider --junitxml="$OUT/tests.xml"

# ---------------------------------------------------------------- benchmarks
stage bench_generate_bf16 60 "${THINKRL[@]}" bench generate --device $DEV "${MODEL[@]}" "${GEN[@]}" --dtype bfloat16 --json
keep_json bench_generate_bf16
stage bench_generate_fp32 50 "${THINKRL[@]}" bench generate --device $DEV "${MODEL[@]}" "${GEN[@]}" --dtype float32 --json
keep_json bench_generate_fp32
stage bench_train_bf16 45 "${THINKRL[@]}" bench train --device $DEV "${MODEL[@]}" "${TRAIN[@]}" --bf16 --json
keep_json bench_train_bf16
stage bench_train_fp32 45 "${THINKRL[@]}" bench train --device $DEV "${MODEL[@]}" "${TRAIN[@]}" --json
keep_json bench_train_fp32
TRL=(--skip-trl)  # TRL does not fit the carried wheels (datasets needs pyarrow); used where the image has it
"$PY" -c 'import trl, datasets' >/dev/null 2>&1 && TRL=()
stage bench_rl_step 100 "${THINKRL[@]}" bench rl-step --device $DEV "${MODEL[@]}" "${RL[@]}" "${TRL[@]}" --json
keep_json bench_rl_step

# ---------------------------------------------------------------- a shortened quickstart
stage quickstart 200 "${THINKRL[@]}" quickstart -o "$OUT/quickstart" run.device=$DEV "${QS[@]}" log.progress=false

# ---------------------------------------------------------------- the figures in one place
"$PY" - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def fmt(x):
    return f"{x:.3g}" if isinstance(x, float) else str(x)


env = load("env.json") or {}
print(f"gpu-check on {env.get('gpu')} (torch {env.get('torch')}, CUDA {env.get('cuda')})")
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, s = line.split("\t")
    print(f"  stage {name:22} exit {rc:>7}  {s:>4}s")
for f in sorted((out / "tests").glob("*.json")) if (out / "tests").exists() else []:
    d = json.loads(f.read_text())
    print(f"  test {f.stem}: " + ", ".join(f"{k}={fmt(v)}" for k, v in d.items() if k != "device"))
keys = {"bench_generate": ["engine_tokens_per_s", "hf_tokens_per_s", "ratio", "flops_fraction", "max_abs_logprob_diff",
                           "engine_peak_mem_mb", "params"],
        "bench_train": ["packed_tokens_per_s", "padded_tokens_per_s", "shared_tokens_per_s", "ratio",
                        "shared_prefix_ratio", "packed_attention_ops", "params"],
        "bench_rl_step": ["thinkrl_s_per_step", "thinkrl_gen_s_per_step", "thinkrl_train_s_per_step",
                          "thinkrl_reward_mean", "trl_s_per_step", "ratio", "trl"]}
for name in ("bench_generate_bf16", "bench_generate_fp32", "bench_train_bf16", "bench_train_fp32", "bench_rl_step"):
    d = load(f"{name}.json")
    if d is None:
        print(f"  {name}: no result")
        continue
    ks = keys[name.rsplit("_", 1)[0] if name != "bench_rl_step" else name]
    print(f"  {name}: " + ", ".join(f"{k}={fmt(d[k])}" for k in ks if k in d))
qs = load("quickstart/summary.json")
if qs:
    acc = {k: v for k, v in qs.items() if "accuracy" in k}
    print("  quickstart: " + ", ".join(f"{k}={fmt(v)}" for k, v in acc.items())
          + f", steps={qs.get('steps')}, minutes={qs.get('wall_seconds', float('nan')) / 60:.2f}")
else:
    print("  quickstart: no summary (see quickstart.out / quickstart.err)")
PY
echo "gpu-check: done in $((SECONDS - START))s; everything is under $OUT"
