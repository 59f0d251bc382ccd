import torch

from thinkrl.data.chat import encode_example, encode_prompt
from thinkrl.models.micro import build_micro_model, build_tokenizer


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    for text in ["12+345", "7+5=12 4+8+1=13 \\boxed{432}", "a b\nc {}~", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text


def test_chat_template_marks_assistant_tokens():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "\\boxed{3}"}]
    ids, mask = encode_example(tok, msgs)
    assistant = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(assistant) == "\\boxed{3}<|end|>"
    prompt = encode_prompt(tok, msgs[:1])
    assert ids[: len(prompt)] == prompt  # the prompt is a prefix; the mask starts right after it
    assert not any(mask[: len(prompt)]) and all(mask[len(prompt):])
    assert tok.decode(prompt) == "<|user|>1+2<|end|><|assistant|>"


def test_gqa_llama_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([encode_prompt(t2, "12+34")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
    assert t2.chat_template == tok.chat_template
    assert encode_example(t2, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])[1][-2:] == [True, True]
