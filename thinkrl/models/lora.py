"""LoRA via peft: wrap a causal LM so that only low-rank adapters train, and merge them for inference.

    policy = apply_lora(model, cfg.model)       # PeftModel when model.lora_r > 0, else `model` itself
    engine.load_weights(merged_state_dict(policy), version)     # base parameter names, W + (alpha/r)·B·A

`apply_lora` wraps `model` in place (peft swaps its Linear layers for LoRA layers), so an inference engine
that must keep plain base weights needs its own copy of the model made *before* the call (the embedded
engine copies weights into its own buffers at construction; the HF engine needs ``copy.deepcopy(model)``).
`merged_state_dict` never modifies the model: it computes each merged weight out of place, so there is no
drift from repeated merge/unmerge.
"""
from __future__ import annotations

import torch


def is_lora(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(model, mcfg):
    """`model` wrapped with LoRA adapters on `mcfg.lora_target_modules` (only adapters trainable).

    Returns `model` unchanged when `mcfg.lora_r == 0`. Raises ValueError naming the config key when the
    settings are impossible or no target module exists in the model.
    """
    r = int(mcfg.lora_r)
    if r < 0:
        raise ValueError(f"model.lora_r: must be >= 0, got {r}")
    if r == 0:
        return model
    if mcfg.lora_alpha <= 0:
        raise ValueError(f"model.lora_alpha: must be > 0, got {mcfg.lora_alpha}")
    if not 0 <= mcfg.lora_dropout < 1:
        raise ValueError(f"model.lora_dropout: must be in [0, 1), got {mcfg.lora_dropout}")
    targets = list(mcfg.lora_target_modules)
    if not targets:
        raise ValueError("model.lora_target_modules: empty; name the Linear layers to adapt (e.g. q_proj, v_proj)")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("model.lora_r > 0 needs peft: pip install 'thinkrl[lora]'") from None
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        have = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        have = sorted({n.rsplit(".", 1)[-1] for n in have})
        raise ValueError(f"model.lora_target_modules: {', '.join(missing)} not in the model; its Linear layers: {', '.join(have)}")
    config = LoraConfig(r=r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    if getattr(mcfg, "gradient_checkpointing", False):
        wrapped.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    return wrapped


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights an inference engine should run, under the base model's parameter names.

    For a plain model: its state dict (detached). For a PeftModel: every LoRA-adapted weight becomes
    ``W + delta`` with ``delta = scaling · B @ A`` of each active adapter; adapter tensors are left out.
    """
    if not is_lora(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for name, t in base.state_dict().items():
        if ".lora_" in name or name.startswith("lora_"):
            continue
        out[name.replace(".base_layer.", ".")] = t.detach()
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer) or getattr(mod, "merged", False):
            continue  # a merged layer's base weight already holds the delta
        key = f"{name}.weight"
        w = out[key]
        for adapter in mod.active_adapters:
            if adapter in mod.lora_A:
                w = w + mod.get_delta_weight(adapter).to(w.dtype)
        out[key] = w
    return out
