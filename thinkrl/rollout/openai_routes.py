"""The OpenAI-compatible routes of `thinkrl serve` (/v1/models, /v1/completions, /v1/chat/completions), as a mixin
of rollout.server.Server, in the shapes vLLM answers: log-probs with top-N alternatives (`logprobs=N` in
completions: per token a dict of the N most likely plus the sampled token; `logprobs=true, top_logprobs=N` in
chat: `content[i].top_logprobs`), token ids on request (`return_token_ids`, vLLM's extension), each choice's
`token_versions` (thinkrl's), and `stream=true`: server-sent events, one chunk per token in OpenAI's chunk
shapes, then `data: [DONE]` (`stream_options.include_usage`: a last chunk with the usage). The engines return
whole generations, so a choice's chunks are sent together once it is complete: the wire format of streaming,
not its latency."""
from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import StreamingResponse

from thinkrl.rollout.api_fields import APIError, check_neutral, get_field, get_id_lists, get_str_list
from thinkrl.types import Generation


async def sse(events):
    """Server-sent events: `data: {json}` per event, then `data: [DONE]`."""
    for e in events:
        yield f"data: {json.dumps(e, separators=(',', ':'), allow_nan=False)}\n\n"
    yield "data: [DONE]\n\n"


class OpenAIRoutes:
    """Needs from the class it is mixed into: tokenizer, served_name, model_dir, max_len, sampling(), run(),
    text_of()."""

    def _models(self, req):
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "thinkrl", "root": self.model_dir or self.served_name,
                                            "max_model_len": self.max_len}]}

    def _openai_params(self, body: dict, prompts, max_new: int | None, field: str, top_n: int):
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
                               top_n)
        return params, n

    @staticmethod
    def _stream_options(body: dict) -> tuple[bool, bool]:
        """(stream, include_usage)."""
        stream = get_field(body, "stream", "bool", False)
        opts = get_field(body, "stream_options", "dict", {})
        return stream, stream and get_field(opts, "include_usage", "bool", False, where="stream_options.")

    def _token_str(self, t: int, as_ids: bool) -> str:
        return f"token_id:{t}" if as_ids else self.tokenizer.decode([t])

    def _pieces(self, tokens: list[int], text: str, skip: bool) -> list[str]:
        """`text` (the choice's final text) split over its tokens, for streaming: piece k is what token k adds."""
        out, prev = [], 0
        for k in range(len(tokens)):
            cur = max(prev, min(len(self.tokenizer.decode(tokens[: k + 1], skip_special_tokens=skip)), len(text)))
            out.append(text[prev:cur])
            prev = cur
        if out:
            out[-1] += text[prev:]
        return out

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
        params, n = self._openai_params(body, prompts, get_field(body, "max_tokens", "int", 16), "max_tokens",
                                        lp or 0)
        as_ids = get_field(body, "return_tokens_as_token_ids", "bool", False)
        skip = get_field(body, "skip_special_tokens", "bool", True)
        trim = not get_field(body, "include_stop_str_in_output", "bool", False)
        with_ids = get_field(body, "return_token_ids", "bool", False)
        results = await self.run(prompts, params, n)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": self.served_name}
        choices, events = [], []
        for i, (prompt_ids, gens) in enumerate(zip(prompts, results)):
            for j, g in enumerate(gens):
                text = self.text_of(g, params, skip, trim)[0]
                choice = {"index": i * n + j, "text": text, "logprobs": None, "finish_reason": g.finish,
                          "token_versions": list(g.versions)}
                if lp is not None:
                    choice["logprobs"] = self._completion_logprobs(g, slice(None), as_ids)
                if with_ids:
                    choice.update(token_ids=list(g.tokens), prompt_token_ids=list(prompt_ids))
                choices.append(choice)
                if stream:
                    events += self._completion_chunks(head, choice, g, text, skip, as_ids, lp is not None)
        if stream:
            if usage:
                events.append({**head, "choices": [], "usage": self._usage(prompts, results)})
            return StreamingResponse(sse(events), media_type="text/event-stream")
        return {**head, "choices": choices, "usage": self._usage(prompts, results)}

    def _completion_chunks(self, head, choice, g: Generation, text, skip, as_ids, want_lp) -> list[dict]:
        chunks, at = [], 0
        for k, piece in enumerate(self._pieces(g.tokens, text, skip)):
            c = {"index": choice["index"], "text": piece, "logprobs": None, "finish_reason": None}
            if want_lp:
                c["logprobs"] = self._completion_logprobs(g, slice(k, k + 1), as_ids, at)
                at += len(c["logprobs"]["tokens"][0])
            chunks.append({**head, "choices": [c]})
        last = {"index": choice["index"], "text": "", "logprobs": None, "finish_reason": g.finish,
                "token_versions": list(g.versions)}
        for key in ("token_ids", "prompt_token_ids"):
            if key in choice:
                last[key] = choice[key]
        return chunks + [{**head, "choices": [last]}]

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
        results = await self.run([ids], params, n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.served_name}
        choices, events = [], []
        chunk_head = {**head, "object": "chat.completion.chunk"}
        for j, g in enumerate(results[0]):
            text = self.text_of(g, params, skip)[0]
            choice = {"index": j, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": g.finish, "token_versions": list(g.versions)}
            if want_lp:
                choice["logprobs"] = self._chat_logprobs(g, slice(None), as_ids, top_n)
            if with_ids:
                choice["token_ids"] = list(g.tokens)
            choices.append(choice)
            if stream:
                events.append({**chunk_head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]})
                for k, piece in enumerate(self._pieces(g.tokens, text, skip)):
                    lps = self._chat_logprobs(g, slice(k, k + 1), as_ids, top_n) if want_lp else None
                    events.append({**chunk_head, "choices": [{"index": j, "delta": {"content": piece},
                                                              "logprobs": lps, "finish_reason": None}]})
                last = {"index": j, "delta": {}, "logprobs": None, "finish_reason": g.finish,
                        "token_versions": list(g.versions)}
                if with_ids:
                    last["token_ids"] = list(g.tokens)
                events.append({**chunk_head, "choices": [last]})
        if stream:
            if usage:
                events.append({**chunk_head, "choices": [], "usage": self._usage([ids], results)})
            return StreamingResponse(sse(events), media_type="text/event-stream")
        return {**head, "choices": choices, "usage": self._usage([ids], results)}
