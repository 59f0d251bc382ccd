"""The SGLang-native routes of `thinkrl serve`, as a mixin of rollout.server.Server: /generate (text or input_ids,
single or batch, sampling_params, return_logprob, top_logprobs_num, stream; logprob_start_len >= 0 adds the
prompt's log-probs as SGLang's meta_info.input_token_logprobs, and max_new_tokens 0 then only scores the prompt), /update_weights_from_disk,
/pause_generation, /continue_generation, /flush_cache, /health, /get_model_info, /get_server_info,
/get_weight_version, in SGLang's JSON shapes (`meta_info` with `output_token_logprobs` as [logprob, token id,
text], `output_top_logprobs`, `finish_reason` {type, matched | length}), plus `meta_info.output_token_versions`
(the policy version of every token, thinkrl's)."""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from fastapi.responses import StreamingResponse

from thinkrl.rollout.api_fields import IGNORED, INT64, NEUTRAL, APIError, check_neutral, get_field, get_id_lists, \
    get_str_list
from thinkrl.rollout.openai_routes import sse
from thinkrl.rollout.weights import load_safetensors
from thinkrl.types import Generation

MAX_TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's limit)
# /pause_generation modes (SGLang's and vLLM's names) -> the engine's (thinkrl.rollout.base.PAUSE_MODES)
SERVER_PAUSE_MODES = {"abort": "abort", "retract": "retract", "in_place": "in_place", "keep": "in_place",
                      "wait": "in_place"}


class NativeRoutes:
    """Needs from the class it is mixed into: engine, tokenizer, model, model_dir, served_name, max_len, queued,
    max_queue, paused, counters, sampling(), run(), score(), on_engine(), text_of()."""

    async def _generate(self, req: Call):
        body = req.json()
        if not isinstance(body, dict):
            raise APIError(400, "request body: expected a JSON object")
        stream = get_field(body, "stream", "bool", False)
        check_neutral(body)
        has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
        if has_text == has_ids:
            raise APIError(400, "give exactly one of text or input_ids")
        if has_text:
            text = body["text"]
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise APIError(400, "text: expected a non-empty string or a list of them")
            prompts, batch = [list(self.tokenizer(t)["input_ids"]) for t in texts], not isinstance(text, str)
        else:
            prompts, batch = get_id_lists(body["input_ids"], "input_ids")
        sp = get_field(body, "sampling_params", "dict", {})
        unknown = sorted(set(sp) - set(NEUTRAL) - IGNORED - {"max_new_tokens", "temperature", "top_p", "top_k",
                                                             "stop", "stop_token_ids"})
        if unknown:
            raise APIError(400, f"sampling_params.{unknown[0]}: unknown or unsupported sampling parameter")
        check_neutral(sp, "sampling_params.")
        w = "sampling_params."
        n = get_field(sp, "n", "int", 1, lo=1, hi=1024, where=w)
        seed = sp.get("sampling_seed", sp.get("seed"))
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise APIError(400, "sampling_params.sampling_seed: expected int")
        stop_ids = get_field(sp, "stop_token_ids", "list", [], where=w)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise APIError(400, "sampling_params.stop_token_ids: expected a list of ints")
        want_lp = get_field(body, "return_logprob", "bool", False)
        top_n = get_field(body, "top_logprobs_num", "int", 0, lo=0, hi=MAX_TOP_LOGPROBS) if want_lp else 0
        start = get_field(body, "logprob_start_len", "int", -1, lo=-1, hi=INT64[1]) if want_lp else -1
        if stream and start >= 0:
            raise APIError(400, "logprob_start_len: the prompt's log-probs are not streamed; use stream=false")
        params = self.sampling(prompts, get_field(sp, "max_new_tokens", "int", 128, where=w),
                               get_field(sp, "temperature", "float", 1.0, lo=0, where=w),
                               get_field(sp, "top_p", "float", 1.0, hi=1, where=w),
                               get_field(sp, "top_k", "int", 0, lo=-1, where=w),
                               get_str_list(sp, "stop", w), stop_ids, seed, "sampling_params.max_new_tokens", top_n,
                               score_only=start >= 0)
        with_text = get_field(body, "return_text_in_logprobs", "bool", False)
        rids = body.get("rid")
        rids = rids if isinstance(rids, list) else [rids] if rids else [uuid.uuid4().hex for _ in prompts]
        if len(rids) != len(prompts) or not all(isinstance(r, str) for r in rids):
            raise APIError(400, "rid: expected a string, or one string per prompt")
        trim = not get_field(sp, "no_stop_trim", "bool", False, where=w)
        t0 = time.perf_counter()
        scores = await self.score(prompts) if start >= 0 else [None] * len(prompts)
        results = await self.run(prompts, params, n)
        out = []
        for prompt, rid, gens, lps in zip(prompts, rids, results, scores):
            for j, g in enumerate(gens):
                item = self._native_item(g, params, prompt, rid if n == 1 else f"{rid}_{j}", want_lp, with_text,
                                         time.perf_counter() - t0, trim)
                if lps is not None:
                    item["meta_info"]["input_token_logprobs"] = self._input_logprobs(prompt, lps, start, with_text)
                out.append(item)
        if stream:  # SGLang's stream: each item's output so far, then [DONE] (here: each item once, when done)
            return StreamingResponse(sse(out), media_type="text/event-stream")
        return out if (batch or n > 1) else out[0]

    def _native_item(self, g: Generation, params, prompt, rid, want_lp, with_text, latency, trim) -> dict:
        text, matched = self.text_of(g, params, True, trim)
        finish = ({"type": "stop", "matched": matched} if g.finish == "stop" else
                  {"type": "length", "length": len(g.tokens)} if g.finish == "length" else
                  {"type": "abort", "message": "aborted (pause_generation mode=abort)"})
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt), "completion_tokens": len(g.tokens),
                "cached_tokens": 0, "weight_version": str(self.engine.version),
                "output_token_versions": list(g.versions), "e2e_latency": latency}
        if want_lp:
            piece = (lambda t: self.tokenizer.decode([t])) if with_text else (lambda t: None)
            meta["output_token_logprobs"] = [[float(lp), int(t), piece(t)] for lp, t in zip(g.logprobs, g.tokens)]
            if params.top_logprobs:  # SGLang's shape: per token, [[logprob, token id, text], ...]
                meta["output_top_logprobs"] = [[[float(lp), int(t), piece(t)] for t, lp in alts]
                                               for alts in (g.top_logprobs or [])]
        return {"text": text, "output_ids": list(g.tokens), "meta_info": meta}

    def _input_logprobs(self, prompt: list[int], lps: list[float], start: int, with_text: bool) -> list:
        """SGLang's meta_info.input_token_logprobs: [logprob, token id, text or None] for prompt[start:] (start
        clamped to the last token), the first with logprob None, as SGLang pads it."""
        start = min(start, len(prompt) - 1)
        piece = (lambda t: self.tokenizer.decode([t])) if with_text else (lambda t: None)
        return [[None if i == start else float(lps[i]), int(prompt[i]), piece(prompt[i])]
                for i in range(start, len(prompt))]

    async def _update_weights(self, req: Call):
        body = req.json()
        if not isinstance(body, dict):
            raise APIError(400, "request body: expected a JSON object")
        path = get_field(body, "model_path", "str")
        fmt = body.get("load_format")
        if fmt not in (None, "auto", "safetensors"):
            raise APIError(400, f"load_format={fmt!r}: only safetensors directories are supported")
        version = body.get("weight_version")
        try:
            version = self.engine.version + 1 if version is None else int(version)
            if not INT64[0] <= version <= INT64[1]:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise APIError(400, f"weight_version={str(version)[:40]!r}: thinkrl engines need an integer "
                                "version") from None
        try:
            sd = await asyncio.to_thread(load_state_dict, path, self.model)
            if self.paused:  # by /pause_generation: continue_generation resumes
                await self.on_engine(self.engine.update_weights, sd, version)
            else:
                abort = get_field(body, "abort_all_requests", "bool", False)
                await self.on_engine(self.engine.load_weights, sd, version, self._engine_mode(
                    "abort" if abort else "in_place"))
        except (ValueError, OSError) as e:
            msg = f"update_weights_from_disk failed: {e}"
            return 400, {"success": False, "message": msg, "error": {"message": msg, "type": "invalid_request_error",
                                                                     "code": 400}}
        return {"success": True, "message": f"Loaded {len(sd)} tensors from {path}; weight version {version}.",
                "num_paused_requests": 0}

    def _engine_mode(self, mode: str) -> str:
        """The engine's pause mode for an SGLang or vLLM one: vLLM's keep and wait, and any mode the engine
        does not support (caps.pause_modes), become in_place (requests wait for continue_generation)."""
        mode = SERVER_PAUSE_MODES[mode]
        return mode if mode in self.engine.caps.pause_modes else "in_place"

    def _pause_engine(self, mode: str) -> str:
        mode = self._engine_mode(mode)
        self.engine.pause(mode)
        return mode

    async def _pause(self, req: Call):
        body = req.json() if req.method != "GET" else {}
        mode = body.get("mode", "abort") if isinstance(body, dict) else None
        if not isinstance(mode, str) or mode not in SERVER_PAUSE_MODES:
            raise APIError(400, f"mode={str(mode)[:40]!r}: expected {', '.join(SERVER_PAUSE_MODES)}")
        used = await self.on_engine(self._pause_engine, mode)
        self.paused = True
        return {"message": "Generation paused successfully.", "status": "ok", "mode": used}

    async def _continue(self, req: Call):
        await self.on_engine(self.engine.resume)
        self.paused = False
        return {"message": "Generation continued successfully.", "status": "ok"}

    async def _flush(self, req: Call):
        # answered for SGLang clients; thinkrl engines flush their prefix cache on every weight load themselves
        return "Cache flushed.\n"

    def _health(self, req: Call):
        return ""

    def _weight_version(self, req: Call):
        return {"weight_version": str(self.engine.version)}

    def _model_info(self, req: Call):
        return {"model_path": self.model_dir, "tokenizer_path": self.model_dir, "is_generation": True,
                "weight_version": str(self.engine.version), "served_model_name": self.served_name,
                "max_context_length": self.max_len}

    def _server_info(self, req: Call):
        return {"engine": self.engine.name, "weight_version": str(self.engine.version),
                "queued": self.queued, "max_queue": self.max_queue, "paused": self.paused,
                "max_context_length": self.max_len, "served_model_name": self.served_name, **self.counters}


def load_state_dict(path: str, model=None) -> dict:
    """Tensors from a safetensors file or every *.safetensors in a directory, checked against `model`'s
    parameter names and shapes (tied weights missing from the files are filled from their partner)."""
    if not Path(path).exists():
        raise ValueError(f"model_path={path!r}: no such file or directory")
    try:
        sd = load_safetensors(path)
    except ValueError:
        raise ValueError(f"model_path={path!r}: no *.safetensors files there") from None
    if model is None:
        return sd
    ref = model.state_dict()
    unknown = [k for k in sd if k not in ref]
    if unknown:
        raise ValueError(f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown) in {path}")
    for k in [k for k in ref if k not in sd]:
        partner = next((q for q in sd if ref[q].data_ptr() == ref[k].data_ptr()), None)
        if partner is None:
            raise ValueError(f"tensor {k!r} missing from {path}")
        sd[k] = sd[partner]
    for k, t in sd.items():
        if tuple(t.shape) != tuple(ref[k].shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(t.shape)}, the model has {tuple(ref[k].shape)}")
        sd[k] = t.to(device=ref[k].device, dtype=ref[k].dtype)
    return sd


