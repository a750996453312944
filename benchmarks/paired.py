"""Paired bootstrap comparisons of exit policies scored on the same evaluation inputs.

Every policy of a comparison is scored on the same dev inputs, and the dominant noise in a table is
which inputs happen to be in dev (RTE's full model: 53.4-64.6 over 277 inputs). Comparing two
policies' intervals side by side (unpaired) counts that noise twice; resampling the inputs *jointly*
for both policies cancels the part they share, so a paired difference resolves far smaller gaps.

One bootstrap replicate draws n input indices with replacement (numpy's seeded Generator; the same
draw for every policy) and, for learners, S of their S seeds with replacement (the same draw for every
policy with the same number of seeds: "the seeds jointly"). On that replicate every run is re-scored
from its per-input predictions (the task metric recomputed: accuracy, F1 or Matthews correlation, from
confusion counts; a regression task's correlation, the mean of Pearson's and Spearman's, from the
replicate's weighted moments and mid-ranks; each equal to :func:`ee_gym.tasks.compute_metrics` on
the resampled inputs) and per-input exit layers (its layer
speed-up L / mean exit layer), each curve is re-formed exactly as :func:`benchmarks.compare.curve_auc`
forms it (its runs plus the full-model and layer-1 anchors, linear between them in speed-up order;
with ``Curve.frontier`` only the runs on the replicate's upper frontier, for curves whose runs were
not chosen beforehand) and read off as

* ``auc``: the mean metric over speed-ups 1x to L/2 x;
* ``metric@<s>x``: the curve's metric at layer speed-up s (1.25x, 1.5x, 2x, 3x by default), only where
  both curves reach s (some run of every seed at or past s; a curve is not credited for the straight
  line to its layer-1 anchor).

The interval is the percentile interval of the replicates' differences; the point estimate is the
difference on the inputs as they are. A reference marked ``flat`` (the full model) is a line at its
metric: its "AUC" is its metric, and the difference to it says what early exit costs.

Index resampling instead of ``scipy.stats.bootstrap(paired=True)``: scipy would recompute each
statistic per pair, while here one draw serves every policy and every pair (one matrix product per
replicate block), so ~30 runs x 2,000 replicates take about a second.

Why in ``benchmarks/`` and not the core: it judges policies against each other from their scored
outcomes, which is the comparison's job (:mod:`benchmarks.compare`); nothing in ``ee_gym`` needs it.

Records follow the results contract: ``{"policy", "reference", "statistic", "delta", "low", "high"}``
with the metric in points (percent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "BootstrapSettings",
    "Curve",
    "Outcome",
    "Replicates",
    "Setup",
    "auc_of",
    "batched_metric",
    "best_by_auc",
    "check_same_inputs",
    "compare_policies",
    "difference",
    "metric_difference",
    "tie_share",
    "tie_speedups",
    "ties_unresolved",
    "minimum_detectable_auc",
    "paired_difference",
    "paired_replicates",
    "read_curve",
    "unpaired_difference",
    "verdict",
]

#: the metrics the paired statistics recompute per replicate ("correlation": a regression task's)
PAIRED_METRICS = ("accuracy", "f1", "matthews", "correlation")
AUC_GRID_POINTS = 101  # as benchmarks.compare.curve_auc: 101 speed-ups from 1x to L/2 x
_BLOCK_BYTES = 64 * 2**20  # replicate blocks keep the resampling weights under this size


@dataclass(frozen=True)
class BootstrapSettings:
    """How many replicates, which interval, which seed, and which matched speed-ups."""

    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    speedups: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0)

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        if any(s < 1 for s in self.speedups):
            raise ValueError(f"matched speed-ups must be at least 1x, got {self.speedups}")


@dataclass(frozen=True)
class Outcome:
    """One run (a policy at one setting and seed) on the evaluation inputs: what it said, where it exited."""

    predictions: np.ndarray  # [n] label ids (or 0/1 correctness when the setup has no labels)
    exit_layers: np.ndarray  # [n] 1..L
    seed: int | None = None
    ids: np.ndarray | None = field(default=None, repr=False)  # [n] input ids, checked against the setup's

    @classmethod
    def from_eval(cls, result: Any, seed: int | None = None) -> Outcome:
        """From an :class:`ee_gym.evaluation.EvalResult` (which keeps the per-input arrays)."""
        return cls(np.asarray(result.predictions), np.asarray(result.exit_layers), seed)


@dataclass(frozen=True)
class Curve:
    """A policy's runs (its thresholds, prices and seeds) that together trace its curve."""

    label: str
    runs: tuple[Outcome, ...]
    flat: bool = False  # a single-run reference (the full model) compared as a flat line at its metric
    # True: the curve is the upper frontier of its runs on each replicate (a pick on the very inputs
    # being scored, which favours curves with more runs); False: the runs as they are, in speed-up
    # order (the comparison chooses them on a validation slice first, so dev makes no second pick)
    frontier: bool = True

    @property
    def seeds(self) -> tuple[int | None, ...]:
        """The distinct seeds, sorted (``(None,)`` for a deterministic rule)."""
        return tuple(
            sorted({r.seed for r in self.runs}, key=lambda s: (s is None, s if s is not None else 0))
        )


@dataclass(frozen=True)
class Setup:
    """The evaluation inputs every policy was scored on, and the two anchors of every curve.

    ``labels`` None means every run's ``predictions`` are 0/1 correctness and the metric is accuracy.
    ``ids`` (optional) names the inputs; every run that carries ids must carry these, in this order.
    """

    metric: str  # "accuracy" | "f1" | "matthews" | "correlation" (regression: values, not label ids)
    num_labels: int
    num_layers: int
    labels: np.ndarray | None
    full: Outcome  # the full model (static exit at L): the curve's 1x anchor
    first_layer: Outcome | None = None  # static exit at layer 1: the L x anchor (None: flat far end)
    ids: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def for_task(cls, task: str, num_layers: int, labels: Any, full: Outcome, first_layer: Outcome | None = None,
                 ids: Any = None) -> Setup:  # fmt: skip
        """The setup of a registered task (its metric and label count); accuracy for unregistered ones."""
        from ee_gym.tasks import UnknownTaskError, get_task

        try:
            spec = get_task(task)
            metric, num_labels = spec.metric, spec.num_labels
        except UnknownTaskError:
            metric, num_labels = "accuracy", int(np.max(labels)) + 1
        return cls(metric, num_labels, num_layers, np.asarray(labels), full, first_layer,
                   None if ids is None else np.asarray(ids))  # fmt: skip

    @property
    def size(self) -> int:
        return len(self.full.predictions)


# -- checks (all before any work) -----------------------------------------------------------------------
def _check(setup: Setup, curves: Sequence[Curve]) -> None:
    if setup.metric not in PAIRED_METRICS:
        raise ValueError(f"metric must be one of {', '.join(PAIRED_METRICS)}, not {setup.metric!r}")
    regression = setup.metric == "correlation"
    if regression and setup.labels is None:
        raise ValueError("a correlation needs the labels (real values)")
    if setup.labels is None and setup.metric != "accuracy":
        raise ValueError(f"per-input correctness (labels=None) scores accuracy only, not {setup.metric!r}")
    n = setup.size
    if n == 0:
        raise ValueError("no evaluation inputs")
    if setup.labels is not None and np.shape(setup.labels) != (n,):
        raise ValueError(f"labels have shape {np.shape(setup.labels)} but the full model scored {n} inputs")
    if setup.ids is not None and np.shape(setup.ids) != (n,):
        raise ValueError(f"ids have shape {np.shape(setup.ids)} but the full model scored {n} inputs")
    top = setup.num_labels if setup.labels is not None else 2
    anchors = [("full model", setup.full)] + ([("layer 1", setup.first_layer)] if setup.first_layer else [])
    named = anchors + [(c.label, r) for c in curves for r in c.runs]
    labels = [c.label for c in curves]
    if len(set(labels)) != len(labels):
        raise ValueError(f"curve labels must be distinct, got {labels}")
    for curve in curves:
        if not curve.runs:
            raise ValueError(f"curve {curve.label!r} has no runs")
        if curve.flat and len(curve.runs) != 1:
            raise ValueError(f"flat curve {curve.label!r} must be one run, got {len(curve.runs)}")
        if len({r.seed is None for r in curve.runs}) > 1:
            raise ValueError(f"curve {curve.label!r} mixes seeded and unseeded runs")
    for name, run in named:
        pred, exits = np.asarray(run.predictions), np.asarray(run.exit_layers)
        if pred.shape != (n,) or exits.shape != (n,):
            raise ValueError(
                f"{name}: predictions {pred.shape} and exit layers {exits.shape} must both be ({n},), the "
                "evaluation inputs every policy is scored on"
            )
        if regression:
            if not np.isfinite(pred.astype(np.float64)).all():
                raise ValueError(f"{name}: predictions must be finite numbers")
        elif not np.issubdtype(pred.dtype, np.integer) and pred.dtype != bool:
            raise ValueError(f"{name}: predictions must be label ids, got dtype {pred.dtype}")
        elif pred.min() < 0 or pred.max() >= top:
            raise ValueError(f"{name}: predictions must lie in 0..{top - 1}")
        if exits.min() < 1 or exits.max() > setup.num_layers:
            raise ValueError(f"{name}: exit layers must lie in 1..{setup.num_layers}")
        if run.ids is not None and setup.ids is not None:
            try:
                check_same_inputs(setup.ids, run.ids)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None


def check_same_inputs(ids_a: Any, ids_b: Any) -> None:
    """Raise unless two runs were scored on the same inputs in the same order (by their ids)."""
    a, b = np.asarray(ids_a), np.asarray(ids_b)
    if a.shape != b.shape:
        raise ValueError(f"the runs were scored on {a.shape[0]} and {b.shape[0]} inputs: not the same inputs")
    if not np.array_equal(a, b):
        where = int(np.flatnonzero(a != b)[0])
        raise ValueError(
            f"the runs' input ids differ first at position {where} ({a[where]!r} vs {b[where]!r})"
        )


# -- metrics from confusion counts ----------------------------------------------------------------------
def batched_metric(metric: str, confusion: np.ndarray) -> np.ndarray:
    """The metric of confusion matrices [..., K, K] (true x predicted), as sklearn computes it.

    F1 is the positive class's (label 1) for two labels and the macro average otherwise, 0 where it is
    undefined (``zero_division=0``); Matthews correlation is 0 where a marginal is constant.
    """
    c = np.asarray(confusion, dtype=np.float64)
    total = c.sum(axis=(-2, -1))
    diag = np.diagonal(c, axis1=-2, axis2=-1)
    if metric == "accuracy":
        return diag.sum(-1) / total
    true, pred = c.sum(-1), c.sum(-2)  # [..., K]
    if metric == "f1":
        denom = true + pred  # 2 tp + fp + fn
        f1 = np.divide(2 * diag, denom, out=np.zeros_like(denom), where=denom > 0)
        return f1[..., 1] if c.shape[-1] == 2 else f1.mean(-1)
    if metric == "matthews":
        cov_tp = diag.sum(-1) * total - (true * pred).sum(-1)
        cov_pp = total**2 - (pred * pred).sum(-1)
        cov_tt = total**2 - (true * true).sum(-1)
        denom = np.sqrt(cov_tt * cov_pp)
        return np.divide(cov_tp, denom, out=np.zeros_like(denom), where=denom > 0)
    raise ValueError(f"unknown metric {metric!r}")


# -- curves ---------------------------------------------------------------------------------------------
def _frontier_mask(speed: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """[R, P] True where a point is on its replicate's frontier, exactly as compare.frontier keeps it.

    Points by speed-up then metric, both descending (stable, so of exact duplicates the first stays);
    a point stays if its metric beats every point before it.
    """
    by_metric = np.argsort(-metric, axis=1, kind="stable")
    by_speed = np.argsort(-np.take_along_axis(speed, by_metric, 1), axis=1, kind="stable")
    order = np.take_along_axis(by_metric, by_speed, 1)
    ranked = np.take_along_axis(metric, order, 1)
    before = np.maximum.accumulate(ranked, axis=1)
    before = np.concatenate([np.full((len(ranked), 1), -np.inf), before[:, :-1]], axis=1)
    keep = np.empty_like(ranked, dtype=bool)
    np.put_along_axis(keep, order, ranked > before, 1)
    return keep


def _interp_frontier(
    speed: np.ndarray, metric: np.ndarray, at: np.ndarray, frontier: bool = True
) -> np.ndarray:
    """[R, G]: each replicate's curve read at speed-ups ``at`` [G], linear between its points in
    speed-up order: the points on the replicate's frontier, or (``frontier`` False) all of them.

    np.interp one row at a time, vectorised: off-frontier points move to +inf and sort last, and a
    speed-up outside a row's points takes the nearest end's metric. Rows go in blocks (dense curves
    have hundreds of points).
    """
    rows = max(1, _BLOCK_BYTES // (8 * speed.shape[1] * len(at)))
    if len(speed) > rows:
        return np.concatenate(
            [
                _interp_frontier(speed[i : i + rows], metric[i : i + rows], at, frontier)
                for i in range(0, len(speed), rows)
            ]
        )
    keep = _frontier_mask(speed, metric) if frontier else np.ones(speed.shape, dtype=bool)
    xs = np.where(keep, speed, np.inf)
    order = np.argsort(xs, axis=1, kind="stable")
    xs = np.take_along_axis(xs, order, 1)
    ys = np.take_along_axis(metric, order, 1)
    last = keep.sum(1)[:, None] - 1  # [R, 1]
    pos = (xs[:, None, :] <= at[None, :, None]).sum(-1)  # [R, G]: points at or left of each speed-up
    left = np.clip(pos - 1, 0, last)
    right = np.minimum(pos, last)
    x0, x1 = np.take_along_axis(xs, left, 1), np.take_along_axis(xs, right, 1)
    y0, y1 = np.take_along_axis(ys, left, 1), np.take_along_axis(ys, right, 1)
    span = x1 - x0
    t = np.divide(at[None, :] - x0, span, out=np.zeros_like(span), where=span > 0)
    return y0 + np.clip(t, 0, 1) * (y1 - y0)


def _grid(num_layers: int) -> np.ndarray:
    return np.linspace(1.0, num_layers / 2, AUC_GRID_POINTS)


def read_curve(points: Sequence[tuple[float, float]], full: float, first_layer: float, num_layers: int,
               at: np.ndarray, frontier: bool = True) -> np.ndarray:  # fmt: skip
    """One curve (its points plus the full-model and layer-1 anchors) read at speed-ups ``at``."""
    pts = np.asarray([*points, (1.0, full), (float(num_layers), first_layer)], dtype=np.float64)
    return _interp_frontier(pts[None, :, 0], pts[None, :, 1], np.asarray(at, dtype=np.float64), frontier)[0]


def auc_of(points: Sequence[tuple[float, float]], full: float, first_layer: float, num_layers: int,
           frontier: bool = True) -> float:  # fmt: skip
    """One curve's AUC as :func:`benchmarks.compare.curve_auc` defines it (this module's own reading)."""
    return float(read_curve(points, full, first_layer, num_layers, _grid(num_layers), frontier).mean())


# -- replicates -----------------------------------------------------------------------------------------
@dataclass
class Replicates:
    """Every curve's bootstrap replicates and its point estimates (metric as a fraction)."""

    auc: dict[str, np.ndarray]  # label -> [R]
    at: dict[str, np.ndarray]  # label -> [R, len(speedups)]
    point_auc: dict[str, float]
    point_at: dict[str, np.ndarray]  # label -> [len(speedups)]
    reach: dict[str, float]  # label -> the speed-up every seed's runs reach (inf for a flat reference)
    speedups: tuple[float, ...]
    flat: set[str]  # labels compared as flat lines


def _weights(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """[R, n] how often each input is drawn in each replicate (index resampling with replacement)."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = idx + (np.arange(resamples) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def _score_runs(setup: Setup, runs: list[Outcome], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(metric [R, runs], layer speed-up [R, runs]) of every run on every replicate's inputs."""
    exits = np.stack([np.asarray(r.exit_layers, dtype=np.float64) for r in runs], axis=1)  # [n, runs]
    mean_exit = (weights @ exits) / weights.sum(1, keepdims=True)
    if setup.metric == "correlation":
        labels = np.asarray(setup.labels, dtype=np.float64)
        label_ranks = resample_ranks(labels, weights)
        metric = np.stack(
            [
                resampled_correlation(weights, np.asarray(r.predictions, np.float64), labels, label_ranks)
                for r in runs
            ],
            axis=1,
        )
        return metric, setup.num_layers / mean_exit
    n = setup.size
    if setup.labels is None:
        # correctness: right -> cell (1, 1), wrong -> (0, 1), so accuracy = trace / total
        k, cells = 2, [1 + 2 * np.asarray(r.predictions, dtype=np.int64) for r in runs]
    else:
        k = setup.num_labels
        labels = np.asarray(setup.labels, dtype=np.int64)
        cells = [labels * k + np.asarray(r.predictions, dtype=np.int64) for r in runs]
    onehot = np.zeros((n, len(runs) * k * k), dtype=np.float64)
    for j, cell in enumerate(cells):
        onehot[np.arange(n), j * k * k + cell] = 1.0
    confusion = (weights @ onehot).reshape(len(weights), len(runs), k, k)
    metric = batched_metric(setup.metric, confusion)
    return metric, setup.num_layers / mean_exit


def resample_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[R, n] the mid-rank (1-based, ties averaged) each input's value has in each replicate, where
    replicate r holds input i ``weights[r, i]`` times: what Spearman's correlation ranks there."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each tied group
    group_weight = np.add.reduceat(weights[:, order], starts, axis=1)  # [R, groups]
    group_rank = np.cumsum(group_weight, axis=1) - group_weight + (group_weight + 1) / 2
    group_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(values)]))
    ranks = np.empty_like(weights, dtype=np.float64)
    ranks[:, order] = group_rank[:, group_of]
    return ranks


def _weighted_pearson(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[R] Pearson's r of x and y ([n], or [R, n] per replicate) over each replicate's inputs; 0 where
    either side is constant there (as ee_gym.tasks scores a constant prediction)."""
    total = weights.sum(1, keepdims=True)

    def mean(a: np.ndarray) -> np.ndarray:  # [R, 1], a broadcast to [R, n]
        return (weights * a).sum(1, keepdims=True) / total

    dx, dy = x - mean(x), y - mean(y)
    cov, vx, vy = mean(dx * dy)[:, 0], mean(dx * dx)[:, 0], mean(dy * dy)[:, 0]
    # a variance at rounding level (a constant side) has no correlation
    varies = (vx > 1e-12 * (mean(x * x)[:, 0] + 1e-300)) & (vy > 1e-12 * (mean(y * y)[:, 0] + 1e-300))
    scale = np.sqrt(vx * vy)
    return np.divide(cov, scale, out=np.zeros_like(cov), where=varies & (scale > 0))


def resampled_correlation(weights: np.ndarray, predictions: np.ndarray, labels: np.ndarray,
                          label_ranks: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """[R] the regression metric (mean of Pearson's and Spearman's correlation) of one run on each
    replicate's inputs (``label_ranks``: :func:`resample_ranks` of the labels, computed once)."""
    label_ranks = resample_ranks(labels, weights) if label_ranks is None else label_ranks
    pearson = _weighted_pearson(weights, predictions, labels)
    spearman = _weighted_pearson(weights, resample_ranks(predictions, weights), label_ranks)
    return (pearson + spearman) / 2


def _point_metric(setup: Setup, run: Outcome) -> float:
    """The run's metric on the inputs as they are, with ee_gym's own scorer."""
    if setup.labels is None:
        return float(np.mean(run.predictions))
    from ee_gym.tasks import TaskSpec, compute_metrics

    if setup.metric == "correlation":
        spec = TaskSpec(name="paired", labels=("value",), metric="correlation", text_columns=("text",),
                        kind="regression", tolerance=1.0)  # fmt: skip
        return compute_metrics(spec, np.asarray(run.predictions), np.asarray(setup.labels))["correlation"]
    labels = tuple(str(i) for i in range(setup.num_labels))
    spec = TaskSpec(name="paired", labels=labels, metric=setup.metric, text_columns=("text",))
    return compute_metrics(spec, np.asarray(run.predictions), np.asarray(setup.labels))[setup.metric]


def _blocks(resamples: int, n: int, columns: int) -> list[int]:
    per = max(1, _BLOCK_BYTES // (4 * max(n, columns)))
    return [min(per, resamples - start) for start in range(0, resamples, per)]


def paired_replicates(
    setup: Setup, curves: Sequence[Curve], settings: BootstrapSettings = BootstrapSettings()
) -> Replicates:
    """Bootstrap replicates of every curve's AUC and matched-speed-up metrics, on one joint draw.

    Inputs are drawn once per replicate for all curves; seeds are drawn once per replicate for every
    seed count (curves with the same number of seeds share the draw, aligned by sorted seed).
    """
    curves = list(curves)
    _check(setup, curves)
    n, L = setup.size, setup.num_layers
    rng = np.random.default_rng(settings.seed)
    grid, at = _grid(L), np.asarray(settings.speedups, dtype=np.float64)
    anchors = [setup.full] + ([setup.first_layer] if setup.first_layer is not None else [])
    runs = anchors + [r for c in curves for r in c.runs]

    metric_blocks, speed_blocks = [], []
    for size in _blocks(settings.resamples, n, len(runs) * setup.num_labels**2):
        w = _weights(rng, size, n)
        m, s = _score_runs(setup, runs, w)
        metric_blocks.append(m)
        speed_blocks.append(s)
    metric, speed = np.concatenate(metric_blocks), np.concatenate(speed_blocks)
    identity = np.ones((1, n), dtype=np.float64)
    point_metric = np.asarray([_point_metric(setup, r) for r in runs])[None]
    _, point_speed = _score_runs(setup, runs, identity)

    def anchor_points(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = values[:, 0]
        first = values[:, 1] if setup.first_layer is not None else full
        return full, first

    out = Replicates({}, {}, {}, {}, {}, tuple(settings.speedups), set())
    seed_draws: dict[int, np.ndarray] = {}
    column = len(anchors)
    for curve in curves:
        cols = {id(r): column + i for i, r in enumerate(curve.runs)}
        column += len(curve.runs)
        if curve.flat:
            c = cols[id(curve.runs[0])]
            out.flat.add(curve.label)
            out.auc[curve.label] = metric[:, c].astype(np.float64)
            out.at[curve.label] = np.repeat(metric[:, c : c + 1], len(at), 1).astype(np.float64)
            out.point_auc[curve.label] = float(point_metric[0, c])
            out.point_at[curve.label] = np.full(len(at), point_metric[0, c])
            out.reach[curve.label] = np.inf
            continue
        per_seed_auc, per_seed_at, point_aucs, point_ats, reaches = [], [], [], [], []
        for seed in curve.seeds:
            mine = [cols[id(r)] for r in curve.runs if r.seed == seed]
            for values, speeds, store_auc, store_at in (
                (metric, speed, per_seed_auc, per_seed_at),
                (point_metric, point_speed, point_aucs, point_ats),
            ):
                full, first = anchor_points(values)
                xs = np.column_stack([speeds[:, mine], np.ones(len(values)), np.full(len(values), float(L))])
                ys = np.column_stack([values[:, mine], full, first])
                store_auc.append(_interp_frontier(xs, ys, grid, curve.frontier).mean(1))
                store_at.append(_interp_frontier(xs, ys, at, curve.frontier))
            reaches.append(float(point_speed[0, mine].max()))
        aucs, ats = np.stack(per_seed_auc, 1), np.stack(per_seed_at, 1)  # [R, S], [R, S, G]
        count = len(curve.seeds)
        if count > 1:
            if count not in seed_draws:
                seed_draws[count] = np.random.default_rng([settings.seed, count]).integers(
                    0, count, size=(settings.resamples, count)
                )
            draw = seed_draws[count]
            aucs = np.take_along_axis(aucs, draw, 1)
            ats = np.take_along_axis(ats, draw[:, :, None], 1)
        out.auc[curve.label] = aucs.mean(1).astype(np.float64)
        out.at[curve.label] = ats.mean(1).astype(np.float64)
        out.point_auc[curve.label] = float(np.mean([a[0] for a in point_aucs]))
        out.point_at[curve.label] = np.mean([a[0] for a in point_ats], axis=0)
        out.reach[curve.label] = min(reaches)
    return out


# -- differences ----------------------------------------------------------------------------------------
def _record(policy: str, reference: str, statistic: str, delta: float, diffs: np.ndarray,
            confidence: float) -> dict[str, Any]:  # fmt: skip
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {
        "policy": policy,
        "reference": reference,
        "statistic": statistic,
        "delta": 100 * float(delta),
        "low": 100 * float(low),
        "high": 100 * float(high),
    }


def _speed_name(speedup: float) -> str:
    return f"metric@{speedup:g}x"


def _differences(a: Replicates, b: Replicates, policy: str, reference: str,
                 settings: BootstrapSettings) -> list[dict[str, Any]]:  # fmt: skip
    """Records of policy minus reference, from replicates ``a`` (policy) and ``b`` (reference)."""
    records = [
        _record(policy, reference, "auc", a.point_auc[policy] - b.point_auc[reference],
                a.auc[policy] - b.auc[reference], settings.confidence)
    ]  # fmt: skip
    for g, s in enumerate(settings.speedups):
        if a.reach[policy] >= s and b.reach[reference] >= s:
            records.append(
                _record(policy, reference, _speed_name(s), a.point_at[policy][g] - b.point_at[reference][g],
                        a.at[policy][:, g] - b.at[reference][:, g], settings.confidence)
            )  # fmt: skip
    return records


def difference(
    reps: Replicates, policy: str, reference: str, settings: BootstrapSettings = BootstrapSettings()
) -> list[dict[str, Any]]:
    """``policy`` minus ``reference`` from replicates already drawn (any pair, no new draw)."""
    missing = [label for label in (policy, reference) if label not in reps.auc]
    if missing:
        raise ValueError(f"{missing} not among the replicated curves {sorted(reps.auc)}")
    return _differences(reps, reps, policy, reference, settings)


def verdict(record: dict[str, Any]) -> str:
    """ "beats" / "loses to" when the paired interval excludes 0, else "ties with"."""
    if record["low"] > 0:
        return "beats"
    if record["high"] < 0:
        return "loses to"
    return "ties with"


def paired_difference(
    setup: Setup, policy: Curve, reference: Curve, settings: BootstrapSettings = BootstrapSettings()
) -> list[dict[str, Any]]:
    """``policy`` minus ``reference`` (AUC and metric at matched speed-ups), inputs and seeds resampled jointly."""
    reps = paired_replicates(setup, [policy, reference], settings)
    return _differences(reps, reps, policy.label, reference.label, settings)


def unpaired_difference(
    setup: Setup, policy: Curve, reference: Curve, settings: BootstrapSettings = BootstrapSettings()
) -> list[dict[str, Any]]:
    """The same differences with each policy's inputs (and seeds) resampled independently.

    What comparing two separate intervals amounts to; kept to show what pairing buys, not for verdicts.
    """
    a = paired_replicates(setup, [policy], settings)
    b = paired_replicates(setup, [reference], BootstrapSettings(
        settings.resamples, settings.confidence, settings.seed + 1, settings.speedups))  # fmt: skip
    return _differences(a, b, policy.label, reference.label, settings)


def compare_policies(
    setup: Setup,
    curves: Sequence[Curve],
    references: Sequence[str],
    settings: BootstrapSettings = BootstrapSettings(),
) -> tuple[list[dict[str, Any]], Replicates]:
    """Every curve minus each named reference (e.g. the best rule, the full model), from one joint draw.

    Returns the records (results contract) and the replicates (to rank or to add comparisons).
    """
    labels = [c.label for c in curves]
    missing = [r for r in references if r not in labels]
    if missing:
        raise ValueError(f"references {missing} are not among the curves {labels}")
    reps = paired_replicates(setup, curves, settings)
    records = []
    for reference in references:
        for label in labels:
            if label != reference:
                records += _differences(reps, reps, label, reference, settings)
    return records, reps


def metric_difference(
    setup: Setup, policy: Curve, reference: Curve, settings: BootstrapSettings = BootstrapSettings()
) -> dict[str, Any]:
    """``policy``'s metric minus ``reference``'s, each at its own exits (no curve: one setting each,
    one run per seed, averaged over seeds), the inputs and each side's seeds resampled jointly.

    For two models that differ in their weights too (stage 3 against the full-depth stage-1 model):
    one record with ``statistic`` ``"metric@<s>x"``, s the policy's mean layer speed-up.
    """
    _check(setup, [policy, reference])
    n = setup.size
    runs = [*policy.runs, *reference.runs]
    rng = np.random.default_rng(settings.seed)
    blocks = [_score_runs(setup, runs, _weights(rng, size, n))[0]
              for size in _blocks(settings.resamples, n, len(runs) * setup.num_labels**2)]  # fmt: skip
    metric = np.concatenate(blocks)  # [R, runs]
    point = np.asarray([_point_metric(setup, r) for r in runs])

    def side(columns: list[int], salt: int) -> tuple[np.ndarray, float]:
        values = metric[:, columns]
        if len(columns) > 1:  # the seeds, drawn with replacement
            draw = np.random.default_rng([settings.seed, salt]).integers(0, len(columns), values.shape)
            values = np.take_along_axis(values, draw, 1)
        return values.mean(1), float(point[columns].mean())

    ours, our_point = side(list(range(len(policy.runs))), 1)
    theirs, their_point = side(list(range(len(policy.runs), len(runs))), 2)
    speedup = float(np.mean([setup.num_layers / np.mean(r.exit_layers) for r in policy.runs]))
    return _record(policy.label, reference.label, f"metric@{speedup:.2f}x", our_point - their_point,
                   ours - theirs, settings.confidence)  # fmt: skip


#: the speed-up grid on which :func:`tie_speedups` reads every curve
TIE_GRID_STEP = 0.05


def tie_speedups(
    setup: Setup,
    curves: Sequence[Curve],
    reference: str = "full model",
    settings: BootstrapSettings = BootstrapSettings(),
) -> dict[str, float]:
    """Each curve's speed-up at the reference's metric: the largest layer speed-up s (on a grid of
    :data:`TIE_GRID_STEP`, within the speed-up every seed reaches) such that at every speed-up from
    1x to s the paired 95 % interval of the curve's metric minus the reference's reaches 0 or above:
    up to s, the curve is not shown worse than the reference (for the full model: early exit that
    costs no measurable metric). 1.0 when it is worse at once.

    From one joint draw of the inputs and seeds for every curve, as :func:`compare_policies`; the
    reference must be one of ``curves`` (a flat one, such as the full model, is its metric as a line).
    """
    labels = [c.label for c in curves]
    if reference not in labels:
        raise ValueError(f"reference {reference!r} is not among the curves {labels}")
    grid = np.round(np.arange(1.0, setup.num_layers + TIE_GRID_STEP / 2, TIE_GRID_STEP), 10)
    dense = replace(settings, speedups=tuple(float(x) for x in grid))
    reps = paired_replicates(setup, curves, dense)
    tail = 100 * (1 - settings.confidence) / 2
    out = {}
    for label in labels:
        if label == reference:
            continue
        high = np.percentile(reps.at[label] - reps.at[reference], 100 - tail, axis=0)
        # a curve is only read where it has runs (no credit for the line to its layer-1 anchor)
        ok = (high >= -1e-12) & (grid <= reps.reach[label] + 1e-9)
        worse = np.flatnonzero(~ok)
        stop = int(worse[0]) if len(worse) else len(grid)  # the first grid point it fails
        out[label] = float(grid[stop - 1]) if stop > 0 else 1.0
    return out


def tie_share(ties: dict[str, float], label: str, ceiling: str = "oracle-consistent") -> float | None:
    """``label``'s :func:`tie_speedups` value as a share of ``ceiling``'s (None when either is missing,
    or when the ceiling keeps the full model's metric nowhere past 1x: on a regression task
    oracle-consistent agrees within a tolerance, not exactly, so it is no ceiling there)."""
    if label not in ties or not ties.get(ceiling) or ties[ceiling] <= 1.0:
        return None
    return ties[label] / ties[ceiling]


def ties_unresolved(ties: dict[str, float], num_layers: int) -> bool:
    """Whether some curve of :func:`tie_speedups` ties the reference all the way to layer 1 (L x):
    then the inputs cannot tell the curves' tie speed-ups apart, nor make shares of them."""
    return bool(ties) and max(ties.values()) >= num_layers - 1e-9


def best_by_auc(reps: Replicates, labels: Sequence[str]) -> str:
    """The label with the highest point-estimate AUC (e.g. the best rule)."""
    return max(labels, key=lambda label: reps.point_auc[label])


def minimum_detectable_auc(records: Sequence[dict[str, Any]], reference: str | None = None) -> float:
    """The setup's minimum detectable AUC difference, in metric points.

    Defined as the median, over the paired AUC differences (to ``reference`` if named), of their 95 %
    interval's half-width (high - low) / 2: a gap smaller than this is, for a typical pair of policies
    on these inputs and seeds, not told apart from noise. Name the best rule as ``reference`` to read
    it off the pairs the verdicts rest on (the full model's pairs compare against a single point).
    """
    rows = [
        r for r in records if r["statistic"] == "auc" and (reference is None or r["reference"] == reference)
    ]
    if not rows:
        raise ValueError("no paired AUC differences to read the minimum detectable difference from")
    return float(np.median([(r["high"] - r["low"]) / 2 for r in rows]))
