"""Seeded splits: random (the study's protocol), temporal and by user.

Validation rows are always carved from train, never from test.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pandas as pd

from engagerec.config import SplitConfig
from engagerec.data.errors import DataError
from engagerec.data.raw import TIMESTAMP, USER_ID

SPLIT_KINDS = ("random", "temporal", "user")


def _tail(order: np.ndarray, fraction: float) -> "tuple[np.ndarray, np.ndarray]":
    """(head, tail) of ``order`` with round(len * fraction) rows in the tail."""
    cut = len(order) - int(round(len(order) * fraction))
    return order[:cut], order[cut:]


def split_indices(events: pd.DataFrame, cfg: SplitConfig) -> Dict[str, np.ndarray]:
    """Row positions of train / val / test."""
    if cfg.kind not in SPLIT_KINDS:
        raise DataError(f"unknown split kind '{cfg.kind}'", expected=f"one of {SPLIT_KINDS}")
    for name in ("test_fraction", "val_fraction"):
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise DataError(f"split.{name} = {value}", expected="a fraction in [0, 1)")
    rng = np.random.default_rng(cfg.seed)
    n = len(events)
    if cfg.kind == "random":
        train, test = _tail(rng.permutation(n), cfg.test_fraction)
        train, val = _tail(train, cfg.val_fraction)
    elif cfg.kind == "temporal":
        if TIMESTAMP not in events.columns:
            raise DataError(
                "a temporal split needs a timestamp column",
                column=TIMESTAMP,
                expected="data.source.columns.timestamp to name it",
            )
        order = np.argsort(events[TIMESTAMP].to_numpy(), kind="stable")
        train, test = _tail(order, cfg.test_fraction)
        train, val = _tail(train, cfg.val_fraction)  # the latest train rows validate
    else:
        codes, users = pd.factorize(events[USER_ID])
        train_users, test_users = _tail(rng.permutation(len(users)), cfg.test_fraction)
        train_users, val_users = _tail(train_users, cfg.val_fraction)
        by_user = {
            name: np.flatnonzero(np.isin(codes, members))
            for name, members in (("train", train_users), ("val", val_users), ("test", test_users))
        }
        train, val, test = by_user["train"], by_user["val"], by_user["test"]
    splits = {"train": np.asarray(train), "val": np.asarray(val), "test": np.asarray(test)}
    if len(splits["train"]) == 0:
        raise DataError(
            f"the {cfg.kind} split left no training rows ({n} rows in all)",
            expected="more rows or smaller test/val fractions",
        )
    return splits
