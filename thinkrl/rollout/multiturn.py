"""Multi-turn tool use: one episode = generate -> tool call -> tool result -> generate ... -> reward.

The model calls a tool by writing ``<name>argument</name>`` (e.g. ``<calc>12*7</calc>``). Generation stops at
the closing tag (a stop string), the workflow runs ``tools[name](argument)``, appends the result as a span of
non-model tokens, and generation continues from there, up to `max_turns` tool calls. The episode becomes ONE
Trajectory:

    tokens    = prompt | model turn 1 | tool result 1 | model turn 2 | ...
    loss_mask =  False |     True     |     False     |     True     |
    logprobs  =   0.0  |   engine's   |      0.0      |   engine's   |
    versions  =   -1   |   engine's   |      -1       |   engine's   |

Tool results are appended in one of two forms (`mode`):
- ``"inline"``: the raw text ``result_format.format(result)`` (default ``<result>84</result>``) inside the same
  assistant message;
- ``"chat"``: a ``tool`` message via the tokenizer's chat template (the assistant turn is closed, the tool
  message added, and a new assistant turn opened; all of it non-model tokens).

If an engine ignores stop strings and runs past a closing tag, the turn is cut right after the tag (the tokens
the model produced up to there are kept with their log-probs). Tool outputs are capped at `max_result_chars`;
a tool that raises yields ``error: <ExceptionType>``. The reward sees the whole response text (model and tool
spans, special tokens dropped).

    wf = ToolWorkflow(task, tokenizer, SamplingParams(max_new_tokens=64), n=8)   # tools from task.tools
    trajs = collect(engine, wf, samples)
"""
from __future__ import annotations

import asyncio
import inspect
import re
from dataclasses import dataclass, field, replace
from typing import Callable

from thinkrl.rollout.workflow import SingleTurnWorkflow
from thinkrl.tasks.isolation import Scorer
from thinkrl.types import Generation, Sample, SamplingParams, Trajectory

_MARK = "\u0001THINKRL_TOOL_SPLIT\u0001"
_TAG = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass
class _Episode:
    tokens: list[int] = field(default_factory=list)  # response tokens (model + tool spans)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str = "stop"
    calls: int = 0
    errors: int = 0
    turns: int = 0

    def add(self, tokens: list[int], model: bool, logprobs=None, versions=None) -> None:
        self.tokens += tokens
        self.mask += [model] * len(tokens)
        self.logprobs += list(logprobs) if model else [0.0] * len(tokens)
        self.versions += list(versions) if model else [-1] * len(tokens)


class ToolWorkflow(SingleTurnWorkflow):
    """n tool-using episodes per prompt; each is one Trajectory with the model's tokens masked in."""

    def __init__(self, task, tokenizer, params: SamplingParams, n: int, tools: dict[str, Callable] | None = None,
                 max_turns: int | None = None, max_total_tokens: int | None = None, mode: str = "inline",
                 result_format: str = "<result>{}</result>", max_result_chars: int = 200, scorer: Scorer | None = None):
        self.tools = dict(getattr(task, "tools", {}) if tools is None else tools)
        for name, fn in self.tools.items():
            if not isinstance(name, str) or not _TAG.match(name):
                raise ValueError(f"ToolWorkflow: tool name {name!r} must be a tag name (letters, digits, _ or -)")
            if not callable(fn):
                raise ValueError(f"ToolWorkflow: tool {name!r} is not callable")
        self.max_turns = int(getattr(task, "max_turns", 4) if max_turns is None else max_turns)
        if self.max_turns < 0:
            raise ValueError(f"ToolWorkflow: max_turns must be >= 0, got {self.max_turns}")
        if mode not in ("inline", "chat"):
            raise ValueError(f"ToolWorkflow: mode must be 'inline' or 'chat', got {mode!r}")
        if "{}" not in result_format:
            raise ValueError(f"ToolWorkflow: result_format must contain '{{}}', got {result_format!r}")
        self.mode, self.result_format, self.max_result_chars = mode, result_format, max_result_chars
        self._max_total_tokens = max_total_tokens  # None: derived from each params' max_new_tokens
        # the tools and budgets above are set first: _set_sampling (run by the base __init__) reads them
        super().__init__(task, tokenizer, params, n, scorer=scorer)

    def _set_sampling(self, params: SamplingParams, n: int) -> None:
        """Every params this workflow samples with also stops at the tools' closing tags."""
        closes = [f"</{name}>" for name in self.tools]
        super()._set_sampling(replace(params, stop=list(params.stop) + [c for c in closes if c not in params.stop]), n)
        self.max_total_tokens = self._max_total_tokens or params.max_new_tokens * (self.max_turns + 1)

    def turn_params(self, branch: int, turn: int, max_new_tokens: int) -> SamplingParams:
        """Params of a continuation after a tool result. A seeded request gives each (branch, turn) its own
        seed, so the n branches of a seeded episode do not all continue with the same random draws."""
        p = replace(self.params, max_new_tokens=min(self.params.max_new_tokens, max_new_tokens))
        if p.seed is not None:
            p = replace(p, seed=(p.seed * 1_000_003 + branch * 7919 + turn) & 0x7FFFFFFF)
        return p

    # ------------------------------------------------------------------ pieces
    def _first_close(self, text: str) -> tuple[int, str] | None:
        """(end offset, tool name) of the earliest closing tag in `text`."""
        best = None
        for name in self.tools:
            i = text.find(f"</{name}>")
            if i >= 0 and (best is None or i < best[0]):
                best = (i + len(name) + 3, name)
        return best

    def cut_turn(self, gen: Generation) -> tuple[Generation, tuple[str, str] | None]:
        """The turn up to (and including) the token that completes the first closing tag, and the call
        ``(name, argument)`` it ends with (None when the turn holds no closing tag)."""
        dec = self.tokenizer.decode
        text = dec(gen.tokens, skip_special_tokens=False)
        hit = self._first_close(text)
        if hit is None:
            return gen, None
        end, name = hit
        k = next(k for k in range(1, len(gen.tokens) + 1) if self._first_close(dec(gen.tokens[:k], skip_special_tokens=False)))
        if k < len(gen.tokens):
            gen = Generation(gen.tokens[:k], gen.logprobs[:k], gen.versions[:k], "stop")
        body = text[: end - len(name) - 3]
        start = body.rfind(f"<{name}>")
        arg = body[start + len(name) + 2:] if start >= 0 else None
        return gen, (name, arg)

    async def run_tool(self, name: str, arg: str | None) -> tuple[str, bool]:
        """(result text, ok)."""
        if arg is None:
            return f"error: no opening <{name}> tag", False
        try:
            res = self.tools[name](arg)
            if inspect.isawaitable(res):
                res = await res
        except Exception as e:  # a tool failure is information for the model, not a crash
            return f"error: {type(e).__name__}", False
        res = str(res)
        return res[: self.max_result_chars], not res.startswith("error")

    def result_tokens(self, result: str) -> list[int]:
        """Token ids of the non-model span that carries a tool result."""
        body = self.result_format.format(result)
        if self.mode == "inline":
            text = body
        else:
            msgs = [{"role": "assistant", "content": _MARK}, {"role": "tool", "content": body}]
            full = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if _MARK not in full:
                raise ValueError("ToolWorkflow mode='chat': the chat template dropped the assistant message")
            text = full.split(_MARK, 1)[1]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ episodes
    async def _branch(self, engine, prompt: list[int], gen: Generation, branch: int) -> _Episode:
        ep = _Episode()
        while True:
            gen, call = self.cut_turn(gen)
            ep.turns += 1
            ep.add(gen.tokens, True, gen.logprobs, gen.versions)
            ep.finish = gen.finish
            if call is None or gen.finish == "abort" or ep.calls >= self.max_turns:
                break
            ep.calls += 1
            result, ok = await self.run_tool(*call)
            ep.errors += not ok
            ep.add(self.result_tokens(result), False)
            left = self.max_total_tokens - len(ep.tokens)
            if left <= 0:
                ep.finish = "length"
                break
            gen = (await engine.generate(prompt + ep.tokens, self.turn_params(branch, ep.turns, left), 1))[0]
        return ep

    async def run_episode(self, engine, sample: Sample, group_id: str | None = None) -> list[Trajectory]:
        prompt = self.prompt_ids(sample)
        first = await engine.generate(prompt, self.params, self.n)  # the n branches share the first prefill
        eps = await asyncio.gather(*[self._branch(engine, prompt, g, i) for i, g in enumerate(first)])
        texts = [self.tokenizer.decode(e.tokens, skip_special_tokens=True) for e in eps]
        scored = await self.score(texts, sample)
        P, gid = len(prompt), group_id or sample.id
        return [
            Trajectory(
                sample_id=sample.id, group_id=gid, tokens=prompt + e.tokens, loss_mask=[False] * P + e.mask,
                logprobs=[0.0] * P + e.logprobs, versions=[-1] * P + e.versions, reward=r, finish=e.finish,
                prompt_len=P, metrics={"text": t, "reward_status": status, "tool_calls": e.calls, "tool_errors": e.errors,
                                       "turns": e.turns},
            )
            for e, t, (r, status) in zip(eps, texts, scored)
        ]
