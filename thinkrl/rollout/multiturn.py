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

Tools run off the event loop: a synchronous tool in a daemon thread of its own (one per call), an async tool on
the loop; either is given `tool_timeout` seconds (task.tool_timeout; None or 0: no limit). Past it the model gets
``error: timed out after N s`` and the episode goes on. A thread cannot be killed: a pure-Python tool is
interrupted at the timeout (`call_with_timeout`), one stuck in a C call (or a blocking wait) is abandoned and its
daemon thread stays until the call returns. Each episode counts its `tool_calls`, `tool_errors` (raised, returned
``error...``, or no opening tag) and `tool_timeouts`; `tool_metrics` sums them for a step (tools/*).

    wf = ToolWorkflow(task, tokenizer, SamplingParams(max_new_tokens=64), n=8)   # tools from task.tools
    trajs = collect(engine, wf, samples)
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

from thinkrl.rollout.workflow import SingleTurnWorkflow
from thinkrl.tasks.isolation import RewardTimeout, Scorer, call_with_timeout
from thinkrl.types import Generation, Sample, SamplingParams, Trajectory

_MARK = "\u0001THINKRL_TOOL_SPLIT\u0001"
_TAG = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
log = logging.getLogger(__name__)
_warned: set[str] = set()  # tools whose timeout was logged (once each, per process)


@dataclass
class _Episode:
    tokens: list[int] = field(default_factory=list)  # response tokens (model + tool spans)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str = "stop"
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
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
                 result_format: str = "<result>{}</result>", max_result_chars: int = 200, scorer: Scorer | None = None,
                 tool_timeout: float | None = None):
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
        if tool_timeout is not None and not tool_timeout >= 0:
            raise ValueError(f"ToolWorkflow: tool_timeout must be >= 0 seconds (0 or None: no limit), got {tool_timeout!r}")
        self.tool_timeout = tool_timeout or None
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

    async def run_tool(self, name: str, arg: str | None) -> tuple[str, str]:
        """(result text, status "ok" | "error" | "timeout"); never raises (a tool failure is information for the
        model, not a crash). Runs off the event loop, within `tool_timeout` seconds."""
        if arg is None:
            return f"error: no opening <{name}> tag", "error"
        try:
            res = await asyncio.wait_for(_call_tool(self.tools[name], arg, self.tool_timeout), self.tool_timeout)
        except (asyncio.TimeoutError, RewardTimeout):
            if name not in _warned:
                _warned.add(name)
                log.warning(f"tool <{name}> timed out after {self.tool_timeout:g} s (task.tool_timeout; counted in "
                            "tools/timeouts); a call stuck in C code keeps its thread until it returns")
            return f"error: timed out after {self.tool_timeout:g} s", "timeout"
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a tool calling sys.exit is a failed call too
            return f"error: {type(e).__name__}", "error"
        res = str(res)
        return res[: self.max_result_chars], "error" if res.startswith("error") else "ok"

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
            result, status = await self.run_tool(*call)
            ep.errors += status == "error"
            ep.timeouts += status == "timeout"
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
                                       "tool_timeouts": e.timeouts, "turns": e.turns},
            )
            for e, t, (r, status) in zip(eps, texts, scored)
        ]


async def _call_tool(fn: Callable, arg: str, timeout: float | None):
    """``fn(arg)``: an async tool awaited here, a synchronous one in a daemon thread of its own (`timeout`
    interrupts it there if it is running Python code); an awaitable it returns is awaited too."""
    res = fn(arg) if inspect.iscoroutinefunction(fn) else await _in_thread(fn, arg, timeout)
    if inspect.isawaitable(res):
        res = await res
    return res


def _in_thread(fn: Callable, arg: str, timeout: float | None) -> asyncio.Future:
    """A future of ``fn(arg)`` run in a new daemon thread; the thread's result is dropped if nobody waits any
    more (timed out, cancelled, the loop closed). A daemon thread does not keep the process alive at exit."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def deliver(value, error) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    def work() -> None:
        value = error = None
        try:
            value = call_with_timeout(fn, timeout, arg)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting episode
            error = e
        try:
            loop.call_soon_threadsafe(deliver, value, error)
        except RuntimeError:  # the loop is closed: the episode is gone
            pass

    threading.Thread(target=work, name="thinkrl-tool", daemon=True).start()
    return fut


def tool_metrics(trajs) -> dict[str, float]:
    """``tools/calls``, ``tools/errors`` and ``tools/timeouts`` summed over the multi-turn episodes in `trajs`
    (their metrics from `ToolWorkflow`); {} when none is one."""
    eps = [t.metrics for t in trajs if "tool_calls" in t.metrics]
    if not eps:
        return {}
    return {f"tools/{k}": float(sum(m.get(f"tool_{k}", 0) for m in eps)) for k in ("calls", "errors", "timeouts")}
