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
    """A model directory that cannot be loaded; the message is one line naming it and what is missing or wrong."""


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_dir(path: str | Path, what: str) -> Path:
    """`path` as a Hugging Face model directory with a config.json and weights, else ModelLoadError (`what` names
    the setting it came from, e.g. "model.path='...'")."""
    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"{what}: not a directory")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{what}: no config.json there (is it a Hugging Face model directory?)")
    if not any(any(p.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ModelLoadError(f"{what}: no weights there (no *.safetensors or pytorch_model*.bin in {p})")
    return p


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no tokenizer files, a malformed tokenizer.json
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(p: Path, dtype: str):
    """The causal LM in `p`; a malformed config or truncated weights is one ModelLoadError line."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # no weights file, a malformed config, bad shapes
        raise ModelLoadError(f"{p}: cannot load the model ({_first_line(e)})") from e
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError (a truncated or corrupt file)
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"{p}: cannot read the weights ({_first_line(e)})") from e


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
        check_model_dir(p, f"model.path={path!r}")
        tok = load_tokenizer(str(p))
        model = _from_pretrained(p, mcfg.dtype)
    model = model.to(device=device, dtype=resolve_dtype(mcfg.dtype))
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok


def load_checkpoint(path: str, device: torch.device | str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a checkpoint directory written by `save_checkpoint`."""
    p = check_model_dir(path, str(path))
    tok = load_tokenizer(str(p))
    model = _from_pretrained(p, dtype).to(device)
    return model, tok


from thinkrl.models import smollm2 as _smollm2  # noqa: E402,F401  (registers "smollm2-135m"; imports nothing heavy)
