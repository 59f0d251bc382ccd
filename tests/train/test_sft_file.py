"""`thinkrl sft` on chat-format data files (data.sft_path): the same training as the task's demonstrations when
the file holds them, prompt/response rows, LoRA (only adapters train; resume continues them exactly), evaluation
every eval.sft_every steps, and bad files stopping with one line before anything trains."""
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main
from thinkrl.config import load_config
from thinkrl.system.setup import build_run
from thinkrl.system.train import train_sft, write_teacher_file

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "data.num_train=48", "data.num_eval=8", "log.progress=false",
        "run.threads=1", "train.sft_steps=4", "train.sft_batch_size=8", "train.sft_lr=0.01", "eval.k=0",
        "rollout.max_new_tokens=16"]


def _cfg(out, *extra):
    return load_config(None, [*TINY, f"run.output_dir={out}", *extra])


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _teacher_file(cfg, path, prompt_response=False):
    """The task's demonstrations on the run's training problems, in its order, as a chat-format file: the
    quickstart's (write_teacher_file), or written here as prompt/response rows."""
    run = build_run(cfg)
    if not prompt_response:
        written = write_teacher_file(run, path.parent)
        assert written == path.parent / "teacher.jsonl"
        return written
    with path.open("w") as f:
        for s in run.train_samples:
            demo = run.task.demonstration(s, random.Random(0))
            row = ({"prompt": s.prompt, "response": demo} if prompt_response else
                   {"messages": run.task.build_prompt(s) + [{"role": "assistant", "content": demo}]})
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("prompt_response", [False, True], ids=["messages", "prompt-response"])
def test_a_file_of_the_task_demonstrations_trains_exactly_as_the_demonstrations(tmp_path, prompt_response):
    demo_out, file_out = tmp_path / "demo", tmp_path / "file"
    data = _teacher_file(_cfg(demo_out), tmp_path / "teacher.jsonl", prompt_response)
    train_sft(_cfg(demo_out))
    train_sft(_cfg(file_out, f"data.sft_path={data}"))
    a, b = _records(demo_out), _records(file_out)
    assert [r["loss/sft"] for r in a] == [r["loss/sft"] for r in b] and len(a) == 4
    wa = load_file(str(demo_out / "checkpoints" / "step_000004" / "model.safetensors"))
    wb = load_file(str(file_out / "checkpoints" / "step_000004" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_trains_adapters_only_and_resume_continues_them_exactly(tmp_path):
    out = tmp_path / "lora"
    data = _teacher_file(_cfg(out), tmp_path / "teacher.jsonl")
    extra = [f"data.sft_path={data}", "model.lora_r=4", "train.save_every=2", "train.keep_checkpoints=5"]
    cfg = _cfg(out, *extra)
    run = build_run(cfg)
    init = {k: v.clone() for k, v in run.model.state_dict().items()}
    train_sft(cfg, run=run)
    assert not any("lora" in n for n, _ in run.model.named_modules())  # a plain model again, adapters merged in
    final = load_file(str(out / "checkpoints" / "step_000004" / "model.safetensors"))
    assert set(final) <= set(init)  # (lm_head is tied to the embeddings)
    assert all(torch.equal(run.model.state_dict()[k], final[k]) for k in final)
    changed = {k for k in final if not torch.equal(final[k], init[k])}
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    losses = [r["loss/sft"] for r in _records(out)]
    # stopped after the checkpoint of step 2: resume continues from its adapters and optimizer state
    shutil.rmtree(out / "checkpoints" / "step_000004")
    train_sft(_cfg(out, *extra), resume=True)
    assert [r["loss/sft"] for r in _records(out)] == losses
    again = load_file(str(out / "checkpoints" / "step_000004" / "model.safetensors"))
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_evaluation_every_n_sft_steps(tmp_path):
    out = tmp_path / "ev"
    train_sft(_cfg(out, "eval.sft_every=2"))
    recs = _records(out)
    assert [r["step"] for r in recs if "eval/pass@1" in r] == [2, 4]
    assert all(0.0 <= r["eval/pass@1"] <= 1.0 for r in recs if "eval/pass@1" in r)


@pytest.mark.parametrize("content, what", [
    ('{"messages": [{"role": "user", "content": "1+2"}]}\n', ":1: field 'messages' has no assistant message"),
    ('{"text": "1+2"}\n', ":1: field 'messages' missing"),
    ("", ": no rows"),
])
def test_a_bad_file_stops_with_one_line_and_trains_nothing(tmp_path, capsys, content, what):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "run"
    assert main(["sft", *TINY, f"run.output_dir={out}", f"data.sft_path={data}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinkrl sft: error: ") and f"{data}{what}" in err and "\n" not in err
    assert not (out / "checkpoints").exists()


def test_lora_does_not_continue_a_trainer_handed_over(tmp_path, capsys):
    with pytest.raises(ValueError, match="model.lora_r > 0: SFT continues only its own LoRA run"):
        train_sft(_cfg(tmp_path / "x", "model.lora_r=4"), trainer=object())
    assert main(["quickstart", "--control", "-o", str(tmp_path / "qs"), "model.lora_r=4"]) == 2
    assert "quickstart --control: the control continues the SFT run's full-weight trainer" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()
