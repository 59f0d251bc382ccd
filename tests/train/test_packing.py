"""Packed (and shared-prompt) forward == unpacked forward; layout; gradients; errors."""
from __future__ import annotations

import random

import pytest
import torch

from thinkrl.models.micro import build_micro_model
from thinkrl.train.attention import packed_forward
from thinkrl.train.packing import Seq, forward_logprobs, make_micro_batches, packing_stats
from thinkrl.types import Trajectory

TOL = 1e-5


@pytest.fixture(scope="module")
def model(tok):
    return build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64).eval()


def _seqs(vocab, n_groups=3, n=3, seed=0, plain=2):
    rng = random.Random(seed)
    seqs = []
    for g in range(n_groups):
        p = rng.randint(1, 8)
        prompt = [rng.randrange(vocab) for _ in range(p)]
        for _ in range(n):
            seqs.append(Seq(prompt + [rng.randrange(vocab) for _ in range(rng.randint(0, 10))], p, f"g{g}"))
    seqs += [Seq([rng.randrange(vocab) for _ in range(rng.randint(1, 12))]) for _ in range(plain)]
    return seqs


def _reference(model, tokens):
    """Unpacked forward of one sequence: logits [n, V], logprobs [n], entropies [n] (index 0 -> 0)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    out, ent = torch.zeros(len(tokens)), torch.zeros(len(tokens))
    out[1:] = lp[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]
    ent[1:] = -(lp.exp() * lp).sum(-1)[:-1]
    return logits, out, ent


@pytest.fixture(scope="module")
def ref(model):
    """_reference for the (never updated) module model, cached per token sequence."""
    cache = {}

    def get(tokens):
        if tuple(tokens) not in cache:
            cache[tuple(tokens)] = _reference(model, tokens)
        return cache[tuple(tokens)]

    return get


def test_layout_plain_by_hand():
    mbs = make_micro_batches([Seq([5, 6, 7]), Seq([8, 9])], 10)
    (mb,) = mbs
    order = mb.seq_index
    assert sorted(order) == [0, 1]
    first, second = ([5, 6, 7], [8, 9]) if order == [0, 1] else ([8, 9], [5, 6, 7])
    assert mb.input_ids.tolist() == [first + second]
    a = len(first)
    assert mb.position_ids.tolist() == [list(range(a)) + list(range(5 - a))]
    assert mb.prev_index.tolist() == [-1, *range(0, a - 1), -1, *range(a, 4)]
    assert mb.spans.bounds == [(0, a, 0, 0), (a, 5, a, a)]


def test_layout_shared_prompt_by_hand():
    seqs = [Seq([7, 8, 1, 2], 2, "g"), Seq([7, 8, 3], 2, "g")]
    (mb,) = make_micro_batches(seqs, 10, share_prompt=True)
    assert mb.input_ids.tolist() == [[7, 8, 1, 2, 3]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # each response continues after the prompt
    assert mb.prev_index.tolist() == [-1, 0, 1, 2, 1]  # response 2's first token is predicted by the prompt end
    assert mb.spans.bounds == [(0, 2, 0, 0), (2, 4, 0, 2), (4, 5, 0, 2)]
    assert mb.token_index.tolist() == [0, 1, 2, 3, 0, 1, 4]
    assert (mb.num_tokens, mb.num_seq_tokens) == (5, 7)
    assert packing_stats([mb], 10)["pack/tokens_saved"] == 2.0


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("budget", [24, 64])
def test_packed_logits_and_logprobs_equal_unpacked(model, tok, ref, share, budget):
    seqs = _seqs(len(tok))
    mbs = make_micro_batches(seqs, budget, share_prompt=share)
    assert sorted(i for mb in mbs for i in mb.seq_index) == list(range(len(seqs)))
    assert all(mb.num_tokens <= budget for mb in mbs)
    for mb in mbs:
        with torch.no_grad():
            lps, ents = forward_logprobs(model, mb, with_entropy=True)
            with packed_forward():
                logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids,
                               thinkrl_spans=mb.spans).logits[0]
        per_seq_logits = logits[mb.token_index].split(mb.seq_lens)
        for j, i in enumerate(mb.seq_index):
            ref_logits, ref_lp, ref_ent = ref(seqs[i].tokens)
            assert lps[j].shape == (len(seqs[i].tokens),) and lps[j][0] == 0
            assert (per_seq_logits[j] - ref_logits).abs().max() <= TOL
            assert (lps[j] - ref_lp).abs().max() <= TOL
            assert (ents[j] - ref_ent).abs().max() <= TOL


@pytest.mark.parametrize("share", [False, True])
def test_lengths_across_attention_buckets(model, tok, ref, share):
    """Spans from 1 to 70 tokens land in several padded attention buckets; every row still equals unpacked."""
    rng = random.Random(3)
    seqs = []
    for g, p in enumerate((1, 5, 20)):
        prompt = [rng.randrange(len(tok)) for _ in range(p)]
        seqs += [Seq(prompt + [rng.randrange(len(tok)) for _ in range(r)], p, f"g{g}") for r in (1, 9, 16, 17, 40, 70)]
    seqs.append(Seq([rng.randrange(len(tok)) for _ in range(33)]))
    (mb,) = make_micro_batches(seqs, 4096, share_prompt=share)
    with torch.no_grad():
        lps = forward_logprobs(model, mb)
    assert len(next(iter(mb.spans.plans.values()))[0]) >= 3  # buckets actually used
    for j, i in enumerate(mb.seq_index):
        assert (lps[j] - ref(seqs[i].tokens)[1]).abs().max() <= TOL


def test_shared_prompt_saves_tokens(tok):
    seqs = _seqs(len(tok), n_groups=3, n=4, plain=0)
    plain = make_micro_batches(seqs, 1000)
    shared = make_micro_batches(seqs, 1000, share_prompt=True)
    saved = sum(3 * s.prompt_len for s in seqs[::4])  # n - 1 prompt copies per group
    assert sum(mb.num_tokens for mb in plain) - sum(mb.num_tokens for mb in shared) == saved
    assert packing_stats(shared, 1000)["pack/tokens_saved"] == saved


def test_oversized_group_splits_and_stays_exact(model, tok):
    seqs = [Seq([1, 2, 3, 4] + [10 + k] * (3 + k), 4, "g") for k in range(4)]  # 4 + (3+4+5+6) = 22 tokens
    mbs = make_micro_batches(seqs, 12, share_prompt=True)
    assert all(mb.num_tokens <= 12 for mb in mbs)
    assert sum(mb.num_tokens for mb in mbs) > 22  # the prompt is copied into each micro-batch
    for mb in mbs:
        with torch.no_grad():
            lps = forward_logprobs(model, mb)
        for j, i in enumerate(mb.seq_index):
            assert (lps[j] - _reference(model, seqs[i].tokens)[1]).abs().max() <= TOL


def test_different_prompts_in_a_group_are_not_shared(tok):
    seqs = [Seq([1, 2, 3, 9], 3, "g"), Seq([1, 2, 4, 9], 3, "g")]
    (mb,) = make_micro_batches(seqs, 20, share_prompt=True)
    assert mb.num_tokens == 8


def test_no_attention_across_sequences(model, tok):
    a, b = Seq([3, 4, 5, 6, 7]), Seq([8, 9, 10, 11])
    c = Seq([20, 21, 22, 23, 24])
    with torch.no_grad():
        (mb1,) = make_micro_batches([a, b], 20)
        (mb2,) = make_micro_batches([c, b], 20)
        lp1 = dict(zip(mb1.seq_index, forward_logprobs(model, mb1)))
        lp2 = dict(zip(mb2.seq_index, forward_logprobs(model, mb2)))
    assert (lp1[1] - lp2[1]).abs().max() <= 1e-6


@pytest.mark.parametrize("share", [False, True])
def test_gradients_equal_unpacked(tok, share):
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    seqs = _seqs(len(tok), n_groups=2, n=3, seed=1, plain=1)
    weights = [torch.linspace(0.5, 1.5, len(s.tokens)) for s in seqs]  # any per-token loss weights

    model.zero_grad()
    for s, w in zip(seqs, weights):
        lp = torch.log_softmax(model(input_ids=torch.tensor([s.tokens])).logits[0].float(), -1)
        (lp[:-1].gather(1, torch.tensor(s.tokens[1:])[:, None])[:, 0] * w[1:]).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    for mb in make_micro_batches(seqs, 40, share_prompt=share):
        lps = forward_logprobs(model, mb)
        sum((lp * weights[i]).sum() for lp, i in zip(lps, mb.seq_index)).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-5, rtol=1e-4), n


def test_gradient_checkpointing_and_eager_base(tok):
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model.set_attn_implementation("eager")
    model.activation_checkpointing_enable()
    model.train()
    seqs = _seqs(len(tok), n_groups=1, n=3, seed=2, plain=1)
    for mb in make_micro_batches(seqs, 64, share_prompt=True):
        lps = forward_logprobs(model, mb)
        sum(lp.sum() for lp in lps).backward()
        for j, i in enumerate(mb.seq_index):
            assert (lps[j].detach() - _reference(model, seqs[i].tokens)[1]).abs().max() <= TOL
    assert all(p.grad is not None for p in model.parameters())


def test_unpacked_calls_unchanged_after_enabling(tok):
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=64).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        forward_logprobs(model, make_micro_batches([Seq([1, 2, 3])], 8)[0])
        assert model.config._attn_implementation == "thinkrl_varlen"
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert not any("thinkrl" in k for k in model.config.to_dict())  # nothing leaks into saved checkpoints


def test_trajectories_and_ranks(tok):
    trajs = [Trajectory(sample_id=f"s{k}", group_id=f"g{k // 2}", tokens=[1, 2, 3] + [4] * (k + 1),
                        loss_mask=[False] * 3 + [True] * (k + 1), logprobs=[0.0] * (k + 4),
                        versions=[-1] * 3 + [0] * (k + 1), prompt_len=3) for k in range(6)]
    per_rank = [make_micro_batches(trajs, 12, share_prompt=True, world_size=2, rank=r) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    held = sorted(i for mbs in per_rank for mb in mbs for i in mb.seq_index)
    assert held == list(range(6))
    assert all(mb.num_tokens <= 12 for mbs in per_rank for mb in mbs)


def test_bad_input_errors(tok):
    with pytest.raises(ValueError, match=r"sequence 1 has 9 tokens, more than max_tokens_per_mb=8"):
        make_micro_batches([Seq([1, 2]), Seq(list(range(9)))], 8)
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        make_micro_batches([Seq([])], 8)
    with pytest.raises(ValueError, match="prompt_len=5"):
        make_micro_batches([Seq([1, 2, 3], 5, "g")], 8)
    with pytest.raises(ValueError, match="rank=2"):
        make_micro_batches([Seq([1, 2, 3])], 8, world_size=2, rank=2)


def _fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract in plain torch: [total, H, D] inputs, bottom-right causal."""
    assert causal and q.dtype == k.dtype and cu_q.dtype == cu_k.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = []
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[s]:cu_k[s + 1]].transpose(0, 1) for t in (k, v))
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        nq, nk = qs.shape[1], ks.shape[1]
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask,
                                                                    scale=softmax_scale).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("share", [False, True])
def test_flash_varlen_path_arguments(model, tok, ref, monkeypatch, share):
    """The CUDA flash-attn path (cu_seqlens, gathered shared-prompt keys), run through a torch stand-in."""
    from thinkrl.train import attention

    monkeypatch.setattr(attention, "_flash_fn", lambda query: _fake_flash_varlen)
    seqs = _seqs(len(tok), seed=3)
    for mb in make_micro_batches(seqs, 48, share_prompt=share):
        with torch.no_grad():
            lps = forward_logprobs(model, mb)
        for j, i in enumerate(mb.seq_index):
            assert (lps[j] - ref(seqs[i].tokens)[1]).abs().max() <= TOL
