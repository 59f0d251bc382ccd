"""RL objectives as pure functions on tensors: advantage estimators, policy losses, KL, aggregation.

Each pluggable part is registered by name; configs refer to the names.
"""
from thinkrl.algo.registry import (  # noqa: F401
    ADVANTAGES,
    KL_ESTIMATORS,
    LOSS_AGGS,
    LOSSES,
    UnknownNameError,
    get_advantage,
    get_kl,
    get_loss,
    get_loss_agg,
    register_advantage,
    register_kl,
    register_loss,
    register_loss_agg,
)


def _load_all() -> None:
    from thinkrl.algo import advantages, aggregation, kl, losses  # noqa: F401


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
