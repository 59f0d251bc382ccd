"""The OpenAI-compatible routes of `thinkrl serve` (/v1/models, /v1/completions, /v1/chat/completions), as a mixin
of rollout.server.Server, in the shapes vLLM answers: log-probs with top-N alternatives (`logprobs=N` in
completions: per token a dict of the N most likely plus the sampled token; `logprobs=true, top_logprobs=N` in
chat: `content[i].top_logprobs`), the prompt's log-probs in completions as vLLM gives them (`prompt_logprobs=0`:
each choice's `prompt_logprobs`, None then {token id: {logprob, rank (None here), decoded_token}} per token;
`echo=true` with `max_tokens=0`: the prompt as the text and its log-probs; no alternatives on the prompt side),
token ids on request (`return_token_ids`, vLLM's extension), each choice's `token_versions` (thinkrl's), and
`stream=true`: server-sent events in OpenAI's chunk shapes, then `data: [DONE]` (`stream_options.include_usage`:
a last chunk with the usage). Chunks follow the engine's `generate_stream`: the embedded engine hands over every
token as it is sampled (text that could still become a stop string is held back until it cannot); other engines
give each sample when it is done. An engine error after the first chunk is a last `data: {"error": ...}` event."""
from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import StreamingResponse

from thinkrl.rollout.api_fields import APIError, check_neutral, get_field, get_id_lists, get_str_list
from thinkrl.rollout.base import StreamEvent
from thinkrl.types import Generation


def _event(e) -> str:
    return f"data: {json.dumps(e, separators=(',', ':'), allow_nan=False)}\n\n"


async def sse(events):
    """Server-sent events: `data: {json}` per event (a list, or an async iterator: an APIError in it becomes
    an error event), then `data: [DONE]`."""
    if hasattr(events, "__aiter__"):
        try:
            async for e in events:
                yield _event(e)
        except APIError as e:
            yield _event(e.payload())
    else:
        for e in events:
            yield _event(e)
    yield "data: [DONE]\n\n"


class _TextStream:
    """A choice's text as its tokens arrive: what is safe to send now (nothing that could still turn out to be
    part of a stop string, or an incomplete UTF-8 character), then the rest of its final text."""

    def __init__(self, tokenizer, skip: bool, stops: list[str]):
        self.tokenizer, self.skip, self.stops = tokenizer, skip, [x for x in stops if x]
        self.hold = max((len(x) for x in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0  # characters sent

    def push(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        safe = min([len(text) - self.hold] + [text.find(x) for x in self.stops if x in text])
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        piece = text[self.sent:safe] if safe > self.sent else ""
        self.sent += len(piece)
        return piece

    def finish(self, final: str) -> str:
        piece = final[self.sent:]
        self.sent += len(piece)
        return piece


class OpenAIRoutes:
    """Needs from the class it is mixed into: tokenizer, served_name, model_dir, max_len, sampling(), run(), score(),
    text_of()."""

    def _models(self, req):
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "thinkrl", "root": self.model_dir or self.served_name,
                                            "max_model_len": self.max_len}]}

    def _openai_params(self, body: dict, prompts, max_new: int | None, field: str, top_n: int,
                       score_only: bool = False):
        check_neutral(body)
        n = get_field(body, "n", "int", 1, lo=1, hi=1024)
        if body.get("best_of") not in (None, n):
            raise APIError(400, "best_of: only best_of == n is supported")
        stop_ids = get_field(body, "stop_token_ids", "list", [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise APIError(400, "stop_token_ids: expected a list of ints")
        params = self.sampling(prompts, max_new, get_field(body, "temperature", "float", 1.0, lo=0),
                               get_field(body, "top_p", "float", 1.0, hi=1), get_field(body, "top_k", "int", 0, lo=-1),
                               get_str_list(body, "stop"), stop_ids, get_field(body, "seed", "int", None), field,
                               top_n, score_only)
        return params, n

    @staticmethod
    def _stream_options(body: dict) -> tuple[bool, bool]:
        """(stream, include_usage)."""
        stream = get_field(body, "stream", "bool", False)
        opts = get_field(body, "stream_options", "dict", {})
        return stream, stream and get_field(opts, "include_usage", "bool", False, where="stream_options.")

    def _token_str(self, t: int, as_ids: bool) -> str:
        return f"token_id:{t}" if as_ids else self.tokenizer.decode([t])

    @staticmethod
    def _usage(prompts, results) -> dict:
        p, c = sum(len(x) for x in prompts), sum(len(g.tokens) for gens in results for g in gens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # ------------------------------------------------------------------------------------------ completions
    def _completion_logprobs(self, g: Generation, k: slice, as_ids: bool, offset0: int = 0) -> dict:
        """Legacy-completions logprobs of tokens k of g: top_logprobs holds the N most likely and the sampled one."""
        toks = [self._token_str(t, as_ids) for t in g.tokens[k]]
        offsets, at = [], offset0
        for t in toks:
            offsets.append(at)
            at += len(t)
        top = None
        if g.top_logprobs is not None:
            top = []
            for alts, t, lp in zip(g.top_logprobs[k], g.tokens[k], g.logprobs[k]):
                d = {self._token_str(a, as_ids): float(v) for a, v in alts}
                d.setdefault(self._token_str(t, as_ids), float(lp))
                top.append(d)
        return {"tokens": toks, "token_logprobs": [float(x) for x in g.logprobs[k]], "top_logprobs": top,
                "text_offset": offsets}

    def _echo_logprobs(self, prompt: list[int], scored: list[float], as_ids: bool) -> dict:
        """Legacy-completions logprobs of an echoed prompt, as vLLM gives them: the first token's are None."""
        toks = [self._token_str(t, as_ids) for t in prompt]
        offsets = [sum(len(x) for x in toks[:i]) for i in range(len(toks))]
        return {"tokens": toks, "token_logprobs": [None] + [float(v) for v in scored[1:]],
                "top_logprobs": [None] + [{s: float(v)} for s, v in zip(toks[1:], scored[1:])], "text_offset": offsets}

    async def _completions(self, req):
        body = req.json()
        if not isinstance(body, dict):
            raise APIError(400, "request body: expected a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            if not all(texts):
                raise APIError(400, "prompt: empty string")
            prompts = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        elif prompt is None:
            raise APIError(400, "prompt: required field is missing")
        else:
            prompts, _ = get_id_lists(prompt, "prompt")
        lp = get_field(body, "logprobs", "int", None, lo=0, hi=20)
        stream, usage = self._stream_options(body)
        echo = get_field(body, "echo", "bool", False)
        plp = get_field(body, "prompt_logprobs", "int", None, lo=0, hi=20)
        if plp is None and echo:  # vLLM: echo scores the prompt with `logprobs` alternatives
            plp = lp
        max_tokens = get_field(body, "max_tokens", "int", 16)
        if plp or (echo and lp):
            raise APIError(400, "prompt_logprobs: only 0 is supported (each prompt token's own log-prob, no "
                                "alternatives)")
        if (echo or plp is not None) and stream:
            raise APIError(400, "prompt_logprobs / echo: not supported with stream=true")
        if echo and max_tokens != 0:
            raise APIError(400, "echo: supported with max_tokens=0 (scoring the prompt, as vLLM's echo without "
                                "generation)")
        params, n = self._openai_params(body, prompts, max_tokens, "max_tokens", lp or 0,
                                        score_only=echo or plp is not None)
        as_ids = get_field(body, "return_tokens_as_token_ids", "bool", False)
        skip = get_field(body, "skip_special_tokens", "bool", True)
        trim = not get_field(body, "include_stop_str_in_output", "bool", False)
        with_ids = get_field(body, "return_token_ids", "bool", False)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.served_name}
        if stream:
            events = await self._primed(self.stream(prompts, params, n))

            def piece(c: int, ev: StreamEvent, text: str, done: bool) -> list[dict]:
                ch = {"index": c, "text": text, "logprobs": None, "finish_reason": None}
                if lp is not None and ev.tokens:
                    g = Generation(ev.tokens, ev.logprobs, [], "", ev.top_logprobs)
                    ch["logprobs"] = self._completion_logprobs(g, slice(None), as_ids, offsets[c])
                    offsets[c] += sum(len(t) for t in ch["logprobs"]["tokens"])
                out = [{**head, "choices": [ch]}] if text or ev.tokens else []
                if done:
                    g = ev.done
                    last = {"index": c, "text": "", "logprobs": None, "finish_reason": g.finish,
                            "token_versions": list(g.versions)}
                    if with_ids:
                        last.update(token_ids=list(g.tokens), prompt_token_ids=list(prompts[c // n]))
                    out.append({**head, "choices": [last]})
                return out

            offsets = [0] * (len(prompts) * n)
            chunks = self._chunks(events, prompts, params, n, skip, trim, piece, head if usage else None)
            return StreamingResponse(sse(chunks), media_type="text/event-stream")
        scores = await self.score(prompts) if (echo or plp is not None) else [None] * len(prompts)
        results = await self.run(prompts, params, n)
        choices = []
        for i, (prompt_ids, gens, scored) in enumerate(zip(prompts, results, scores)):
            for j, g in enumerate(gens):
                text = self.text_of(g, params, skip, trim)[0]
                choice = {"index": i * n + j, "text": text, "logprobs": None, "finish_reason": g.finish,
                          "token_versions": list(g.versions)}
                if lp is not None:
                    choice["logprobs"] = self._completion_logprobs(g, slice(None), as_ids)
                if plp is not None:  # vLLM's shape: None for the first token, then {id: {logprob, rank, token}}
                    choice["prompt_logprobs"] = [None] + [
                        {str(t): {"logprob": float(v), "rank": None, "decoded_token": self._token_str(t, as_ids)}}
                        for t, v in zip(prompt_ids[1:], scored[1:])]
                if echo:  # the prompt is the text (max_tokens is 0), its log-probs the legacy logprobs
                    choice["text"] = self.tokenizer.decode(prompt_ids, skip_special_tokens=skip)
                    if lp is not None:
                        choice["logprobs"] = self._echo_logprobs(prompt_ids, scored, as_ids)
                if with_ids:
                    choice.update(token_ids=list(g.tokens), prompt_token_ids=list(prompt_ids))
                choices.append(choice)
        return {**head, "choices": choices, "usage": self._usage(prompts, results)}

    @staticmethod
    async def _primed(events):
        """The engine's stream with its first event already awaited: admission (503) and errors before the first
        token are answered as statuses, not inside a 200 stream."""
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None

        async def rest():
            if first is not None:
                yield first
            async for ev in events:
                yield ev
        return rest()

    async def _chunks(self, events, prompts, params, n: int, skip: bool, trim: bool, piece, usage_head):
        """Chunks from (prompt index, StreamEvent)s: `piece(choice, event, text, done)` makes a choice's chunks
        from its new text; the text is held back while it could still become a stop string; usage at the end."""
        texts = [_TextStream(self.tokenizer, skip, params.stop) for _ in range(len(prompts) * n)]
        done: list[Generation] = []
        async for i, ev in events:
            c = i * n + ev.index
            text = texts[c].push(ev.tokens)
            if ev.done is not None:
                text += texts[c].finish(self.text_of(ev.done, params, skip, trim)[0])
                done.append(ev.done)
            for chunk in piece(c, ev, text, ev.done is not None):
                yield chunk
        if usage_head is not None:
            yield {**usage_head, "choices": [], "usage": self._usage(prompts, [done])}

    # ------------------------------------------------------------------------------------------ chat
    def _chat_logprobs(self, g: Generation, k: slice, as_ids: bool, top_n: int) -> dict:
        def entry(t, lp):
            s = self._token_str(t, as_ids)
            return {"token": s, "logprob": float(lp), "bytes": list(s.encode())}
        tops = g.top_logprobs[k] if g.top_logprobs is not None else [[] for _ in g.tokens[k]]
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alts[:top_n]]}
                            for t, lp, alts in zip(g.tokens[k], g.logprobs[k], tops)]}

    async def _chat(self, req):
        body = req.json()
        msgs = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "messages: expected a non-empty list of {role, content}")
        clean = []
        for i, m in enumerate(msgs):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported")
                content = "".join(c["text"] for c in content)
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise APIError(400, f"messages[{i}]: expected {{role: str, content: str}}")
            clean.append({"role": m["role"], "content": content})
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            ids = list(self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
        except Exception as e:
            raise APIError(400, f"messages: the chat template failed: {e}") from None
        if not ids:
            raise APIError(400, "messages: the chat template gave an empty prompt")
        if get_field(body, "echo", "bool", False) or body.get("prompt_logprobs") is not None:
            raise APIError(400, "echo / prompt_logprobs: not supported in chat; score a prompt with /v1/completions")
        want_lp = get_field(body, "logprobs", "bool", False)
        top_n = get_field(body, "top_logprobs", "int", 0, lo=0, hi=20)
        if top_n and not want_lp:
            raise APIError(400, "top_logprobs: needs logprobs=true")
        stream, usage = self._stream_options(body)
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params, n = self._openai_params(body, [ids], get_field(body, field, "int", None), field, top_n)
        as_ids = get_field(body, "return_tokens_as_token_ids", "bool", False)
        skip = get_field(body, "skip_special_tokens", "bool", True)
        with_ids = get_field(body, "return_token_ids", "bool", False)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.served_name}
        if stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            events = await self._primed(self.stream([ids], params, n))
            started = set()

            def piece(j: int, ev: StreamEvent, text: str, done: bool) -> list[dict]:
                out = []
                if j not in started:  # a choice's first chunk: its role
                    started.add(j)
                    out.append({**chunk_head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}]})
                if text or ev.tokens:
                    g = Generation(ev.tokens, ev.logprobs, [], "", ev.top_logprobs)
                    lps = self._chat_logprobs(g, slice(None), as_ids, top_n) if want_lp and ev.tokens else None
                    out.append({**chunk_head, "choices": [{"index": j, "delta": {"content": text}, "logprobs": lps,
                                                           "finish_reason": None}]})
                if done:
                    last = {"index": j, "delta": {}, "logprobs": None, "finish_reason": ev.done.finish,
                            "token_versions": list(ev.done.versions)}
                    if with_ids:
                        last["token_ids"] = list(ev.done.tokens)
                    out.append({**chunk_head, "choices": [last]})
                return out

            chunks = self._chunks(events, [ids], params, n, skip, True, piece, chunk_head if usage else None)
            return StreamingResponse(sse(chunks), media_type="text/event-stream")
        results = await self.run([ids], params, n)
        choices = []
        for j, g in enumerate(results[0]):
            text = self.text_of(g, params, skip)[0]
            choice = {"index": j, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": g.finish, "token_versions": list(g.versions)}
            if want_lp:
                choice["logprobs"] = self._chat_logprobs(g, slice(None), as_ids, top_n)
            if with_ids:
                choice["token_ids"] = list(g.tokens)
            choices.append(choice)
        return {**head, "choices": choices, "usage": self._usage([ids], results)}
