"""ToolWorkflow (multi-turn tool use) and the calculator task.

A scripted fake engine (deterministic outputs, distinct log-probs per token, a version bump per call)
checks that tokens, loss_mask, logprobs and versions line up exactly; a micro model overfit on one
tool-using episode checks the same mechanics through the real engines (stop strings included).
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from thinkrl.models.micro import build_micro_model
from thinkrl.rollout.multiturn import ToolWorkflow
from thinkrl.rollout.workflow import SingleTurnWorkflow, collect
from thinkrl.tasks import make_task
from thinkrl.tasks.calculator import calculate, parse_number
from thinkrl.types import Generation, Sample, SamplingParams


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


class ScriptedEngine:
    """Answers by looking at the decoded context; ignores stop strings (the workflow must cut)."""

    def __init__(self, tok, script, bump=True):
        self.tok, self.script, self.bump = tok, script, bump
        self.version, self.calls = 0, []

    async def generate(self, input_ids, params, n=1):
        context = self.tok.decode(input_ids, skip_special_tokens=False)
        call = len(self.calls)
        outs = []
        for j in range(n):
            text = self.script(context, j)
            toks = ids(self.tok, text)
            lps = [-(1 + call * 0.1 + j * 0.01 + i * 0.0001) for i in range(len(toks))]
            finish = "stop" if toks and toks[-1] == self.tok.eos_token_id else "length"
            outs.append(Generation(toks, lps, [self.version] * len(toks), finish))
        self.calls.append({"input": list(input_ids), "params": params, "n": n, "outs": outs})
        if self.bump:
            self.version += 1
        return outs


def calc_script(context, j):
    if context.endswith("<|assistant|>"):
        return "Let me see <calc>12*7</calc> this text runs past the tag"
    if context.endswith("<result>84</result>"):
        return " so \\boxed{84}<|end|>"
    raise AssertionError(f"unexpected context {context[-40:]!r}")


def run(engine, wf, sample):
    return asyncio.run(wf.run_episode(engine, sample, group_id="g"))


SAMPLE = Sample(id="s0", prompt="What is 12*7?", answer="84")


def test_masks_logprobs_versions_align_exactly(tok):
    task = make_task("calculator", {}, "calc")
    eng = ScriptedEngine(tok, calc_script)
    wf = ToolWorkflow(task, tok, SamplingParams(max_new_tokens=64), n=1)
    [t] = run(eng, wf, SAMPLE)
    prompt = ids(tok, "<|system|>calc<|end|><|user|>What is 12*7?<|end|><|assistant|>")
    turn1 = ids(tok, "Let me see <calc>12*7</calc>")  # cut right after the closing tag
    span = ids(tok, "<result>84</result>")
    turn2 = ids(tok, " so \\boxed{84}") + [tok.eos_token_id]
    P, A, R, B = len(prompt), len(turn1), len(span), len(turn2)
    assert t.tokens == prompt + turn1 + span + turn2
    assert t.loss_mask == [False] * P + [True] * A + [False] * R + [True] * B
    c0, c1 = eng.calls[0]["outs"][0], eng.calls[1]["outs"][0]
    assert t.logprobs == [0.0] * P + c0.logprobs[:A] + [0.0] * R + c1.logprobs
    assert t.versions == [-1] * P + [0] * A + [-1] * R + [1] * B
    assert t.prompt_len == P and t.group_id == "g" and t.finish == "stop"
    assert t.reward == 1.0 and t.metrics["tool_calls"] == 1 and t.metrics["tool_errors"] == 0 and t.metrics["turns"] == 2
    assert t.metrics["text"] == "Let me see <calc>12*7</calc><result>84</result> so \\boxed{84}"
    # the engine saw exactly the trajectory's prefix, and was asked to stop at the closing tag
    assert eng.calls[1]["input"] == prompt + turn1 + span
    assert "</calc>" in eng.calls[0]["params"].stop and eng.calls[0]["n"] == 1 and eng.calls[1]["n"] == 1
    assert t.num_response_tokens == A + B


def test_no_tool_call_equals_single_turn(tok):
    task = make_task("calculator", {}, "calc")
    script = lambda ctx, j: "\\boxed{84}<|end|>"  # noqa: E731
    params = SamplingParams(max_new_tokens=32)
    [a] = run(ScriptedEngine(tok, script), ToolWorkflow(task, tok, params, n=1), SAMPLE)
    [b] = asyncio.run(SingleTurnWorkflow(task, tok, params, 1).run_episode(ScriptedEngine(tok, script), SAMPLE, "g"))
    assert (a.tokens, a.loss_mask, a.logprobs, a.versions, a.reward) == (b.tokens, b.loss_mask, b.logprobs, b.versions, b.reward)
    assert a.metrics["tool_calls"] == 0


def test_branches_diverge_and_share_group(tok):
    task = make_task("calculator", {}, "calc")

    def script(ctx, j):
        if ctx.endswith("<|assistant|>"):
            return ["<calc>12*7</calc>", "\\boxed{85}<|end|>"][j]
        return "\\boxed{84}<|end|>"

    eng = ScriptedEngine(tok, script, bump=False)
    trajs = run(eng, ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=2), SAMPLE)
    assert [t.reward for t in trajs] == [1.0, 0.0]
    assert [t.metrics["tool_calls"] for t in trajs] == [1, 0]
    assert {t.group_id for t in trajs} == {"g"}
    assert len(eng.calls) == 2 and eng.calls[0]["n"] == 2  # n branches share the first call; one continuation


def test_max_turns_stops_tool_loop(tok):
    task = make_task("calculator", {}, "calc")
    eng = ScriptedEngine(tok, lambda ctx, j: "<calc>1+1</calc>")
    [t] = run(eng, ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=1, max_turns=2), SAMPLE)
    assert len(eng.calls) == 3 and t.metrics["tool_calls"] == 2 and t.metrics["turns"] == 3
    assert t.metrics["text"] == "<calc>1+1</calc><result>2</result>" * 2 + "<calc>1+1</calc>"
    assert t.reward == 0.0


def test_tool_errors_are_results_not_crashes(tok):
    task = make_task("calculator", {}, "calc")

    def script(ctx, j):
        if ctx.endswith("<|assistant|>"):
            return "<calc>1/0</calc>"
        if ctx.endswith("division by zero</result>"):
            return "oops </calc>"  # closing tag without an opening one
        return "\\boxed{0}<|end|>"

    [t] = run(ScriptedEngine(tok, script), ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=1), SAMPLE)
    assert "<result>error: division by zero</result>" in t.metrics["text"]
    assert "<result>error: no opening <calc> tag</result>" in t.metrics["text"]
    assert t.metrics["tool_errors"] == 2

    def boom(arg):
        raise RuntimeError("secret")

    wf = ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=1, tools={"calc": boom}, max_turns=1)
    [t] = run(ScriptedEngine(tok, lambda c, j: "<calc>x</calc>"), wf, SAMPLE)
    assert t.metrics["text"].endswith("<result>error: RuntimeError</result><calc>x</calc>")


def test_total_token_budget(tok):
    task = make_task("calculator", {}, "calc")
    eng = ScriptedEngine(tok, lambda ctx, j: "<calc>1+1</calc>")
    wf = ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=1, max_turns=5, max_total_tokens=40)
    [t] = run(eng, wf, SAMPLE)
    assert t.finish == "length"
    assert all(c["params"].max_new_tokens <= 32 for c in eng.calls)
    assert eng.calls[-1]["params"].max_new_tokens == 40 - (len(eng.calls[-1]["input"]) - t.prompt_len)


def test_chat_mode_tool_message(tok):
    task = make_task("calculator", {}, "calc")
    eng = ScriptedEngine(tok, lambda ctx, j: "\\boxed{84}<|end|>" if ctx.endswith("<|assistant|>") and "<|tool|>" in ctx
                         else "<calc>12*7</calc>")
    [t] = run(eng, ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=1, mode="chat"), SAMPLE)
    P = t.prompt_len
    span = ids(tok, "<|end|><|tool|><result>84</result><|end|><|assistant|>")
    turn1 = ids(tok, "<calc>12*7</calc>")
    assert t.tokens[P:] == turn1 + span + ids(tok, "\\boxed{84}<|end|>")
    assert t.loss_mask[P:] == [True] * len(turn1) + [False] * len(span) + [True] * 11
    assert t.reward == 1.0


class VocabTokenizer:
    """Greedy longest-match over a fixed vocabulary: lets a token run past a closing tag."""

    chat_template = None
    eos_token_id = 0

    def __init__(self, pieces):
        self.vocab = ["<eos>"] + pieces

    def __call__(self, text, add_special_tokens=True):
        out, i = [], 0
        while i < len(text):
            best = max((j for j, p in enumerate(self.vocab) if j and text.startswith(p, i)), key=lambda j: len(self.vocab[j]))
            out.append(best)
            i += len(self.vocab[best])
        return {"input_ids": out}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


def test_cut_when_closing_tag_ends_inside_a_token():
    tok = VocabTokenizer(list("0123456789+*?abcdefghijklmnopqrstuvwxyzW {}\\<>/") + ["<calc>", "</calc> so", "<result>", "</result>"])
    task = make_task("calculator", {}, "calc")
    eng = ScriptedEngine(tok, lambda ctx, j: "<calc>2*3</calc> so more" if not ctx.endswith("</result>") else " \\boxed{6}")
    [t] = run(eng, ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=1), Sample(id="x", prompt="What is 2*3?", answer="6"))
    text = t.metrics["text"]
    assert text == "<calc>2*3</calc> so<result>6</result> \\boxed{6}"  # the token holding the tag is kept whole
    first = eng.calls[0]["outs"][0]
    kept = ids(tok, "<calc>2*3</calc> so")
    assert t.tokens[t.prompt_len: t.prompt_len + len(kept)] == kept == first.tokens[: len(kept)]
    assert t.logprobs[t.prompt_len: t.prompt_len + len(kept)] == first.logprobs[: len(kept)]


def test_bad_arguments(tok):
    task = make_task("calculator", {}, "calc")
    p = SamplingParams()
    with pytest.raises(ValueError, match="mode"):
        ToolWorkflow(task, tok, p, 1, mode="xml")
    with pytest.raises(ValueError, match="tag name"):
        ToolWorkflow(task, tok, p, 1, tools={"a b": calculate})
    with pytest.raises(ValueError, match="result_format"):
        ToolWorkflow(task, tok, p, 1, result_format="<r/>")


# ----------------------------------------------------------------------------- the calculator task


def test_calculator_tool_is_safe_and_exact():
    assert calculate("12*7") == "84" and calculate(" 2 + 3 * 4 ") == "14" and calculate("7/2") == "3.5"
    assert calculate("10/3") == "3.333333"
    assert calculate("__import__('os').system('echo hi')") == "error: Call is not allowed"
    assert calculate("2**100") == "error: ** is not allowed"
    assert calculate("1/0") == "error: division by zero"
    assert calculate("1 +") == "error: not a valid expression"


def test_calculator_reward_and_prompts():
    task = make_task("calculator", {"ops": "*", "min_operands": 2, "max_operands": 2, "few_shot": 2})
    s = task.generate(3, seed=5)
    assert s == task.generate(3, seed=5) and s != task.generate(3, seed=6)
    a, b = (int(x) for x in s[0].meta["expr"].split(" * "))
    assert s[0].answer == str(a * b) and s[0].prompt == f"What is {a} * {b}?"
    assert task.reward(f"... \\boxed{{{a * b}}}", s[0]) == 1.0
    assert task.reward(f"\\boxed{{{a * b}}} then \\boxed{{{a * b + 1}}}", s[0]) == 0.0  # the last box counts
    assert task.reward(f"<result>{a * b}</result>", s[0]) == 0.0  # a tool result alone is not an answer
    big = Sample(id="b", prompt="", answer="1234")
    assert task.reward("\\boxed{1,234}", big) == 1.0 and task.reward("\\boxed{1234.0}", big) == 1.0
    assert task.reward("\\boxed{7/2}", Sample(id="h", prompt="", answer="3.5")) == 1.0
    msgs = task.build_prompt(s[0])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "<calc>" in msgs[2]["content"] and msgs[2]["content"].endswith("\\boxed{%s}." % parse_number(msgs[2]["content"].split("\\boxed{")[1][:-2]))
    assert task.tools and make_task("calculator", {"tool": False}).tools == {}
    for bad in ({"ops": "/"}, {"min_operands": 3, "max_operands": 2}, {"few_shot": 9}, {"max_value": -1}):
        with pytest.raises(ValueError, match="task calculator"):
            make_task("calculator", bad)


# ----------------------------------------------------------------------------- real engines


@pytest.fixture(scope="module")
def memorised(tok):
    """A micro model overfit on one tool-using answer (greedy decoding reproduces it)."""
    torch.manual_seed(0)
    task = make_task("calculator", {}, "calc")
    sample = Sample(id="m", prompt="What is 28 * 67?", answer="1876")
    from thinkrl.data.chat import encode_prompt

    prompt = encode_prompt(tok, task.build_prompt(sample))
    t1, r, t2 = ids(tok, "<calc>28 * 67</calc>"), ids(tok, "<result>1876</result>"), ids(tok, " \\boxed{1876}<|end|>")
    x = torch.tensor([prompt + t1 + r + t2])
    y = torch.tensor([[-100] * len(prompt) + t1 + [-100] * len(r) + t2])
    model = build_micro_model(tok, hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=96, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    try:
        for _ in range(200):
            loss = model(input_ids=x, labels=y).loss
            if loss.item() < 0.03:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), task, sample, (len(prompt), len(t1), len(r), len(t2))


def _engine(kind, model, tok):
    if kind == "hf":
        from thinkrl.rollout.hf import HFEngine

        return HFEngine(model, tok, version=7)
    from thinkrl.rollout.engine import EmbeddedEngine

    return EmbeddedEngine(model, tokenizer=tok, max_seqs=8, max_len=256, version=7)


@pytest.mark.parametrize("kind", ["hf", "embedded"])
def test_real_engine_tool_episode(memorised, tok, kind):
    model, task, sample, (P, A, R, B) = memorised
    engine = _engine(kind, model, tok)
    try:
        wf = ToolWorkflow(task, tok, SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[tok.eos_token_id]), n=2)
        trajs = collect(engine, wf, [sample])
    finally:
        getattr(engine, "close", lambda: None)()
    assert len(trajs) == 2
    for t in trajs:
        assert t.metrics["text"] == "<calc>28 * 67</calc><result>1876</result> \\boxed{1876}"
        assert t.reward == 1.0 and t.metrics["tool_calls"] == 1 and t.finish == "stop"
        assert t.loss_mask == [False] * P + [True] * A + [False] * R + [True] * B
        assert t.versions == [-1] * P + [7] * A + [-1] * R + [7] * B
        # engine log-probs on the model's tokens agree with a teacher-forced forward of the whole sequence
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([t.tokens])).logits[0, :-1].float(), -1)
        ref = lp.gather(-1, torch.tensor(t.tokens[1:])[:, None])[:, 0].tolist()
        for i, (m, got) in enumerate(zip(t.loss_mask, t.logprobs)):
            if m:
                assert abs(got - ref[i - 1]) < 1e-3, (i, got, ref[i - 1])
            else:
                assert got == 0.0


# ----------------------------------------------------------------------------- per-call sampling


def test_with_sampling_keeps_the_tools_and_the_prompt_cache(tok):
    task = make_task("calculator", {}, "calc")
    wf = ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32, temperature=1.0), n=8, max_turns=2)
    greedy = wf.with_sampling(SamplingParams(max_new_tokens=16, temperature=0.0, stop=["STOP"]), 1)
    assert (greedy.n, greedy.params.temperature, greedy.params.stop) == (1, 0.0, ["STOP", "</calc>"])
    assert greedy.max_total_tokens == 16 * 3 and greedy.tools is wf.tools  # budget follows the new params
    assert (wf.n, wf.params.temperature, wf.params.max_new_tokens, wf.max_total_tokens) == (8, 1.0, 32, 96)
    wf.prompt_ids(SAMPLE)
    assert greedy._prompt_cache is wf._prompt_cache
    [t] = run(ScriptedEngine(tok, calc_script), greedy, SAMPLE)
    assert t.reward == 1.0 and t.metrics["tool_calls"] == 1
    with pytest.raises(ValueError, match="n must be >= 1"):
        wf.with_sampling(SamplingParams(), 0)


def test_seeded_branches_continue_with_their_own_seeds(tok):
    task = make_task("calculator", {}, "calc")
    eng = ScriptedEngine(tok, lambda ctx, j: "<calc>1+1</calc>")
    run(eng, ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32, seed=1234), n=3, max_turns=2), SAMPLE)
    first, rest = eng.calls[0], eng.calls[1:]
    assert first["params"].seed == 1234 and first["n"] == 3 and len(rest) == 3 * 2
    assert len({c["params"].seed for c in rest}) == 6  # one seed per (branch, turn)
    again = ScriptedEngine(tok, lambda ctx, j: "<calc>1+1</calc>")
    run(again, ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32, seed=1234), n=3, max_turns=2), SAMPLE)
    assert sorted(c["params"].seed for c in again.calls) == sorted(c["params"].seed for c in eng.calls)  # reproducible
    unseeded = ScriptedEngine(tok, lambda ctx, j: "<calc>1+1</calc>")
    run(unseeded, ToolWorkflow(task, tok, SamplingParams(max_new_tokens=32), n=3, max_turns=2), SAMPLE)
    assert {c["params"].seed for c in unseeded.calls} == {None}  # unseeded requests draw from the engine's RNG
