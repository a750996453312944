"""One evaluation loop for every exit policy: run it over a split, score it, count layers.

Every input of the split is one episode in the native vector env (all at once, or in batches);
the policy acts until each input has exited once. Reported: the task metric of the predictions at
the exit layers, the mean exit layer, saved layers (1 - mean/L), the layer speed-up (L / mean) and
the histogram of exit layers.

A policy that sweeps its decision threshold (``ExitPolicy.sweeps_threshold``) also traces a whole
curve from one training run: :func:`evaluate_sweep` scores it at every threshold of a sweep (one
:class:`EvalResult` each, ``threshold`` set), placed on the policy's own scores over the table
(:func:`table_scores`), so a learner's curve is as dense as a rule's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.policy import ExitPolicy, make_policy
from ee_gym.tasks import UnknownTaskError, compute_metrics
from ee_gym.validation import ConfigError, check_float


@dataclass
class EvalResult:
    policy: str
    task: str
    split: str
    metric: str  # the task's primary metric
    metrics: dict[str, float]
    mean_exit_layer: float
    saved_layers: float
    speedup: float
    exit_histogram: list[int]  # inputs exiting at layer 1..L
    deployable: bool = True
    exit_layers: np.ndarray = field(default=None, repr=False)  # [N] 1..L
    predictions: np.ndarray = field(default=None, repr=False)  # [N]
    #: the decision threshold it acted at (:func:`evaluate_sweep`); None: the policy's own rule
    threshold: float | None = None

    @property
    def score(self) -> float:
        """The primary metric."""
        return self.metrics[self.metric]

    def to_dict(self) -> dict:
        """JSON-ready numbers (without the per-input arrays)."""
        record = asdict(self)
        record.pop("exit_layers")
        record.pop("predictions")
        if record["threshold"] is None:  # results of a policy's own rule read as they always did
            record.pop("threshold")
        return record


def score_predictions(task: str, predictions: np.ndarray, labels: np.ndarray) -> tuple[str, dict[str, float]]:
    """(primary metric name, metrics) for a task; accuracy for tables of unregistered tasks."""
    try:
        metrics = compute_metrics(task, predictions, labels)
    except UnknownTaskError:
        metrics = {"accuracy": float(np.mean(predictions == labels))}
    return next(iter(metrics)), metrics


def _batches(policy: ExitPolicy, table: ExitTable, batch_size: int):
    """(rows, vector env bound to ``policy``, first observations) for each batch of the table's inputs."""
    for start in range(0, table.num_inputs, batch_size):
        rows = np.arange(start, min(start + batch_size, table.num_inputs))
        env = ConsistentEEVectorEnv(
            num_envs=len(rows), table=table, split=table.split, obs_mode=policy.obs_mode, final_obs=False
        )
        policy.bind(env)
        obs, _ = env.reset(options={"index": rows})
        yield rows, env, obs


def run_policy(policy: ExitPolicy, table: ExitTable, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exit layer and prediction of every input of the table under ``policy``."""
    n, num_layers = table.num_inputs, table.num_layers
    exit_layers = np.zeros(n, dtype=np.int64)
    predictions = np.zeros(n, dtype=table.predictions.dtype)  # label ids, or values for regression
    for rows, env, obs in _batches(policy, table, batch_size):
        active = np.ones(len(rows), dtype=bool)
        for _ in range(num_layers):
            obs, _, exited, _, info = env.step(policy.act(obs, deterministic=True))
            newly = exited & active
            if newly.any():  # rows that exited before now act on new inputs: their results are ignored
                final = info["final_info"]
                exit_layers[rows[newly]] = final["exit_layer"][newly]
                predictions[rows[newly]] = final["prediction"][newly]
                active &= ~exited
            if not active.any():
                break
    return exit_layers, predictions


def evaluate(policy: ExitPolicy, table: ExitTable, batch_size: int = 8192) -> EvalResult:
    """Score ``policy`` on every input of ``table`` (see the module docstring)."""
    exit_layers, predictions = run_policy(policy, table, batch_size)
    metric, metrics = score_predictions(table.task, predictions, table.labels)
    mean = float(exit_layers.mean())
    histogram = np.bincount(exit_layers, minlength=table.num_layers + 1)[1:]
    return EvalResult(
        policy=policy.name,
        task=table.task,
        split=table.split,
        metric=metric,
        metrics=metrics,
        mean_exit_layer=mean,
        saved_layers=1.0 - mean / table.num_layers,
        speedup=table.num_layers / mean,
        exit_histogram=histogram.tolist(),
        deployable=policy.deployable,
        exit_layers=exit_layers,
        predictions=predictions,
    )


def full_depth_metrics(table: ExitTable) -> dict[str, float]:
    """The task metrics of every input at layer L: the model without early exits (what a static
    exit at L scores, without making that rule)."""
    return score_predictions(table.task, table.predictions[:, -1], table.labels)[1]


def curve_anchors(table: ExitTable) -> tuple[float, float]:
    """(the full model's metric, layer 1's metric) on ``table``: where every exit policy's curve
    ends (never exiting early, and exiting every input at layer 1)."""

    def metric(column: int) -> float:
        name, values = score_predictions(table.task, table.predictions[:, column], table.labels)
        return values[name]

    return metric(-1), metric(0)


def table_scores(policy: ExitPolicy, table: ExitTable, batch_size: int = 8192) -> np.ndarray:
    """``policy.exit_scores`` at every (input, layer) of ``table``: float64 [N, L].

    Each input continues to the last layer, so row i, column l-1 is the score the policy gives at
    layer l on the path every exit decision of input i lies on (whatever the threshold, an input
    reaches layer l only by continuing at 1..l-1). Scores below a policy's first allowed exit layer
    and at the last layer (always an exit) decide nothing but are listed too."""
    if not policy.sweeps_threshold:
        raise NotImplementedError(policy._no_sweep())
    scores = np.zeros((table.num_inputs, table.num_layers))
    for rows, env, obs in _batches(policy, table, batch_size):
        for layer in range(table.num_layers):
            scores[rows, layer] = policy.exit_scores(obs)
            obs = env.step(np.zeros(len(rows), dtype=np.int64))[0]  # CONTINUE (out at L anyway)
    return scores


def sweep_thresholds(
    policy: ExitPolicy, table: ExitTable, num: int = 21, batch_size: int = 8192
) -> np.ndarray:
    """``policy.threshold_sweep`` placed on its scores over ``table`` (pass a table other than the
    one the sweep is scored on, such as the policy split, to keep dev out of the placement)."""
    scores = table_scores(policy, table, batch_size)
    # only the layers that decide: from the first exit allowed (a min_layer, where a policy has
    # one) to the one before the last (where every input exits)
    first = getattr(policy, "min_layer", 1) - 1
    deciding = scores[:, first : table.num_layers - 1]
    return policy.threshold_sweep(deciding if deciding.size else scores, num=num)


def evaluate_sweep(
    policy: ExitPolicy,
    table: ExitTable,
    taus: Sequence[float] | np.ndarray | None = None,
    num: int = 21,
    batch_size: int = 8192,
) -> list[EvalResult]:
    """One :class:`EvalResult` per threshold of ``taus`` (in that order, ``threshold`` set) for the
    trained ``policy``, without retraining: each is :func:`evaluate` of
    ``policy.with_threshold(tau)``, which shares the policy's weights (``act`` is deterministic at
    each tau). ``taus`` None: ``policy.threshold_sweep`` on the policy's scores over this table
    (``num`` thresholds from the earliest exit to the latest, plus the default one).

    Why the table's own scores place the thresholds: a learner's scores crowd near 0 or 1 (or
    around a Q-margin of any scale), so an even grid would leave most of the curve between two
    points; quantiles put one point per slice of decisions. Mean exit layer never falls as tau rises.
    """
    if not policy.sweeps_threshold:
        raise NotImplementedError(policy._no_sweep())
    if taus is None:
        taus = sweep_thresholds(policy, table, num, batch_size)
    results = []
    for tau in taus:
        result = evaluate(policy.with_threshold(float(tau)), table, batch_size)
        result.threshold = float(tau)
        results.append(result)
    return results


#: the share of a policy split's rows held out to choose settings on (rules' and learners')
VALIDATION_FRACTION = 0.2


def validation_split(table, fraction: float = VALIDATION_FRACTION, seed: int = 0):
    """(fitting table, validation table): a seeded random ``fraction`` of the rows (at least one)
    for validation, the rest for fitting, each in the table's row order."""
    n = table.num_inputs
    if n < 2:
        raise ValueError(f"a validation slice needs a policy split of at least 2 inputs, got {n}")
    held = np.sort(np.random.default_rng(seed).permutation(n)[: max(1, math.ceil(fraction * n))])
    rest = np.setdiff1d(np.arange(n), held)
    return table.select(rest), table.select(held)  # (the split names stay: envs check them)


#: a calibrated rule keeps the metric within this of the full model's (1 point of accuracy)
RULE_TOLERANCE = 0.01


def calibrated_rule(name: str, table: ExitTable, tolerance: float = RULE_TOLERANCE) -> dict[str, Any]:
    """Settings of the rule ``name`` that fit this model: of its sweep (and its default), the one
    with the largest layer speed-up on ``table`` whose metric there is at least the full model's
    minus ``tolerance``; the rule's default settings when none is.

    Pass a table the rule will not be judged on (a validation slice of the policy split): a fixed
    default threshold suits some models and never fires on others (heads near-uniform after a short
    stage 1), while this one is read off the model itself. ``agents.make(name, **calibrated_rule(name,
    table))`` makes the rule; ``ee-gym predict --policy <rule>`` calibrates this way.
    """
    probe = make_policy(name)
    if probe.learns or not probe.deployable:
        raise ConfigError(f"{name!r} is not a rule: calibrated_rule picks a deployable rule's setting")
    tolerance = check_float("tolerance", tolerance, minimum=0.0)
    full, _ = curve_anchors(table)
    best, best_speed = probe.get_params(), -1.0
    for params in [probe.get_params(), *type(probe).sweep(table.num_layers, table.num_labels)]:
        result = evaluate(make_policy(name, **params), table)
        if result.score >= full - tolerance and result.speedup > best_speed:
            best, best_speed = params, result.speedup
    return best
