"""Tool calls run off the rollout's event loop, within task.tool_timeout: a synchronous tool blocked on an Event
does not stop other episodes; past the timeout the model gets ``error: timed out ...`` (counted in tool_timeouts,
tools/timeouts) while the tool's daemon thread is abandoned; async tools get the same timeout; raising tools are
errors. The blocked tools wait on threading.Events the test sets, never on sleeps."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from thinkrl.config import ConfigError, load_config
from thinkrl.rollout.multiturn import ToolWorkflow, tool_metrics
from thinkrl.system.setup import make_workflow
from thinkrl.tasks import make_task
from thinkrl.types import Generation, Sample, SamplingParams, Trajectory

HOLD = 60.0  # how long a blocked tool waits for its gate before it gives up (a failing test then ends, not hangs)


class Engine:
    """The first turn calls <calc> with the sample's prompt as argument; after the tool result it answers."""

    def __init__(self, tok):
        self.tok = tok

    async def generate(self, input_ids, params, n=1):
        ctx = self.tok.decode(input_ids, skip_special_tokens=False)
        text = f"<calc>{ctx.split('<|user|>')[1].split('<|end|>')[0]}</calc>" if ctx.endswith("<|assistant|>") \
            else "\\boxed{1}<|end|>"
        toks = self.tok(text, add_special_tokens=False)["input_ids"]
        return [Generation(toks, [-1.0] * len(toks), [0] * len(toks), "stop") for _ in range(n)]


def _workflow(tok, tools, tool_timeout):
    return ToolWorkflow(make_task("calculator", {}, "calc"), tok, SamplingParams(max_new_tokens=32), n=1,
                        tools=tools, max_turns=1, tool_timeout=tool_timeout)


def _sample(arg: str) -> Sample:
    return Sample(id=arg, prompt=arg, answer="1")


def _blocking_tool():
    """A sync tool: "hang" blocks until `gate` is set (or HOLD passes: then it reports it was never released)."""
    gate, entered = threading.Event(), threading.Event()

    def tool(arg):
        if arg == "hang":
            entered.set()
            return "released" if gate.wait(HOLD) else "never released"
        return f"fast {arg}"

    return tool, gate, entered


def test_a_blocked_sync_tool_does_not_stop_other_episodes(tok):
    tool, gate, entered = _blocking_tool()
    wf = _workflow(tok, {"calc": tool}, tool_timeout=None)  # no limit: the blocked episode waits for its tool

    async def main():
        eng = Engine(tok)
        hung = asyncio.ensure_future(wf.run_episode(eng, _sample("hang")))
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, HOLD)  # its tool is now blocked
        others = await asyncio.gather(*[wf.run_episode(eng, _sample(f"x{i}")) for i in range(3)])
        assert not hung.done()  # the others finished while the tool was still blocked
        gate.set()
        return await hung, others

    try:
        [t], others = asyncio.run(main())
    finally:
        gate.set()
    assert "<result>released</result>" in t.metrics["text"] and t.metrics["tool_timeouts"] == 0
    assert [o[0].metrics["text"].split("<result>")[1].split("</result>")[0] for o in others] == ["fast x0", "fast x1", "fast x2"]


def test_a_sync_tool_past_the_timeout_gives_a_timeout_result_and_its_thread_is_abandoned(tok):
    tool, gate, entered = _blocking_tool()
    wf = _workflow(tok, {"calc": tool}, tool_timeout=0.05)

    async def main():
        eng = Engine(tok)
        return await asyncio.gather(wf.run_episode(eng, _sample("hang")), wf.run_episode(eng, _sample("ok")))

    try:
        [hung], [ok] = asyncio.run(main())  # returns while the tool is still blocked on its gate
        assert entered.wait(HOLD) and not gate.is_set()  # the tool's thread may start after the timeout
        stuck = [th for th in threading.enumerate() if th.name == "thinkrl-tool"]
        assert stuck and all(th.daemon for th in stuck)  # abandoned, and it does not keep the process alive
    finally:
        gate.set()
    assert "<result>error: timed out after 0.05 s</result>" in hung.metrics["text"]
    assert (hung.metrics["tool_timeouts"], hung.metrics["tool_errors"], hung.metrics["tool_calls"]) == (1, 0, 1)
    assert hung.finish == "stop" and hung.metrics["text"].endswith("\\boxed{1}")  # the episode went on
    assert "<result>fast ok</result>" in ok.metrics["text"] and ok.metrics["tool_timeouts"] == 0
    assert tool_metrics([hung, ok]) == {"tools/calls": 2.0, "tools/errors": 0.0, "tools/timeouts": 1.0}


def test_a_pure_python_loop_is_interrupted_at_the_timeout(tok):
    stop, looping = threading.Event(), threading.Event()

    def spin(arg):
        looping.set()
        while not stop.is_set():  # Python bytecode: the timeout's asynchronous exception lands here
            pass
        return "stopped from outside"

    wf = _workflow(tok, {"calc": spin}, tool_timeout=0.05)
    try:
        [t] = asyncio.run(wf.run_episode(Engine(tok), _sample("spin")))
        assert t.metrics["tool_timeouts"] == 1
        for th in [th for th in threading.enumerate() if th.name == "thinkrl-tool"]:
            th.join(HOLD)  # interrupted: its thread ends without `stop`
        assert looping.is_set() and not any(th.name == "thinkrl-tool" and th.is_alive() for th in threading.enumerate())
    finally:
        stop.set()


def test_async_tools_get_the_same_timeout_and_errors_are_results(tok):
    async def hang(arg):
        await asyncio.Event().wait()  # never set

    async def fine(arg):
        return f"async {arg}"

    def boom(arg):
        raise RuntimeError("secret")

    for fn, want, counts in [(hang, "error: timed out after 0.05 s", (1, 0)), (fine, "async a", (0, 0)),
                             (boom, "error: RuntimeError", (0, 1))]:
        [t] = asyncio.run(_workflow(tok, {"calc": fn}, tool_timeout=0.05).run_episode(Engine(tok), _sample("a")))
        assert f"<result>{want}</result>" in t.metrics["text"], fn.__name__
        assert (t.metrics["tool_timeouts"], t.metrics["tool_errors"]) == counts, fn.__name__


def test_tool_metrics_only_for_multi_turn_episodes():
    single = Trajectory(sample_id="s", group_id="g", tokens=[1, 2], loss_mask=[False, True], logprobs=[0.0, -1.0],
                        versions=[-1, 0], reward=0.0, prompt_len=1, metrics={"text": "x", "reward_status": "ok"})
    assert tool_metrics([single]) == {}


def test_task_tool_timeout_is_a_validated_config_field_the_workflow_gets(tok):
    assert load_config(None, []).task.tool_timeout == 10.0
    with pytest.raises(ConfigError, match="task.tool_timeout"):
        load_config(None, ["task.tool_timeout=-1"])
    with pytest.raises(ValueError, match="tool_timeout must be >= 0"):
        _workflow(tok, {"calc": str}, tool_timeout=-1.0)
    cfg = load_config(None, ["task.name=calculator", "task.tool_timeout=2.5"])
    run = SimpleNamespace(task=make_task("calculator", {}, "calc"), tokenizer=tok)
    wf = make_workflow(cfg, run, scorer=object())
    assert isinstance(wf, ToolWorkflow) and wf.tool_timeout == 2.5
    assert make_workflow(load_config(None, ["task.tool_timeout=0"]), run, scorer=object()).tool_timeout is None
