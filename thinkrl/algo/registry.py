"""Name -> function registries for advantage estimators, losses, KL estimators, loss aggregation and
rollout corrections (engine vs trainer log-probs)."""
from __future__ import annotations

from typing import Callable

ADVANTAGES: dict[str, Callable] = {}
LOSSES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
LOSS_AGGS: dict[str, Callable] = {}
ROLLOUT_CORRECTIONS: dict[str, Callable] = {}


class UnknownNameError(ValueError, KeyError):
    """An unknown registry name. A ValueError (bad user input) and, for old callers, a KeyError."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _register(table: dict, kind: str, name: str):
    def deco(fn):
        if name in table:
            raise ValueError(f"{kind} {name!r} registered twice")
        table[name] = fn
        return fn

    return deco


def register_advantage(name: str):
    return _register(ADVANTAGES, "advantage estimator", name)


def register_loss(name: str):
    return _register(LOSSES, "loss", name)


def register_kl(name: str):
    return _register(KL_ESTIMATORS, "KL estimator", name)


def register_loss_agg(name: str):
    return _register(LOSS_AGGS, "loss aggregation", name)


def register_rollout_correction(name: str):
    return _register(ROLLOUT_CORRECTIONS, "rollout correction", name)


def _get(table: dict, kind: str, name: str) -> Callable:
    from thinkrl.algo import _load_all

    _load_all()
    if name not in table:
        raise UnknownNameError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def get_advantage(name: str) -> Callable:
    return _get(ADVANTAGES, "advantage estimator", name)


def get_loss(name: str) -> Callable:
    return _get(LOSSES, "loss", name)


def get_kl(name: str) -> Callable:
    return _get(KL_ESTIMATORS, "KL estimator", name)


def get_loss_agg(name: str) -> Callable:
    return _get(LOSS_AGGS, "loss aggregation", name)


def get_rollout_correction(name: str) -> Callable:
    return _get(ROLLOUT_CORRECTIONS, "rollout correction", name)
