"""The OpenAI-compatible routes of `thinkrl serve` (/v1/models, /v1/completions, /v1/chat/completions), as a mixin
of rollout.server.Server: non-streaming, sampled-token log-probs only (`logprobs=0` / `logprobs=true`), token ids
on request (`return_token_ids`, vLLM's extension) and each choice's `token_versions` (thinkrl's)."""
from __future__ import annotations

import time
import uuid

from thinkrl.rollout.http_util import HTTPError, Request, check_neutral, get_field, get_id_lists, get_str_list


class OpenAIRoutes:
    """Needs from the class it is mixed into: tokenizer, served_name, model_dir, max_len, sampling(), run(),
    text_of()."""

    def _models(self, req: Request):
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "thinkrl", "root": self.model_dir or self.served_name,
                                            "max_model_len": self.max_len}]}

    def _openai_params(self, body: dict, prompts, max_new: int | None, field: str):
        if not isinstance(body, dict):
            raise HTTPError(400, "request body: expected a JSON object")
        if get_field(body, "stream", "bool", False):
            raise HTTPError(400, "stream: streaming is not supported by thinkrl serve; send stream=false")
        check_neutral(body)
        n = get_field(body, "n", "int", 1, lo=1, hi=1024)
        if body.get("best_of") not in (None, n):
            raise HTTPError(400, "best_of: only best_of == n is supported")
        stop_ids = get_field(body, "stop_token_ids", "list", [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise HTTPError(400, "stop_token_ids: expected a list of ints")
        params = self.sampling(prompts, max_new, get_field(body, "temperature", "float", 1.0, lo=0),
                               get_field(body, "top_p", "float", 1.0, hi=1), get_field(body, "top_k", "int", 0, lo=-1),
                               get_str_list(body, "stop"), stop_ids, get_field(body, "seed", "int", None), field)
        return params, n

    def _token_strs(self, tokens: list[int], as_ids: bool) -> list[str]:
        return [f"token_id:{t}" if as_ids else self.tokenizer.decode([t]) for t in tokens]

    @staticmethod
    def _usage(prompts, results) -> dict:
        p, c = sum(len(x) for x in prompts), sum(len(g.tokens) for gens in results for g in gens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _completions(self, req: Request):
        body = req.json()
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            if not all(texts):
                raise HTTPError(400, "prompt: empty string")
            prompts = [list(self.tokenizer(t)["input_ids"]) for t in texts]
        elif prompt is None:
            raise HTTPError(400, "prompt: required field is missing")
        else:
            prompts, _ = get_id_lists(prompt, "prompt")
        lp = get_field(body, "logprobs", "int", None, lo=0, hi=20)
        if lp:
            raise HTTPError(400, f"logprobs={lp}: top alternatives are not supported; logprobs=0 returns the "
                                 "sampled tokens' log-probs")
        params, n = self._openai_params(body, prompts, get_field(body, "max_tokens", "int", 16), "max_tokens")
        as_ids = get_field(body, "return_tokens_as_token_ids", "bool", False)
        skip = get_field(body, "skip_special_tokens", "bool", True)
        trim = not get_field(body, "include_stop_str_in_output", "bool", False)
        results = await self.run(prompts, params, n)
        choices = []
        for i, (prompt_ids, gens) in enumerate(zip(prompts, results)):
            for j, g in enumerate(gens):
                choice = {"index": i * n + j, "text": self.text_of(g, params, skip, trim)[0], "logprobs": None,
                          "finish_reason": g.finish, "token_versions": list(g.versions)}
                if lp is not None:
                    toks = self._token_strs(g.tokens, as_ids)
                    offsets = [sum(len(t) for t in toks[:k]) for k in range(len(toks))]
                    choice["logprobs"] = {"tokens": toks, "token_logprobs": [float(x) for x in g.logprobs],
                                          "top_logprobs": None, "text_offset": offsets}
                if get_field(body, "return_token_ids", "bool", False):
                    choice.update(token_ids=list(g.tokens), prompt_token_ids=list(prompt_ids))
                choices.append(choice)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.served_name, "choices": choices, "usage": self._usage(prompts, results)}

    async def _chat(self, req: Request):
        body = req.json()
        msgs = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "messages: expected a non-empty list of {role, content}")
        clean = []
        for i, m in enumerate(msgs):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise HTTPError(400, f"messages[{i}].content: only text parts are supported")
                content = "".join(c["text"] for c in content)
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise HTTPError(400, f"messages[{i}]: expected {{role: str, content: str}}")
            clean.append({"role": m["role"], "content": content})
        if not getattr(self.tokenizer, "chat_template", None):
            raise HTTPError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            ids = list(self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
        except Exception as e:
            raise HTTPError(400, f"messages: the chat template failed: {e}") from None
        want_lp = get_field(body, "logprobs", "bool", False)
        if get_field(body, "top_logprobs", "int", 0, lo=0, hi=20):
            raise HTTPError(400, "top_logprobs > 0 is not supported; logprobs=true returns the sampled tokens' "
                                 "log-probs")
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params, n = self._openai_params(body, [ids], get_field(body, field, "int", None), field)
        as_ids = get_field(body, "return_tokens_as_token_ids", "bool", False)
        skip = get_field(body, "skip_special_tokens", "bool", True)
        results = await self.run([ids], params, n)
        choices = []
        for j, g in enumerate(results[0]):
            choice = {"index": j, "message": {"role": "assistant", "content": self.text_of(g, params, skip)[0]},
                      "logprobs": None, "finish_reason": g.finish, "token_versions": list(g.versions)}
            if want_lp:
                choice["logprobs"] = {"content": [
                    {"token": s, "logprob": float(lp), "bytes": list(s.encode()), "top_logprobs": []}
                    for s, lp in zip(self._token_strs(g.tokens, as_ids), g.logprobs)]}
            if get_field(body, "return_token_ids", "bool", False):
                choice["token_ids"] = list(g.tokens)
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.served_name, "choices": choices, "usage": self._usage([ids], results)}
