"""The value model for PPO with GAE: alignment, fitting, split invariance, clipping, make_batch, state."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from thinkrl.algo.batch import gae_targets, make_batch
from thinkrl.algo.config import AlgoConfig
from thinkrl.config import TrainConfig
from thinkrl.models.micro import build_micro_model, build_tokenizer
from thinkrl.train.critic import Critic
from thinkrl.types import Trajectory


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    return build_micro_model(build_tokenizer(), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, seed=0)


def _trajs(n_groups=2, n=3, prompt_len=5, seed=0) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        prompt = [rng.randrange(8, 100) for _ in range(prompt_len)]
        for j in range(n):
            resp = [rng.randrange(8, 100) for _ in range(rng.randint(2, 7))]
            toks = prompt + resp
            out.append(Trajectory(sample_id=f"s{g}", group_id=f"g{g}", tokens=toks,
                                  loss_mask=[False] * prompt_len + [True] * len(resp), logprobs=[0.0] * len(toks),
                                  versions=[-1] * prompt_len + [0] * len(resp), reward=float((g + j) % 2),
                                  prompt_len=prompt_len))
    return out


def _critic(policy, *, head_seed: int | None = 1, **algo) -> Critic:
    c = Critic(policy, AlgoConfig(**algo), TrainConfig(max_tokens_per_mb=4096))
    if head_seed is not None:  # the head starts at 0; give it weights so values are informative
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            c.model.head.weight.copy_(torch.randn(c.model.head.weight.shape, generator=g))
            c.model.head.bias.fill_(0.3)
    return c


def test_initial_values_are_zero_and_policy_untouched(policy):
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    c = _critic(policy, head_seed=None, critic_lr=0.05)
    trajs = _trajs()
    assert all(torch.equal(v, torch.zeros(len(t.tokens))) for v, t in zip(c.values(trajs), trajs))
    body0 = {k: v.clone() for k, v in c.model.body.state_dict().items()}
    assert all(torch.equal(v, before[f"model.{k}"]) for k, v in body0.items())  # starts from the policy's body
    c.step(trajs, [[1.0] * len(t.tokens) for t in trajs])
    assert c.model.head.weight.abs().sum() > 0  # a zero head passes no gradient to the body at first ...
    c.step(trajs, [[1.0] * len(t.tokens) for t in trajs])
    assert any(not torch.equal(v, body0[k]) for k, v in c.model.body.state_dict().items())  # ... then it trains
    for k, v in policy.state_dict().items():  # its own copy: the policy is untouched
        assert torch.equal(v, before[k]), k


def test_values_aligned_zero_at_start(policy):
    c = _critic(policy)
    trajs = _trajs()
    vals = c.values(trajs)
    body, head = c.model.body, c.model.head
    with torch.no_grad():
        for t, v in zip(trajs, vals):
            assert v.shape == (len(t.tokens),) and v[0] == 0.0
            h = body(input_ids=torch.tensor([t.tokens])).last_hidden_state[0]
            want = head(h)[:, 0]  # V(tokens[:t]) is read at position t - 1
            torch.testing.assert_close(v[1:], want[:-1], atol=1e-5, rtol=1e-4)
    # values[t] must not see tokens[t]: changing the last token leaves every value unchanged
    t = trajs[0]
    t2 = Trajectory(**{**t.__dict__, "tokens": t.tokens[:-1] + [(t.tokens[-1] + 1) % 90 + 8]})
    torch.testing.assert_close(c.values([t2])[0], vals[0], atol=1e-5, rtol=1e-4)


def test_packed_shared_prompt_matches_padded(policy):
    c = _critic(policy)
    trajs = _trajs()
    shared = c.values(trajs)
    c.tcfg = TrainConfig(max_tokens_per_mb=4096, packing=False)
    padded = c.values(trajs)
    c.tcfg = TrainConfig(max_tokens_per_mb=16, share_prompt=False)  # several micro-batches
    split = c.values(trajs)
    for a, b, s in zip(shared, padded, split):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a, s, atol=1e-5, rtol=1e-4)


def test_loss_decreases_fitting_fixed_returns(policy):
    c = _critic(policy, critic_lr=3e-3)
    trajs = _trajs(seed=3)
    rng = random.Random(0)
    returns = [[rng.uniform(-1, 1) if m else 0.0 for m in t.loss_mask] for t in trajs]
    losses = [c.step(trajs, returns)["loss/value"] for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0], losses
    assert c.steps == 40
    m = c.step(trajs, returns)
    assert m["value/explained_var"] > 0.5 and {"critic/grad_norm", "critic/lr", "value/mean"} <= set(m)


def test_loss_is_split_invariant(policy):
    """Global token-count aggregation: the loss and the update do not depend on the micro-batch split."""
    a = _critic(policy, critic_lr=1e-2)
    b = copy.deepcopy(a)
    b.tcfg = TrainConfig(max_tokens_per_mb=16, share_prompt=False)
    assert len(b._micro_batches(_trajs())) > 2
    trajs = _trajs(seed=5)
    returns = [[float(i % 3) - 1.0 for i in range(len(t.tokens))] for t in trajs]
    ma, mb = a.step(trajs, returns), b.step(trajs, returns)
    assert ma["loss/value"] == pytest.approx(mb["loss/value"], rel=1e-5)
    assert ma["critic/grad_norm"] == pytest.approx(mb["critic/grad_norm"], rel=1e-4)
    for (k, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=k)


def test_value_loss_hand_computed(policy):
    c = _critic(policy, critic_lr=1e-9)
    trajs = _trajs()
    v = c.values(trajs)
    returns = [[float(j) for j in range(len(t.tokens))] for t in trajs]
    want = sum(0.5 * (r - float(x)) ** 2 for t, vv, rr in zip(trajs, v, returns)
               for m, x, r in zip(t.loss_mask, vv, rr) if m) / sum(t.num_response_tokens for t in trajs)
    assert c.step(trajs, returns)["loss/value"] == pytest.approx(want, rel=1e-4)


def test_value_clipping_engages(policy):
    trajs = _trajs()
    returns = [[5.0] * len(t.tokens) for t in trajs]
    clipped = _critic(policy, critic_lr=2e-3, value_clip=0.01, ppo_epochs=3).step(trajs, returns)
    free = _critic(policy, critic_lr=2e-3, value_clip=0.0, ppo_epochs=3).step(trajs, returns)
    assert clipped["value/clip_frac"] > 0.5 and free["value/clip_frac"] == 0.0
    assert clipped["loss/value"] > free["loss/value"]  # clipped values cannot move towards the target


def test_gae_with_critic_values_through_make_batch(policy):
    c = _critic(policy)
    trajs = _trajs()
    values = c.values(trajs)
    acfg = AlgoConfig(advantage="gae", gamma=1.0, lam=1.0, adv_whiten=False)
    batch = make_batch(trajs, acfg, max_new_tokens=8, values=values)
    returns = gae_targets(trajs, acfg, 8, values)
    for t, v, adv, ret in zip(trajs, values, batch.advantages, returns):
        for m, x, a, r in zip(t.loss_mask, v.tolist(), adv, ret):  # gamma = lam = 1: A_t = r - V_t, R_t = r
            assert (a, r) == (pytest.approx(t.reward - x, abs=1e-5), pytest.approx(t.reward)) if m else (a, r) == (0.0, 0.0)
    lam = AlgoConfig(advantage="gae", gamma=1.0, lam=0.5, adv_whiten=False)
    t, v = trajs[0], values[0].tolist()
    p = t.prompt_len
    adv = make_batch(trajs, lam, 8, values=values).advantages[0]
    # last token: delta = r - V ; the one before: delta' + 0.5 * delta with delta' = V_last - V_before
    assert adv[-1] == pytest.approx(t.reward - v[-1], abs=1e-5)
    assert adv[-2] == pytest.approx(v[-1] - v[-2] + 0.5 * (t.reward - v[-1]), abs=1e-5)
    assert adv[p - 1] == 0.0
    with pytest.raises(ValueError, match="needs a values tensor"):
        make_batch(trajs, acfg, 8)
    with pytest.raises(ValueError, match=r"values\[1\]"):
        make_batch(trajs, acfg, 8, values=[values[0], values[1][:-1], *values[2:]])


def test_warmup_and_state_roundtrip(policy):
    c = _critic(policy, critic_warmup_steps=1, critic_lr=0.01)
    trajs = _trajs()
    assert c.warming_up
    c.step(trajs, [[1.0] * len(t.tokens) for t in trajs])
    assert not c.warming_up
    fresh = _critic(policy, head_seed=None, critic_warmup_steps=1)
    fresh.load_state_dict(c.state_dict())
    assert fresh.steps == 1 and not fresh.warming_up
    for a, b in zip(c.values(trajs), fresh.values(trajs)):
        torch.testing.assert_close(a, b)


def test_maybe_create_only_for_gae(policy):
    from thinkrl.config import Config
    from thinkrl.system.setup import Run

    cfg = Config()
    run = Run(cfg, torch.device("cpu"), policy, None, None, [], [])
    assert Critic.maybe_create(cfg, run) is None
    cfg.algo.advantage = "gae"
    assert isinstance(Critic.maybe_create(cfg, run), Critic)


def test_lora_policy_gets_a_merged_full_critic(policy):
    pytest.importorskip("peft")
    from thinkrl.config import ModelConfig
    from thinkrl.models.lora import apply_lora, is_lora

    lora = apply_lora(copy.deepcopy(policy), ModelConfig(lora_r=4))
    c = _critic(lora)
    assert is_lora(lora) and not is_lora(c.model.body)
    assert all(p.requires_grad for p in c.model.parameters())
    assert not any("lora" in k for k in c.model.state_dict())
