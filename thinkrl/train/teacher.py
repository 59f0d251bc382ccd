"""The teacher of on-policy distillation (algo.distill_teacher): a frozen model that scores the student's tokens.

    teacher = Teacher.maybe_create(cfg, tokenizer, device)   # None when algo.distill_teacher is ""
    lps = teacher.logprobs(trajs)                            # lps[i][t] = log p_T(tokens[t] | tokens[:t])

The teacher is any local Hugging Face causal-LM directory or thinkrl checkpoint (thinkrl.models.loading), loaded
once, in eval mode, without gradients, on the trainer's device. It runs the trainer's packed forward
(thinkrl.train.packing) over the same micro-batches the step uses, in the trainer's process; it is its own model
object, so weight sync (which sends the trainer's weights to the engines) never touches it. Its log-probs of the
student's sampled tokens go to thinkrl.algo.distill through make_batch.

The teacher must read the student's token ids the same way: its tokenizer must be the student's (same vocabulary,
same special tokens, same ids for a probe text) and its embedding must cover the vocabulary; otherwise loading
stops with one line (ModelLoadError) before any step.
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
            raise ModelLoadError(f"{what}: a remote teacher is not supported; give a local model directory or "
                                 "checkpoint (its log-probs are computed in the trainer's process)")
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
    def maybe_create(cls, cfg, student_tokenizer, device) -> "Teacher | None":
        if not cfg.algo.distill_teacher:
            return None
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
