"""The teacher of on-policy distillation (algo.distill_teacher): a frozen model that scores the student's tokens.

    teacher = Teacher.maybe_create(cfg, tokenizer, device)   # None when algo.distill_teacher is ""
    lps = teacher.logprobs(trajs)                            # lps[i][t] = log p_T(tokens[t] | tokens[:t]), [0] = 0

A local teacher (`Teacher`) is any Hugging Face causal-LM directory or thinkrl checkpoint (thinkrl.models.loading),
loaded once, in eval mode, without gradients, on the trainer's device. It runs the trainer's packed forward
(thinkrl.train.packing) over the same micro-batches the step uses, in the trainer's process; it is its own model
object, so weight sync (which sends the trainer's weights to the engines) never touches it. Its log-probs of the
student's sampled tokens go to thinkrl.algo.distill through make_batch.

A remote teacher (`RemoteTeacher`: algo.distill_teacher is one or more http(s) URLs) is scored by inference servers
(thinkrl serve, SGLang, vLLM) through thinkrl.rollout.remote.RemoteEngine.score, with the API of
algo.distill_teacher_api: SGLang's prompt log-probs or vLLM's. The servers are the rollout servers' kind but
not the rollout engine: weight sync never sends them anything.

The teacher must read the student's token ids the same way. A local one: its tokenizer must be the student's
(same vocabulary, same special tokens, same ids for a probe text) and its embedding must cover the vocabulary.
A remote one cannot be asked for its vocabulary in general; at connect it scores the probe text's ids plus the
policy's largest token id (a server whose vocabulary is smaller refuses it) and checks that the answer names the
same ids, and with the SGLang API also that the server decodes each probe token to the same text as the policy's
tokenizer. Otherwise, or when no server answers, loading stops with one line (ModelLoadError) before any step.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from thinkrl.models.loading import ModelLoadError, check_model_dir, load_checkpoint
from thinkrl.train.packing import forward_logprobs, make_micro_batches

PROBE = "<|user|>What is 12 + 345? Answer: 357.\n The quick brown fox (x^2 = -1) {ok}<|end|>"


def same_tokenizer(student, teacher) -> str | None:
    """None when both tokenizers map text to the same ids, else what differs (one phrase)."""
    if len(student) != len(teacher):
        return f"vocabulary size {len(teacher)} vs the policy's {len(student)}"
    if student.get_vocab() != teacher.get_vocab():
        diff = sorted(set(student.get_vocab().items()) ^ set(teacher.get_vocab().items()))[:3]
        return f"different token ids (e.g. {', '.join(f'{t!r}={i}' for t, i in diff)})"
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(student, attr) != getattr(teacher, attr):
            return f"{attr} {getattr(teacher, attr)} vs the policy's {getattr(student, attr)}"
    if student.encode(PROBE, add_special_tokens=False) != teacher.encode(PROBE, add_special_tokens=False):
        return "a probe text encodes to different ids"
    return None


class Teacher:
    def __init__(self, model, tcfg, autocast_bf16: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.tcfg = tcfg
        self.device = next(model.parameters()).device
        self.autocast = autocast_bf16 and self.device.type in ("cuda", "cpu")

    @classmethod
    def load(cls, path: str, student_tokenizer, tcfg, device, dtype: str = "float32",
             autocast_bf16: bool = False) -> "Teacher":
        """The model in `path`, checked against the student's tokenizer. ModelLoadError: one line naming the path."""
        what = f"algo.distill_teacher={path!r}"
        if "://" in path:
            raise ModelLoadError(f"{what}: a URL, not a local model directory (a remote teacher is "
                                 "RemoteTeacher.connect; Teacher.maybe_create picks it)")
        check_model_dir(path, what)
        model, tok = load_checkpoint(path, device=device, dtype=dtype)
        why = same_tokenizer(student_tokenizer, tok)
        if why is not None:
            raise ModelLoadError(f"{what}: the teacher's tokenizer is not the policy's ({why}); distillation "
                                 "scores the student's token ids, so both must share one tokenizer")
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < len(student_tokenizer):
            raise ModelLoadError(f"{what}: its embedding has {rows} rows, fewer than the {len(student_tokenizer)} "
                                 "tokens of the policy's tokenizer")
        return cls(model, tcfg, autocast_bf16)

    @classmethod
    def maybe_create(cls, cfg, student_tokenizer, device) -> "Teacher | RemoteTeacher | None":
        if not cfg.algo.distill_teacher:
            return None
        if "://" in cfg.algo.distill_teacher:
            r = cfg.rollout
            return RemoteTeacher.connect(cfg.algo.distill_teacher, student_tokenizer, cfg.algo.distill_teacher_api,
                                         r.request_timeout, max_concurrency=r.max_concurrency)
        return cls.load(cfg.algo.distill_teacher, student_tokenizer, cfg.train, device, cfg.model.dtype,
                        cfg.model.autocast_bf16)

    @torch.no_grad()
    def logprobs(self, trajs) -> list[list[float]]:
        """Per trajectory, the teacher's log-prob of each token (logprob[0] = 0), from packed no-grad forwards."""
        out: list[list[float]] = [None] * len(trajs)  # type: ignore[list-item]
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        for mb in make_micro_batches(trajs, self.tcfg.max_tokens_per_mb, share_prompt=self.tcfg.share_prompt):
            with amp:
                lps = forward_logprobs(self.model, mb)
            for i, lp in zip(mb.seq_index, lps):
                out[i] = lp.float().tolist()
        return out


class RemoteTeacher:
    """A teacher on inference servers: logprobs(trajs) as Teacher's, from RemoteEngine.score."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def connect(cls, urls: str, student_tokenizer, api: str = "sglang", request_timeout: float = 3600.0,
                max_retries: int = 3, max_concurrency: int = 64) -> "RemoteTeacher":
        """The servers at `urls` (comma-separated; requests of at most max_concurrency sequences), checked with a
        probe (see the module docstring). ModelLoadError: one line naming algo.distill_teacher."""
        from thinkrl.rollout.remote import RemoteEngine, RemoteError

        what = f"algo.distill_teacher={urls!r}"
        servers = [u.strip() for u in urls.split(",")]
        try:
            engine = RemoteEngine(servers, api=api, max_concurrency=max_concurrency, request_timeout=request_timeout,
                                  max_retries=max_retries, retry_backoff=0.2)
        except ValueError as e:
            raise ModelLoadError(f"{what}: {e}") from None
        probe = student_tokenizer.encode(PROBE, add_special_tokens=False) + [len(student_tokenizer) - 1]
        for url in servers:  # every server, once: each must answer and read the ids as the policy does
            one = RemoteEngine([url], api=api, max_retries=max_retries, retry_backoff=0.2, api_key=engine.api_key)
            try:
                one.score([probe])
            except RemoteError as e:
                raise ModelLoadError(f"{what}: the teacher server {url} cannot score the policy's token ids "
                                     f"({e})") from None
            why = _decodes_differently(url, engine.api_key, probe[:-1], student_tokenizer) if api == "sglang" else None
            if why is not None:
                raise ModelLoadError(f"{what}: the tokenizer of the teacher server {url} is not the policy's ({why}); "
                                     "distillation scores the student's token ids, so both must share one tokenizer")
        return cls(engine)

    def logprobs(self, trajs) -> list[list[float]]:
        """Per trajectory, the teacher's log-prob of each token (logprob[0] = 0), scored on the servers."""
        return self.engine.score([t.tokens for t in trajs])


def _decodes_differently(url: str, api_key: str | None, ids: list[int], tokenizer) -> str | None:
    """SGLang's API: None when the server at `url` decodes every token of `ids` as `tokenizer` does, else the first
    token that differs (return_text_in_logprobs: the server's text of each prompt token). An answer without
    per-token text is not checked further."""
    import httpx

    try:
        r = httpx.post(url.rstrip("/") + "/generate", json={
            "input_ids": ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0, "return_text_in_logprobs": True}, timeout=60, trust_env=False,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        if r.status_code != 200:
            return None
        for _, t, text in (r.json().get("meta_info") or {}).get("input_token_logprobs") or []:
            if text is not None and text != tokenizer.decode([t]):
                return f"token {t} is {text!r} there, {tokenizer.decode([t])!r} here"
    except (httpx.HTTPError, ValueError, TypeError, AttributeError):
        return None
    return None
