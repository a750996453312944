"""A fair shot for every policy: settings chosen on a validation slice of the policy split, never on dev.

The comparison (:mod:`benchmarks.compare`) cuts the policy split's table into a fitting part and a
validation slice (:func:`validation_split`, a seeded fifth of the rows). Then:

* each learner trains once per candidate of its class's ``candidates`` (constructor arguments and
  learn budget, a handful each: the stated budget of the search) on the fitting part, at the
  default price and seed 0, and is scored on the validation slice by the AUC of its curve there
  (its default point and its threshold sweep, :func:`validation_auc`); the best candidate's settings
  train every price and seed of the comparison, on the same fitting part (no policy trains on the
  validation slice, which also chooses the points of every curve:
  :func:`benchmarks.compare.choose_curves`);
* each rule's operating point (the table's row; its swept curve is unchanged) is the fastest setting
  of its sweep whose validation metric is within ``tolerance`` of the full model's on that slice
  (:func:`agents.rules.calibrated_rule`), so that a rule used without a threshold fits the model
  at hand.

Every candidate's validation AUC and the choice are written into ``results.json`` (``tuning``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ee_gym.evaluation import VALIDATION_FRACTION, validation_split  # noqa: F401 (re-exported)


def validation_auc(policy, table, sweep_points: int) -> float:
    """The AUC (:func:`benchmarks.paired.auc_of`) of a trained policy's curve on ``table``: its
    default point and, when it sweeps a threshold, ``sweep_points`` thresholds placed on its scores."""
    from benchmarks.paired import auc_of
    from ee_gym.evaluation import curve_anchors, evaluate, evaluate_sweep

    results = [evaluate(policy, table)]
    if policy.sweeps_threshold and sweep_points >= 2:
        results += evaluate_sweep(policy, table, num=sweep_points)
    full, first = curve_anchors(table)
    return auc_of([(r.speedup, r.score) for r in results], full, first, table.num_layers)


@dataclass
class LearnerChoice:
    """The search of one learner: every candidate's validation AUC, and the one chosen."""

    learner: str
    candidates: list[dict[str, Any]] = field(default_factory=list)  # params, budget, validation_auc, seconds
    chosen: int = 0

    @property
    def params(self) -> dict[str, Any]:
        return self.candidates[self.chosen]["params"]

    @property
    def budget(self) -> dict[str, Any]:
        return self.candidates[self.chosen]["budget"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_learner_settings(
    name: str,
    fit,
    validation,
    alpha: float,
    reward: str,
    sweep_points: int,
    fixed: dict[str, Any] | None = None,
    seed: int = 0,
) -> LearnerChoice:
    """Train ``name`` once per candidate of its class on ``fit`` (seed ``seed``, price ``alpha``),
    score each on ``validation`` and keep the best AUC (the first, the defaults, on a tie).
    ``fixed``: constructor arguments every candidate keeps (e.g. a step budget given on the command line)."""
    from agents.__main__ import train_policy
    from ee_gym.observations import get_obs_mode
    from ee_gym.policy import policy_class

    choice = LearnerChoice(name)
    for params, budget in policy_class(name).candidates:
        mode = params.get("obs_mode")
        if fit.num_labels == 1 and mode is not None and get_obs_mode(mode).confidence_signal == "top2_gap":
            continue  # a regression head has no softmax to read a confidence from
        if fit.num_labels == 1 and budget.get("loss_weights") == "balanced":
            continue  # nor classes to balance
        began = time.perf_counter()
        params = {**params, **(fixed or {})}
        policy, _ = train_policy(name, fit, alpha, reward, seed, budget=budget, **params)
        auc = validation_auc(policy, validation, sweep_points)
        choice.candidates.append(
            {"params": params, "budget": dict(budget), "validation_auc": auc,
             "seconds": round(time.perf_counter() - began, 2)}
        )  # fmt: skip
    aucs = [c["validation_auc"] for c in choice.candidates]
    choice.chosen = int(np.argmax(aucs))  # argmax keeps the first of equal values
    return choice
