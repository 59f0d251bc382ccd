"""RL objectives as pure functions on tensors: advantage estimators, policy losses, rollout corrections, KL,
aggregation.

Each pluggable part is registered by name; configs refer to the names.
"""
from thinkrl.algo.registry import (  # noqa: F401
    ADVANTAGES,
    KL_ESTIMATORS,
    LOSS_AGGS,
    LOSSES,
    ROLLOUT_CORRECTIONS,
    UnknownNameError,
    get_advantage,
    get_kl,
    get_loss,
    get_loss_agg,
    get_rollout_correction,
    register_advantage,
    register_kl,
    register_loss,
    register_loss_agg,
    register_rollout_correction,
)


def _load_all() -> None:
    from thinkrl.algo import advantages, aggregation, corrections, kl, losses  # noqa: F401


def registered_advantages() -> list[str]:
    _load_all()
    return sorted(ADVANTAGES)


def registered_losses() -> list[str]:
    _load_all()
    return sorted(LOSSES)


def registered_kl() -> list[str]:
    _load_all()
    return sorted(KL_ESTIMATORS)


def registered_loss_aggs() -> list[str]:
    _load_all()
    return sorted(LOSS_AGGS)


def registered_rollout_corrections() -> list[str]:
    _load_all()
    return sorted(ROLLOUT_CORRECTIONS)
