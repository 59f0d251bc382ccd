"""Load a policy: the embedded micro model, a named model, or any local Hugging Face causal-LM directory."""
from __future__ import annotations

from pathlib import Path

import torch

from thinkrl.device import resolve_dtype

# names that resolve to something other than a directory; each maps to a loader function
NAMED_MODELS: dict[str, callable] = {}


def register_model(name: str):
    def deco(fn):
        NAMED_MODELS[name] = fn
        return fn

    return deco


class ModelLoadError(ValueError):
    pass


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(mcfg, device: torch.device | str = "cpu", seed: int = 0):
    """Returns (model, tokenizer) on `device`, in mcfg.dtype, in train mode."""
    path = mcfg.path
    if path == "micro":
        from thinkrl.models.micro import build_micro_model, build_tokenizer

        tok = build_tokenizer()
        model = build_micro_model(
            tok, hidden_size=mcfg.hidden_size, num_layers=mcfg.num_layers, num_heads=mcfg.num_heads,
            num_kv_heads=mcfg.num_kv_heads, intermediate_size=mcfg.intermediate_size,
            max_position=mcfg.max_position, seed=seed,
        )
    elif path in NAMED_MODELS:
        model, tok = NAMED_MODELS[path](mcfg)
    else:
        p = Path(path)
        if not p.is_dir():
            raise ModelLoadError(
                f"model.path={path!r}: not a directory, and not a known name "
                f"(known: micro{', ' if NAMED_MODELS else ''}{', '.join(sorted(NAMED_MODELS))})"
            )
        if not (p / "config.json").exists():
            raise ModelLoadError(f"model.path={path!r}: no config.json there (is it a Hugging Face model directory?)")
        from transformers import AutoModelForCausalLM

        tok = load_tokenizer(str(p))
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(mcfg.dtype))
    model = model.to(device=device, dtype=resolve_dtype(mcfg.dtype))
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok


def load_checkpoint(path: str, device: torch.device | str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a checkpoint directory written by `save_checkpoint`."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{path}: not a checkpoint directory (no config.json)")
    tok = load_tokenizer(str(p))
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(dtype)).to(device)
    return model, tok


from thinkrl.models import smollm2 as _smollm2  # noqa: E402,F401  (registers "smollm2-135m"; imports nothing heavy)
