"""thinkrl's DPO against TRL 1.16's DPOTrainer: same tiny Llama, same pairs, same settings, one step.

Both start from identical weights; TRL runs two optimizer steps (batch = all pairs each time, AdamW, constant LR, no
warmup, fp32, no gradient checkpointing) and so does `dpo_step`. Checked: TRL's tokenisation equals
`encode_pair`'s; the loss at step 0, the loss at step 1 (after the first update: Adam's first step is blind
to the gradient's scale, the second is not, so β and the log-ratios show there) and every weight after the
two updates agree. Tolerances: float32 sums in
another order (one packed forward with a shared prompt vs TRL's padded batch) give the loss within 1e-5. Adam's
first step moves each weight by ~lr·sign(g), so a weight whose gradient is ~1e-8 can move differently on
rounding alone: every weight within 2% of lr, and at most 0.1% of a tensor's weights more than 1e-6 apart
(measured: 0.05% of one tensor, 1% of lr at most; the step itself moves weights by lr = 1e-3).
"""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from thinkrl.config import load_config  # noqa: E402
from thinkrl.data.pairs import encode_pair, parse_pair  # noqa: E402
from thinkrl.models.micro import build_micro_model, build_tokenizer  # noqa: E402
from thinkrl.train.dpo import dpo_step, pair_logps  # noqa: E402
from thinkrl.train.engine import TrainEngine  # noqa: E402

ROWS = [
    {"prompt": [{"role": "user", "content": "12+9"}], "chosen": [{"role": "assistant", "content": "2+9=11 1+1=2 \\boxed{21}"}],
     "rejected": [{"role": "assistant", "content": "2+9=11 1=1 \\boxed{11}"}]},
    {"prompt": [{"role": "user", "content": "58+67"}], "chosen": [{"role": "assistant", "content": "8+7=15 5+6+1=12 \\boxed{125}"}],
     "rejected": [{"role": "assistant", "content": "8+7=15 5+6=11 \\boxed{15}"}]},
    {"prompt": [{"role": "user", "content": "5+5"}], "chosen": [{"role": "assistant", "content": "5+5=10 \\boxed{10}"}],
     "rejected": [{"role": "assistant", "content": "5+5=10 \\boxed{0}"}]},
    {"prompt": [{"role": "user", "content": "199+1"}], "chosen": [{"role": "assistant", "content": "9+1=10 9+1=10 1+1=2 \\boxed{200}"}],
     "rejected": [{"role": "assistant", "content": "9+1=10 9=9 1=1 \\boxed{190}"}]},
]
BETA, LR, SFT_COEF = 0.1, 1e-3, 0.5


def _models():
    tok = build_tokenizer()
    model = build_micro_model(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=3)
    return tok, model


def _trl_step(tok, model, loss_type, tmp_path):
    from trl import DPOConfig, DPOTrainer

    types, weights = (["sigmoid", "sft"], [1.0, SFT_COEF]) if loss_type == "sigmoid+sft" else ([loss_type], None)

    args = DPOConfig(output_dir=str(tmp_path / loss_type), per_device_train_batch_size=len(ROWS), max_steps=2,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, beta=BETA,
                     loss_type=types, loss_weights=weights, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                     report_to=[], save_strategy="no", logging_steps=1, seed=0, dataloader_drop_last=False,
                     max_length=None, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tok)
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        loss0 = float(trainer.compute_loss(trainer.model, batch))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    toks = [(ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]) for i in range(len(ds))]
    return loss0, losses, toks, trainer.model


@pytest.mark.parametrize("loss_type", ["sigmoid", pytest.param("ipo", marks=pytest.mark.slow),
                                       pytest.param("sigmoid+sft", marks=pytest.mark.slow)])  # ~10 s each
def test_loss_and_first_update_match_trl(loss_type, tmp_path):
    tok, model = _models()
    ours_model = copy.deepcopy(model)
    loss0_trl, trl_losses, trl_toks, trl_model = _trl_step(tok, model, loss_type, tmp_path)

    pairs = [encode_pair(tok, parse_pair(r, f"row{i}")) for i, r in enumerate(ROWS)]
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [tuple(map(list, t)) for t in trl_toks]
    sft = f"dpo.sft_coef={SFT_COEF if loss_type == 'sigmoid+sft' else 0}"
    cfg = load_config(None, [f"dpo.loss={loss_type.split('+')[0]}", f"dpo.beta={BETA}", sft, "train.grad_clip=1.0"])
    trainer = TrainEngine(ours_model, cfg.train, cfg.algo, lr=LR, total_steps=2, warmup_steps=0)
    ref = pair_logps(trainer, pairs)
    m = dpo_step(trainer, pairs, ref, cfg.dpo)
    m2 = dpo_step(trainer, pairs, ref, cfg.dpo)  # the same batch again: its margins now depend on β and the update
    assert len(trl_losses) == 2 and m2["dpo/loss"] == pytest.approx(trl_losses[1], abs=1e-4)  # TRL logs 4 digits
    assert m2["dpo/loss"] != pytest.approx(m["dpo/loss"], abs=1e-4)
    assert m["dpo/loss"] == pytest.approx(loss0_trl, abs=1e-5)
    if loss_type == "sigmoid":  # at step 0 the policy is the reference: every margin is 0, the loss log 2
        assert m["dpo/loss"] == pytest.approx(0.6931472, abs=1e-6)
    theirs = dict(trl_model.named_parameters())
    start = dict(_models()[1].named_parameters())  # the same seed: the weights both started from
    for name, p in ours_model.named_parameters():
        d = (p - theirs[name]).abs()
        assert float(d.max()) < 0.02 * LR and float((d > 1e-6).float().mean()) < 1e-3, name
    # the steps moved the weights (by ~lr per weight under Adam), so the comparison above is not of two copies
    assert max(float((p - start[n]).abs().max()) for n, p in ours_model.named_parameters()) > 0.5 * LR
