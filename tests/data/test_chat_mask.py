"""The assistant mask of thinkrl.data.chat.encode_example: from a template's {% generation %} markers, and from
prefix differences for a template without them (OpenPipe ART's fix); both cover exactly the assistant tokens."""
import pytest

from thinkrl.data.chat import encode_example, has_generation_markers, prefix_mask
from thinkrl.models.micro import CHAT_TEMPLATE, build_tokenizer

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2"},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "27+5"},
                {"role": "assistant", "content": "7+5=12 2+1=3 \\boxed{32}"}]


def _spans(ids, mask):
    """The masked tokens as contiguous runs of token ids."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def _unmarked():
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return tok


def test_the_micro_template_has_markers_and_the_stripped_one_has_none():
    assert has_generation_markers(CHAT_TEMPLATE) and has_generation_markers("{%- generation -%}x{% endgeneration %}")
    assert not has_generation_markers(_unmarked().chat_template)


@pytest.mark.parametrize("tok", [build_tokenizer(), _unmarked()], ids=["markers", "no-markers"])
def test_mask_covers_exactly_the_assistant_turns(tok):
    ids, mask = encode_example(tok, CONVERSATION)
    assert len(ids) == len(mask)
    # the character tokenizer: each assistant turn is its characters and the <|end|> token, nothing else
    assert [tok.decode(s) for s in _spans(ids, mask)] == ["3<|end|>", "7+5=12 2+1=3 \\boxed{32}<|end|>"]
    end = tok.convert_tokens_to_ids("<|end|>")
    assert sum(mask) == len("3") + len("7+5=12 2+1=3 \\boxed{32}") + 2 and ids.count(end) == 5
    # the ids are the rendering of the whole conversation
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]


def test_both_templates_give_the_same_ids_and_mask():
    assert encode_example(build_tokenizer(), CONVERSATION) == encode_example(_unmarked(), CONVERSATION)
    assert prefix_mask(build_tokenizer(), CONVERSATION) == encode_example(build_tokenizer(), CONVERSATION)


def test_a_template_that_is_not_prefix_stable_is_one_line():
    tok = build_tokenizer()  # renders only the last message: earlier turns vanish once more follow
    tok.chat_template = ("{{ '<|' + messages[-1]['role'] + '|>' + messages[-1]['content'] + '<|end|>' }}"
                         "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
    with pytest.raises(ValueError, match="not prefix-stable") as e:
        encode_example(tok, CONVERSATION)
    assert "\n" not in str(e.value)


def test_no_chat_template_is_one_line():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_example(tok, CONVERSATION)
