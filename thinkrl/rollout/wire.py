"""The two wire formats RemoteEngine speaks: request bodies and answer parsing, with no I/O.

    path, body = generate_request("sglang", None, prompt_ids, params, n=8)
    gens = parse_generations("sglang", answer_json, n=8, fallback_version=3)
    path, body = score_request("openai", "my-model", sequences)
    lps = parse_scores("openai", answer_json, sequences)        # lps[i][0] = 0.0, then each token's log-prob

- "sglang": SGLang's native /generate (`input_ids`, `sampling_params`, `return_logprob`; answers carry
  meta_info.output_token_logprobs as [logprob, token_id, text] and finish_reason {type}); prompt scoring with
  max_new_tokens 0 and logprob_start_len 0 (meta_info.input_token_logprobs, the first entry's log-prob null).
- "openai": vLLM's /v1/completions with token-id prompts, logprobs 0 and vLLM's extras (return_token_ids,
  return_tokens_as_token_ids, include_stop_str_in_output, skip_special_tokens); prompt scoring with echo,
  max_tokens 0 and prompt_logprobs 0 (choices[i].prompt_logprobs: null, then {token id: {logprob, ...}}).
A parser raises WireError (a phrase saying what is wrong) or a KeyError/TypeError/... on a malformed answer;
the caller names the server and the route.
"""
from __future__ import annotations

from thinkrl.types import Generation, SamplingParams

APIS = ("sglang", "openai")


class WireError(ValueError):
    """An answer that parses as JSON but is not what the API returns."""


def generate_request(api: str, model: str | None, prompt: list[int], params: SamplingParams, n: int) -> tuple[str, dict]:
    if api == "sglang":
        sp = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
              "top_k": params.top_k if params.top_k > 0 else -1, "n": n, "stop": list(params.stop),
              "stop_token_ids": list(params.stop_token_ids)}
        if params.seed is not None:
            sp["sampling_seed"] = params.seed
        return "/generate", {"input_ids": prompt, "sampling_params": sp, "return_logprob": True}
    body = {"model": model, "prompt": prompt, "max_tokens": params.max_new_tokens, "n": n,
            "temperature": params.temperature, "top_p": params.top_p, "stop": list(params.stop) or None,
            "stop_token_ids": list(params.stop_token_ids), "logprobs": 0, "return_tokens_as_token_ids": True,
            "return_token_ids": True, "include_stop_str_in_output": True, "skip_special_tokens": False}
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    return "/v1/completions", body


def _versions(reported, weight_version, n: int, fallback: int) -> list[int]:
    """Per-token versions: the server's per-token list (thinkrl servers), else its per-response weight_version
    (SGLang), else `fallback` (the client's version when the answer arrived)."""
    if isinstance(reported, list) and len(reported) == n:
        return [int(v) for v in reported]
    try:
        return [int(weight_version)] * n
    except (TypeError, ValueError):
        return [fallback] * n


def _sglang_generation(item: dict, fallback: int) -> Generation:
    meta = item.get("meta_info") or {}
    lps = meta.get("output_token_logprobs")
    if lps is None:
        raise WireError("no output_token_logprobs in the answer (return_logprob ignored?)")
    tokens, logprobs = [int(e[1]) for e in lps], [float(e[0]) for e in lps]
    fin = (meta.get("finish_reason") or {}).get("type", "abort")
    finish = fin if fin in ("stop", "length", "abort") else "stop"
    return Generation(tokens, logprobs, _versions(meta.get("output_token_versions"), meta.get("weight_version"),
                                                  len(tokens), fallback), finish)


def _openai_generation(choice: dict, fallback: int) -> Generation:
    lp = choice.get("logprobs") or {}
    logprobs = lp.get("token_logprobs")
    tokens = choice.get("token_ids")
    if tokens is None:
        try:
            tokens = [int(t.split("token_id:", 1)[1]) for t in lp.get("tokens") or []]
        except (IndexError, ValueError, AttributeError):
            raise WireError("tokens are not token ids; the server ignores return_tokens_as_token_ids (vLLM: start "
                            "it with --return-tokens-as-token-ids)") from None
    if logprobs is None or len(logprobs) != len(tokens) or any(x is None for x in logprobs):
        raise WireError("missing or incomplete token log-probs")
    fin = choice.get("finish_reason")
    finish = fin if fin in ("length", "abort") else "stop"
    return Generation([int(t) for t in tokens], [float(x) for x in logprobs],
                      _versions(choice.get("token_versions"), None, len(tokens), fallback), finish)


def parse_generations(api: str, answer, n: int, fallback_version: int) -> list[Generation]:
    if api == "sglang":
        gens = [_sglang_generation(it, fallback_version) for it in ([answer] if isinstance(answer, dict) else answer)]
    else:
        gens = [_openai_generation(c, fallback_version)
                for c in sorted(answer["choices"], key=lambda c: c.get("index", 0))]
    if len(gens) != n:
        raise WireError(f"asked for {n} samples, got {len(gens)}")
    return gens


def score_request(api: str, model: str | None, seqs: list[list[int]]) -> tuple[str, dict]:
    if api == "sglang":
        return "/generate", {"input_ids": seqs, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                             "logprob_start_len": 0}
    return "/v1/completions", {"model": model, "prompt": seqs, "max_tokens": 0, "echo": True, "logprobs": 0,
                               "prompt_logprobs": 0}


def parse_scores(api: str, answer, seqs: list[list[int]]) -> list[list[float]]:
    """Per sequence [0.0, log p(t_1 | t_0), ...]; the answer must name exactly the token ids sent."""
    if api == "sglang":
        rows = [[(e[1], e[0]) for e in it["meta_info"]["input_token_logprobs"]]
                for it in ([answer] if isinstance(answer, dict) else answer)]
    else:  # prompt_logprobs[t]: {token id: {logprob, ...}}, the prompt's token among them
        choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
        rows = [[(t, None if d is None else d[str(t)]["logprob"]) for t, d in zip(q, c["prompt_logprobs"])]
                for q, c in zip(seqs, choices)]
    if len(rows) != len(seqs):
        raise WireError(f"scored {len(rows)} of {len(seqs)} sequences")
    out = []
    for q, row in zip(seqs, rows):
        if len(row) != len(q) or any(int(t) != x for (t, _), x in zip(row, q)):
            raise WireError("the scored tokens are not the ones sent")
        out.append([0.0] + [float(lp) for _, lp in row[1:]])
    return out
