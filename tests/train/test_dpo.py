"""DPO: the losses against hand-computed values, the pair reader's formats and errors, the packed step, and a
`thinkrl dpo` run with exact resume."""
import json
import math

import pytest
import torch

from thinkrl.config import load_config
from thinkrl.data.pairs import encode_pair, parse_pair, read_pairs
from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.train.dpo import PairLogps, _packed_pairs, dpo_step, pair_logps, preference_loss
from thinkrl.train.engine import TrainEngine

T = torch.tensor


def _lp(c, r, cl=(1.0,), rl=(1.0,)):
    return PairLogps(T(c), T(r), T(cl), T(rl))


# ------------------------------------------------------------------------------------------- losses by hand
def test_sigmoid_loss_by_hand():
    # Δ = (−1 − −2) − (−3 − −2) = 1 − (−1) = 2; β = 0.5: l = −log σ(1) = log(1 + e^−1)
    per, rc, rr = preference_loss(_lp([-1.0], [-3.0]), _lp([-2.0], [-2.0]), "sigmoid", 0.5)
    assert float(per) == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert (float(rc), float(rr)) == pytest.approx((0.5, -0.5))
    # conservative DPO: ε = 0.2 mixes in the flipped label's loss −log σ(−1) = log(1 + e)
    per, _, _ = preference_loss(_lp([-1.0], [-3.0]), _lp([-2.0], [-2.0]), "sigmoid", 0.5, label_smoothing=0.2)
    assert float(per) == pytest.approx(0.8 * math.log1p(math.exp(-1)) + 0.2 * math.log1p(math.e), abs=1e-6)


def test_ipo_loss_by_hand_is_length_normalised():
    # ρ_w = 2 over 4 tokens, ρ_l = −1 over 2 tokens: 0.5 − (−0.5) = 1; β = 0.25: (1 − 2)² = 1
    per, _, _ = preference_loss(_lp([0.0], [-3.0], [4.0], [2.0]), _lp([-2.0], [-2.0], [4.0], [2.0]), "ipo", 0.25)
    assert float(per) == pytest.approx(1.0)


def test_simpo_loss_by_hand_ignores_the_reference():
    # mean log-probs −4/4 = −1 and −6/2 = −3: margin 2; β = 1, γ = 0.5: −log σ(1.5)
    pol = _lp([-4.0], [-6.0], [4.0], [2.0])
    per, rc, rr = preference_loss(pol, None, "simpo", 1.0, gamma=0.5)
    assert float(per) == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert (float(rc), float(rr)) == pytest.approx((-1.0, -3.0))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(pol, None, "sigmoid", 0.1)


# ------------------------------------------------------------------------------------------- the pair reader
CHAT = {"id": "a", "prompt": [{"role": "user", "content": "1+2"}], "chosen": [{"role": "assistant", "content": "3"}],
        "rejected": [{"role": "assistant", "content": "4"}], "chosen_model": "big"}


def test_formats_tokenise_like_trl():
    tok = build_tokenizer()
    p = encode_pair(tok, parse_pair(CHAT, "f:1"))
    assert tok.decode(p.prompt) == "<|user|>1+2<|end|><|assistant|>"
    assert (tok.decode(p.chosen), tok.decode(p.rejected)) == ("3<|end|>", "4<|end|>")
    implicit = {"chosen": CHAT["prompt"] + CHAT["chosen"], "rejected": CHAT["prompt"] + CHAT["rejected"]}
    assert encode_pair(tok, parse_pair(implicit, "f:2")) == p
    std = encode_pair(tok, parse_pair({"prompt": "1+2=", "chosen": "3", "rejected": "4"}, "f:3"))
    assert (tok.decode(std.prompt), tok.decode(std.chosen)) == ("1+2=", "3<|end|>")  # TRL appends eos


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "x", "chosen": "a"}, "f.jsonl:1: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "f.jsonl:1: missing field 'prompt'"),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "are the same"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}, "field 'chosen'"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "assistant messages"),
])
def test_bad_rows_stop_with_file_and_line(tmp_path, row, msg):
    f = tmp_path / "f.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=msg.replace("f.jsonl", ".*f.jsonl")):
        read_pairs(f)


def test_empty_file_and_bad_json(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(f)
    f.write_text(json.dumps(CHAT) + "\n{oops\n")
    with pytest.raises(ValueError, match="e.jsonl:2: not valid JSON"):
        read_pairs(f)
    with pytest.raises(FileNotFoundError, match="dpo.path"):
        read_pairs(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------- the packed step
def _pairs(tok, n=6):
    rows = [{"prompt": [{"role": "user", "content": f"{i}+{i + 5}"}],
             "chosen": [{"role": "assistant", "content": f"\\boxed{{{2 * i + 5}}}"}],
             "rejected": [{"role": "assistant", "content": f"\\boxed{{{i}}}"}]} for i in range(n)]
    return rows, [encode_pair(tok, parse_pair(r, str(i))) for i, r in enumerate(rows)]


def _engine(overrides=()):
    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=1)
    cfg = load_config(None, list(overrides))
    return tok, model, cfg, TrainEngine(model, cfg.train, cfg.algo, lr=1e-3, total_steps=10)


def test_pair_logps_equal_an_unpacked_forward():
    tok, model, cfg, tr = _engine()
    _, pairs = _pairs(tok)
    got = pair_logps(tr, pairs)
    for p, (c, r) in zip(pairs, got):
        for comp, val in ((p.chosen, c), (p.rejected, r)):
            ids = torch.tensor([p.prompt + comp])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            want = lp[torch.arange(len(p.prompt) - 1, ids.shape[1] - 1), torch.tensor(comp)].sum()
            assert val == pytest.approx(float(want), abs=1e-4)


def test_split_into_micro_batches_gives_the_same_step():
    """A tight token budget (a pair or two per micro-batch) and one micro-batch for all: the same loss and the
    same gradients (compared before the update: Adam's first step turns a rounding-level gradient into ±lr)."""
    results = []
    for budget in (64, 8192):
        tok, model, cfg, tr = _engine([f"train.max_tokens_per_mb={budget}"])
        _, pairs = _pairs(tok)
        assert (len(_packed_pairs(tr, pairs)) > 1) == (budget == 64)
        ref = pair_logps(tr, pairs)
        m = dpo_step(tr, pairs, ref, cfg.dpo)
        results.append((m["dpo/loss"], [p.grad.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert max(float(a.abs().max()) for a in results[0][1]) > 1e-3  # there is a gradient to compare
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_pair_longer_than_the_budget_is_one_line():
    tok, model, cfg, tr = _engine(["train.max_tokens_per_mb=16"])
    _, pairs = _pairs(tok, 1)
    with pytest.raises(ValueError, match="pair 0: prompt \\+ chosen \\+ rejected is .* more than train.max_tokens_per_mb=16"):
        pair_logps(tr, pairs)


def test_steps_raise_the_margin_and_the_accuracy():
    tok, model, cfg, tr = _engine(["dpo.beta=0.5"])
    _, pairs = _pairs(tok)
    ref = pair_logps(tr, pairs)
    first = dpo_step(tr, pairs, ref, cfg.dpo)
    for _ in range(8):
        last = dpo_step(tr, pairs, ref, cfg.dpo)
    assert first["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-6) and first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert last["dpo/reward_margin"] > 0.5 and last["dpo/reward_acc"] == 1.0 and last["dpo/loss"] < 0.5


# ------------------------------------------------------------------------------------------- thinkrl dpo
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=64", "dpo.batch_size=4", "dpo.lr=1e-3", "log.progress=false"]


def _pair_file(tmp_path, n=6):
    rows, _ = _pairs(build_tokenizer(), n)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_cli_run_and_resume_equal_an_uninterrupted_run(tmp_path):
    from thinkrl.cli import main

    f = _pair_file(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["dpo", *TINY, f"dpo.path={f}", "dpo.steps=4", f"run.output_dir={full}"]) == 0
    assert main(["dpo", *TINY, f"dpo.path={f}", "dpo.steps=4", "train.save_every=2", f"run.output_dir={part}"]) == 0
    import shutil

    shutil.rmtree(part / "checkpoints" / "step_000004")  # as if killed after step 2's checkpoint
    assert main(["dpo", *TINY, f"dpo.path={f}", "dpo.steps=4", "train.save_every=2", f"run.output_dir={part}", "--resume"]) == 0
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("dpo/loss", "dpo/reward_margin", "dpo/reward_acc", "dpo/chosen_logp", "dpo/rejected_logp",
                  "dpo/chosen_reward", "dpo/rejected_reward"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (ra["step"], k)
    assert a[-1]["dpo/reward_margin"] > a[0]["dpo/reward_margin"]


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from thinkrl.cli import main

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    assert main(["dpo", *TINY, f"dpo.path={f}", f"run.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"thinkrl dpo: error: {f}:1: missing field 'rejected' (a pair needs chosen and rejected, and a prompt)"]
    assert not (tmp_path / "r").exists()  # stopped before anything was written
    assert main(["dpo", *TINY, f"run.output_dir={tmp_path / 'r'}"]) == 2
    assert "dpo.path: empty" in capsys.readouterr().err


def test_cli_lora_run_trains_adapters_and_saves_merged_weights(tmp_path):
    from safetensors.torch import load_file

    from thinkrl.cli import main

    f = _pair_file(tmp_path)
    out = tmp_path / "lora"
    assert main(["dpo", *TINY, f"dpo.path={f}", "dpo.steps=3", "model.lora_r=4", f"run.output_dir={out}"]) == 0
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["dpo/reward_margin"] > 0
    w = load_file(next((out / "checkpoints" / "step_000003").glob("*.safetensors")))
    assert not any("lora_" in k for k in w) and "model.layers.0.self_attn.q_proj.weight" in w


def test_sft_coef_adds_the_chosen_token_mean_nll():
    tok, model, cfg, tr = _engine(["dpo.sft_coef=0.5"])
    _, pairs = _pairs(tok)
    ref = pair_logps(tr, pairs)  # at step 0 the policy is the reference: the DPO part is log 2
    m = dpo_step(tr, pairs, ref, cfg.dpo)
    nll = -sum(c for c, _ in ref) / sum(len(p.chosen) for p in pairs)
    assert m["dpo/loss"] == pytest.approx(math.log(2) + 0.5 * nll, abs=1e-5)
