"""Which exit policy is best for my task and budget? Every policy on one model, one table, one plot.

    python -m benchmarks.compare --task rte
    python -m benchmarks.compare --task rte --agents reinforce,ppo,entropy,patience --seeds 5
    python -m benchmarks.compare --task rte --quick      # 1 seed, 3 prices, reinforce's rewards skipped

On the same model and the same dev inputs, every named policy is scored:

* rules (``entropy``, ``patience``, ...) at every setting of their ``sweep`` (deterministic: one run);
* learners (``reinforce``, ``ppo``, ...) at several layer prices alpha (``--alpha-scales`` times the
  task's default alpha) and ``--seeds`` seeds each; ``reinforce`` also under the ``plain`` and ``ce``
  rewards (``--rewards``) to test what the hardness-guided reward buys;
* references: the full model (static exit at L) and the two oracles (not deployable).

Learners train on the policy split of ``--protocol`` (:mod:`ee_gym.protocols`). One
operating point per policy, its default settings (alpha x 1 for learners), fills the table: the task
metric with a 95 % interval over seeds (scipy's percentile bootstrap of the mean), saved layers, the
layer speed-up L / mean exit layer, the wall-clock speed-up of batched early-exit inference
(``ee_gym.inference.predict_batches`` at ``--wall-batch-size``, against full depth on the same batches)
and the training time. The area under the curve ranks policies at a glance (:func:`curve_auc`).
Every curve's AUC (and metric at 1.25x, 1.5x, 2x, 3x) is compared with the best rule's and the full
model's by a paired bootstrap over the dev inputs and the learners' seeds (:mod:`benchmarks.paired`):
the table's difference columns, the claims' verdicts and the page's minimum detectable AUC difference.

Written to ``--output-dir`` (default ``benchmarks/results/<task>``): ``results.md`` (the table, the
ranking, the claims tested and the command), ``curves.png`` (metric against speed-up, one curve per
policy, the full model and the oracles marked) and ``results.json`` (every run's numbers, the exact
command, package versions and settings; ``paired``, ``mde_auc`` and ``curves`` in the results
contract of :mod:`benchmarks.paired`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_AGENTS = "reinforce,ppo,a2c,dqn,entropy,patience,pcee,maxprob,static,oracle,oracle-consistent"
REFERENCES = ("oracle", "oracle-consistent")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class CompareArgs:
    """Arguments of the comparison (every field is a ``--flag``)."""

    task: str = "rte"
    agents: str = DEFAULT_AGENTS  # comma-separated registry names
    seeds: int = 3  # per learner and price
    alpha_scales: str = "0.5,1,2,4"  # learners' prices, as multiples of the task's default alpha
    rewards: str = "hardness,plain,ce"  # reinforce runs under each; the first is every learner's reward
    protocol: str | None = None  # None: ee_gym.protocols.DEFAULT_PROTOCOL
    policy_split: str | None = None  # learners' split instead of the protocol's, e.g. "train[:8000]"
    backbone: str = "minilm-l6"
    model: str | None = None  # a multi-exit model folder instead of stage 1 of (task, backbone)
    data_dir: str | None = None
    output_dir: str | None = None  # default: benchmarks/results/<task>
    sb3_timesteps: int | None = None  # SB3 learners' training steps (None: each agent's default)
    wall_batch_size: int = 64
    wall_limit: int | None = None  # dev inputs timed for the wall-clock speed-up (None: all)
    wall_repeat: int = 3  # timed rounds (full depth, then every policy); each keeps its best
    quick: bool = False  # 1 seed, prices x 0.5, 1, 2; reinforce under the first reward only
    progress: bool = True

    def resolved(self) -> CompareArgs:
        from ee_gym.protocols import get_protocol
        from ee_gym.tasks import get_task

        changes: dict[str, Any] = {
            "task": get_task(self.task).name,
            "protocol": get_protocol(self.protocol).name,  # checked: an unknown name lists the choices
        }
        if self.quick:
            changes.update(seeds=1, alpha_scales="0.5,1,2", rewards=self.rewards.split(",")[0])
        args = dataclasses.replace(self, **changes)
        args.output_dir = args.output_dir or str(RESULTS / args.task)
        if args.seeds < 1:
            raise ValueError(f"--seeds must be 1 or more, got {args.seeds}")
        return args


#: ``--help`` text of every option (each followed by its default).
HELP: dict[str, str] = {
    "task": "the task compared on: a GLUE name (rte, mrpc, sst2, ...) or one you added",
    "agents": "comma-separated policy names (agents.REGISTRY): learners, rules and oracles",
    "seeds": "seeds per learner and layer price",
    "alpha_scales": "comma-separated layer prices of the learners, as multiples of the task's default alpha",
    "rewards": "comma-separated rewards reinforce runs under; the first is every learner's reward",
    "protocol": "which inputs learners train on: 'paper' or 'held-out' (ee_gym.protocols; "
    "None: DEFAULT_PROTOCOL, held-out)",
    "policy_split": "the learners' split instead of the protocol's, e.g. 'train[:8000]'",
    "backbone": "the backbone whose stage-1 model is compared (trained on first use)",
    "model": "a multi-exit model folder, used instead of stage 1 of (task, backbone)",
    "data_dir": "the data folder (GLUE layout; None: $EE_GYM_DATA, else the Hugging Face hub)",
    "output_dir": "where results.md, curves.png and results.json go (None: benchmarks/results/<task>)",
    "sb3_timesteps": "training steps of each SB3 learner (None: each agent's default)",
    "wall_batch_size": "batch size of the batched early-exit inference timed for the wall-clock speed-up",
    "wall_limit": "dev inputs timed for the wall-clock speed-up (None: all)",
    "wall_repeat": "timed rounds (full depth, then every policy); each keeps its best",
    "quick": "1 seed, prices x 0.5, 1, 2, and reinforce under the first reward only",
    "progress": "show progress bars",
}


# -- statistics ---------------------------------------------------------------------------------------
def mean_ci(values: list[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): a percentile-bootstrap interval of the mean (scipy); nan bounds for one value."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    if np.ptp(values) == 0:
        return mean, mean, mean
    res = bootstrap(
        (values,), np.mean, confidence_level=confidence, method="percentile", n_resamples=2000, rng=0
    )
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def dev_set_interval(task: str, predictions: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """95 % bootstrap interval of the task metric over the dev inputs (how noisy the dev set is)."""
    from scipy.stats import bootstrap

    from agents.evaluate import score_predictions

    def metric(pred, gold):
        name, values = score_predictions(task, pred, gold)
        return values[name]

    res = bootstrap(
        (predictions, labels),
        metric,
        paired=True,
        vectorized=False,
        method="percentile",
        n_resamples=1000,
        rng=0,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def frontier(points: list[tuple[float, float]]) -> np.ndarray:
    """The points no other point beats on both speed-up and metric, by speed-up: [P, 2]."""
    best: list[tuple[float, float]] = []
    for speedup, metric in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not best or metric > best[-1][1]:
            best.append((speedup, metric))
    return np.asarray(best[::-1], dtype=np.float64)


def curve_auc(points: list[tuple[float, float]], full: float, first_layer: float, num_layers: int) -> float:
    """Mean metric over speed-ups 1x to L/2 x of a policy's curve (linear between its frontier points).

    Every curve is anchored at the two settings any exit rule reaches at its extremes: never exiting
    early (1x, the full model's metric) and exiting everyone at layer 1 (L x, layer 1's metric), so
    that a policy is neither rewarded nor punished for a range its sweep did not visit.
    """
    ends = frontier([*points, (1.0, full), (float(num_layers), first_layer)])
    grid = np.linspace(1.0, num_layers / 2, 101)
    return float(np.interp(grid, ends[:, 0], ends[:, 1]).mean())


def metric_at(
    points: list[tuple[float, float]], speedup: float, full: float, first_layer: float, num_layers: int
) -> float:
    """A curve's metric at one speed-up (as :func:`curve_auc` reads it)."""
    ends = frontier([*points, (1.0, full), (float(num_layers), first_layer)])
    return float(np.interp(speedup, ends[:, 0], ends[:, 1]))


# -- running the policies ---------------------------------------------------------------------------
@dataclass
class Run:
    """One policy at one setting (and seed), scored on dev."""

    label: str  # the curve it belongs to: "entropy", "reinforce", "reinforce (plain)", ...
    policy: str  # registry name
    kind: str  # "learner", "rule" or "reference"
    params: dict[str, Any]
    metric: float
    metrics: dict[str, float]
    mean_exit_layer: float
    saved_layers: float
    speedup: float
    default: bool  # the policy's default setting: the table's operating point
    alpha: float | None = None
    alpha_scale: float | None = None
    reward: str | None = None
    seed: int | None = None
    train_seconds: float = 0.0
    # per dev input, for the paired statistics (benchmarks.paired); not written to results.json
    predictions: np.ndarray | None = field(default=None, repr=False, compare=False)
    exit_layers: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (without the per-input arrays)."""
        record = dataclasses.asdict(self)
        record.pop("predictions")
        record.pop("exit_layers")
        return record


def _score(policy, dev) -> dict[str, Any]:
    from agents.evaluate import evaluate

    result = evaluate(policy, dev)
    return dict(
        metric=result.score,
        metrics=result.metrics,
        mean_exit_layer=result.mean_exit_layer,
        saved_layers=result.saved_layers,
        speedup=result.speedup,
        predictions=np.asarray(result.predictions),
        exit_layers=np.asarray(result.exit_layers),
    )


@dataclass
class Planned:
    """One run to make: which policy, at which setting."""

    label: str
    policy: str
    kind: str  # "learner", "rule" or "reference"
    params: dict[str, Any]
    default: bool
    alpha_scale: float | None = None
    reward: str | None = None
    seed: int | None = None


def plan_runs(args: CompareArgs, num_layers: int) -> list[Planned]:
    """Every run of the comparison, in order; the full model (static exit at L) last."""
    import agents

    rewards = [r for r in args.rewards.split(",") if r]
    scales = list(dict.fromkeys(float(s) for s in args.alpha_scales.split(",") if s))
    if 1.0 not in scales:
        scales.append(1.0)  # the default price is the operating point
    plan = []
    for name in [a for a in args.agents.split(",") if a]:
        probe = agents.make(name)
        if probe.learns:
            params = (
                {"total_timesteps": args.sb3_timesteps} if args.sb3_timesteps and name != "reinforce" else {}
            )
            for reward in rewards if name == "reinforce" else rewards[:1]:
                label = name if reward == rewards[0] else f"{name} ({reward})"
                plan += [
                    Planned(label, name, "learner", params, scale == 1.0, scale, reward, seed)
                    for scale in scales
                    for seed in range(args.seeds)
                ]
        elif name in REFERENCES:
            plan.append(Planned(name, name, "reference", {}, True))
        else:
            plan += [Planned(name, name, "rule", p, False) for p in type(probe).sweep(num_layers)]
            plan.append(Planned(name, name, "rule", probe.get_params(), True))
    plan.append(Planned("full model", "static", "reference", {"layer": num_layers}, True))
    return plan


def count_runs(args: CompareArgs, num_layers: int) -> int:
    """How many runs :func:`run_all` makes."""
    return len(plan_runs(args, num_layers))


def run_all(args: CompareArgs, train, dev, alpha: float, bar) -> tuple[list[Run], dict[str, Any]]:
    """Every planned run, and the policy object of each table row (for wall-clock timing)."""
    import agents
    from agents.__main__ import train_policy

    runs, operating = [], {}
    for item in plan_runs(args, dev.num_layers):
        seconds, run_alpha = 0.0, None
        if item.kind == "learner":
            run_alpha = alpha * item.alpha_scale
            bar.set_postfix_str(f"{item.label} alpha x{item.alpha_scale:g} seed {item.seed}")
            policy, seconds = train_policy(
                item.policy, train, run_alpha, item.reward, item.seed, **item.params
            )
        else:
            policy = agents.make(item.policy, **item.params)
        run = Run(
            item.label, item.policy, item.kind, policy.get_params(), **_score(policy, dev),
            default=item.default, alpha=run_alpha, alpha_scale=item.alpha_scale, reward=item.reward,
            seed=item.seed, train_seconds=round(seconds, 3),
        )  # fmt: skip
        runs.append(run)
        table_row = item.default and item.seed in (None, 0) and item.kind != "reference"
        if table_row or item.label == "full model":  # the policies wall-clock timing runs
            operating[item.label] = policy
        bar.update(1)
    return runs, operating


def wall_speedups(model, task: str, args: CompareArgs, operating: dict[str, Any]) -> dict[str, dict]:
    """Wall-clock speed-up of each deployable operating point over full depth, on the same batches.

    ``wall_repeat`` rounds, each timing full depth and then every policy once; each keeps its best
    time (other work on the machine only slows a run down, and a busy spell hits a whole round).
    """
    from ee_gym.envs.prepare import default_max_length
    from ee_gym.inference import predict_batches, prepare_batches
    from ee_gym.tasks import load_split

    examples = load_split(task, "dev", args.data_dir, args.wall_limit)
    batches = prepare_batches(
        model, examples.text_a, examples.text_b, args.wall_batch_size, default_max_length(task)
    )
    n = len(examples)
    policies = {"": None} | {k: p for k, p in operating.items() if getattr(p, "deployable", True)}
    best = dict.fromkeys(policies, float("inf"))
    outputs = {
        label: predict_batches(model, batches, n, policy) for label, policy in policies.items()
    }  # warm-up
    for _ in range(args.wall_repeat):
        for label, policy in policies.items():
            best[label] = min(best[label], predict_batches(model, batches, n, policy).seconds)
    return {
        label: {
            "seconds": best[label],
            "full_seconds": best[""],
            "wall_speedup": best[""] / best[label],
            "layer_speedup": outputs[label].speed_up,
            "inputs": n,
        }
        for label in policies
        if label
    }


# -- summarising ------------------------------------------------------------------------------------
def summarise(runs: list[Run], num_layers: int, wall: dict[str, dict]) -> tuple[list[dict], dict]:
    """One table row per curve (its operating point) and the numbers the claims need."""
    full = next(r for r in runs if r.label == "full model").metric
    first = _layer_one_metric(runs, full)
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        mine = [r for r in runs if r.label == label]
        point = [r for r in mine if r.default]
        seeds = sorted({r.seed for r in mine if r.seed is not None}) or [None]
        aucs = [
            curve_auc([(r.speedup, r.metric) for r in mine if r.seed == s], full, first, num_layers)
            for s in seeds
        ]
        metric = mean_ci([r.metric for r in point])
        auc = mean_ci(aucs)
        rows.append(
            {
                "label": label,
                "kind": mine[0].kind,
                "deployable": mine[0].policy not in REFERENCES,
                "params": point[0].params,
                "alpha": point[0].alpha,
                "runs": len(point),
                "metric": metric[0],
                "metric_ci": [metric[1], metric[2]],
                "saved_layers": float(np.mean([r.saved_layers for r in point])),
                "speedup": float(np.mean([r.speedup for r in point])),
                "mean_exit_layer": float(np.mean([r.mean_exit_layer for r in point])),
                "wall_speedup": wall.get(label, {}).get("wall_speedup"),
                "train_seconds": float(np.mean([r.train_seconds for r in point])),
                "auc": auc[0],
                "auc_ci": [auc[1], auc[2]],
            }
        )
    return rows, {"full": full, "first_layer": first}


def paired_statistics(
    task: str, runs: list[Run], rows: list[dict], labels: np.ndarray, num_layers: int, settings=None
) -> dict[str, Any]:
    """Paired differences of every curve to the best rule and to the full model (:mod:`benchmarks.paired`).

    Every run was scored on the same dev inputs, so one joint draw of the inputs (and of the learners'
    seeds) serves every comparison. Returns the results contract's ``paired``, ``mde_auc`` (the median
    half-width of the paired AUC intervals against the best rule, in points) and ``curves`` (each
    label's run points ``[layer_speedup, metric]``, metric in points; the AUC adds the full-model and
    layer-1 anchors), plus ``best_rule``, the bootstrap settings and the replicates (not for JSON).
    """
    from benchmarks import paired

    settings = settings or paired.BootstrapSettings()
    outcome = {id(r): paired.Outcome(r.predictions, r.exit_layers, r.seed) for r in runs}
    full = next(r for r in runs if r.label == "full model")
    static1 = [r for r in runs if r.policy == "static" and r.params.get("layer") == 1]
    first = outcome[id(static1[0])] if static1 else None
    setup = paired.Setup.for_task(task, num_layers, labels, outcome[id(full)], first)
    curves = [
        paired.Curve(
            label, tuple(outcome[id(r)] for r in runs if r.label == label), flat=label == "full model"
        )
        for label in dict.fromkeys(r.label for r in runs)
    ]
    auc = {row["label"]: row["auc"] for row in rows}
    rules = [row["label"] for row in rows if row["kind"] == "rule"]
    best = max(rules, key=auc.__getitem__) if rules else None
    references = [best, "full model"] if best else ["full model"]
    records, reps = paired.compare_policies(setup, curves, references, settings)
    return {
        "best_rule": best,
        "mde_auc": paired.minimum_detectable_auc(records, reference=references[0]),
        "paired": records,
        "curves": {
            c.label: sorted([float(r.speedup), 100 * float(r.metric)] for r in runs if r.label == c.label)
            for c in curves
        },
        "bootstrap": dataclasses.asdict(settings),
        "replicates": reps,
        "settings": settings,
    }


def _layer_one_metric(runs: list[Run], full: float) -> float:
    static1 = [r for r in runs if r.policy == "static" and r.params.get("layer") == 1]
    return static1[0].metric if static1 else full  # without a layer-1 run the curve's far end is flat


def claims(
    runs: list[Run], rows: list[dict], anchors: dict, num_layers: int, stats: dict | None = None
) -> list[str]:
    """The claims the comparison tests, each stated with its numbers.

    With ``stats`` (:func:`paired_statistics`) the verdicts rest on paired differences: "beats" where
    the 95 % interval of the difference lies above 0; without, on overlapping intervals over seeds.
    """
    by_label = {row["label"]: row for row in rows}
    full, first = anchors["full"], anchors["first_layer"]
    lines = []
    if stats is not None:
        lines += _paired_claims(rows, stats)
    mine = by_label.get("reinforce")
    if mine and stats is None:
        for rule in ("entropy", "patience"):
            if rule not in by_label:
                continue
            points = [(r.speedup, r.metric) for r in runs if r.label == rule]
            theirs = metric_at(points, mine["speedup"], full, first, num_layers)
            lines.append(
                f"reinforce {_verdict(mine['metric'], mine['metric_ci'], theirs, [theirs, theirs])} {rule} at "
                f"equal speed-up: {_pct(mine['metric'])} (95% CI {_interval(mine['metric_ci'])}) vs "
                f"{_pct(theirs)} on the {rule} curve at {mine['speedup']:.2f}x"
            )
        for reward in ("plain", "ce"):
            other = by_label.get(f"reinforce ({reward})")
            if other is None:
                continue
            verdict = _verdict(mine["auc"], mine["auc_ci"], other["auc"], other["auc_ci"])
            lines.append(
                f"reinforce under the hardness reward {verdict} the {reward} reward: AUC {_pct(mine['auc'])} "
                f"({_interval(mine['auc_ci'])}) vs {_pct(other['auc'])} ({_interval(other['auc_ci'])})"
            )
    oracle = by_label.get("oracle-consistent")
    if oracle:
        for row in rows:
            if row["kind"] == "learner" and "(" not in row["label"]:
                gap = 100 * (oracle["auc"] - row["auc"])
                lines.append(
                    f"{row['label']} is {abs(gap):.1f} AUC points {'below' if gap >= 0 else 'above'} "
                    f"oracle-consistent ({_pct(row['auc'])} vs {_pct(oracle['auc'])})"
                )
    return lines


def _paired_claims(rows: list[dict], stats: dict) -> list[str]:
    """Each learner against the best rule, reinforce against entropy and patience and under each reward."""
    from benchmarks.paired import difference, verdict

    reps, settings, best = stats["replicates"], stats["settings"], stats["best_rule"]
    labels = {row["label"] for row in rows}
    pairs = [(row["label"], best) for row in rows if best and row["kind"] == "learner"]
    pairs += [("reinforce", rule) for rule in ("entropy", "patience") if rule != best and rule in labels]
    pairs += [("reinforce", f"reinforce ({reward})") for reward in ("plain", "ce")]
    lines = []
    for policy, reference in pairs:
        if policy not in labels or reference not in labels:
            continue
        records = difference(reps, policy, reference, settings)
        auc = records[0]
        matched = "; ".join(f"at {r['statistic'][7:]} {_signed(r)}" for r in records[1:])
        lines.append(
            f"{policy} {verdict(auc)} {reference}{' (the best rule)' if reference == best else ''}: paired AUC "
            f"difference {_signed(auc)}" + (f"; metric {matched}" if matched else "")
        )
    return lines


def _signed(record: dict) -> str:
    return f"{record['delta']:+.1f} (95% {record['low']:+.1f} to {record['high']:+.1f})"


def _verdict(mine: float, mine_ci: list[float], theirs: float, theirs_ci: list[float]) -> str:
    """ "beats" / "loses to" when the 95 % intervals do not overlap, else "ties with" (within noise)."""
    if any(math.isnan(v) for v in (*mine_ci, *theirs_ci)):  # one seed: compare the values themselves
        return "beats" if mine > theirs else "ties with" if mine == theirs else "loses to"
    if mine_ci[0] > theirs_ci[1]:
        return "beats"
    if mine_ci[1] < theirs_ci[0]:
        return "loses to"
    return "ties with (intervals overlap)"


# -- writing ----------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _interval(ci: list[float]) -> str:
    return "n/a" if any(math.isnan(v) for v in ci) else f"{_pct(ci[0])} to {_pct(ci[1])}"


def markdown_table(rows: list[dict], metric: str, stats: dict | None = None) -> str:
    """The table of results.md: one row per policy, best AUC first; with ``stats``, paired AUC differences."""
    paired = {} if stats is None else {
        (r["policy"], r["reference"]): r for r in stats["paired"] if r["statistic"] == "auc"
    }  # fmt: skip
    best = None if stats is None else stats["best_rule"]
    extra = "" if stats is None else " AUC - best rule (95%) | AUC - full model (95%) |"
    lines = [
        f"| policy | setting | {metric} | 95% CI (seeds) | saved layers | speed-up | wall speed-up | train s | AUC |"
        + extra,
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if stats else ""),
    ]
    for row in sorted(rows, key=lambda r: -r["auc"]):
        name = row["label"] + ("" if row["deployable"] else " (reference)")
        setting = (
            f"alpha {row['alpha']:.3g}, {row['runs']} seeds"
            if row["kind"] == "learner"
            else _params(row["params"])
        )
        wall = "" if row["wall_speedup"] is None else f"{row['wall_speedup']:.2f}x"
        lines.append(
            f"| {name} | {setting} | {_pct(row['metric'])} | {_interval(row['metric_ci'])} | "
            f"{_pct(row['saved_layers'])}% | {row['speedup']:.2f}x | {wall} | {row['train_seconds']:.1f} | "
            f"{_pct(row['auc'])} |"
            + (
                ""
                if stats is None
                else f" {_cell(paired, row['label'], best)} | {_cell(paired, row['label'], 'full model')} |"
            )
        )
    return "\n".join(lines)


def _cell(paired: dict, label: str, reference: str | None) -> str:
    if label == reference:
        return "reference"
    record = paired.get((label, reference))
    return "" if record is None else _signed(record)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None) or "default"


def plot(runs: list[Run], rows: list[dict], path: Path, title: str, metric: str, num_layers: int) -> None:
    """Metric against layer speed-up: one curve per policy; the full model and the oracles marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        mine = [r for r in runs if r.label == row["label"]]
        if row["label"] == "full model":
            ax.plot(
                [row["speedup"]], [100 * row["metric"]], "k*", markersize=14, label="full model", zorder=5
            )
        elif row["kind"] == "reference":
            ax.plot(
                [row["speedup"]],
                [100 * row["metric"]],
                "D",
                markersize=8,
                label=f"{row['label']} (reference)",
            )
        elif row["kind"] == "learner":  # mean over seeds at each price, with the seeds' interval
            scales = sorted({r.alpha_scale for r in mine})
            xs, ys, lows, highs = [], [], [], []
            for scale in scales:
                at = [r for r in mine if r.alpha_scale == scale]
                mean, low, high = mean_ci([r.metric for r in at])
                xs.append(np.mean([r.speedup for r in at]))
                ys.append(100 * mean)
                lows.append(100 * (mean - low) if not math.isnan(low) else 0.0)
                highs.append(100 * (high - mean) if not math.isnan(high) else 0.0)
            order = np.argsort(xs)
            ax.errorbar(
                np.asarray(xs)[order], np.asarray(ys)[order],
                yerr=[np.asarray(lows)[order], np.asarray(highs)[order]],
                marker="o", capsize=3, label=row["label"],
            )  # fmt: skip
        else:
            points = sorted((r.speedup, 100 * r.metric) for r in mine if not r.default)
            ax.plot(*zip(*points, strict=True), marker=".", alpha=0.8, label=row["label"])
    ax.axvspan(1.0, num_layers / 2, color="0.95", zorder=0, label=f"AUC range (1x to {num_layers / 2:g}x)")
    ax.set_xlabel("layer speed-up (L / mean exit layer)")
    ax.set_ylabel(f"dev {metric} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = (
        "torch",
        "transformers",
        "gymnasium",
        "stable-baselines3",
        "sb3-contrib",
        "numpy",
        "scipy",
        "matplotlib",
    )
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found


# -- the command ------------------------------------------------------------------------------------
def parse_args(argv=None) -> CompareArgs:
    from ee_gym.cli import add_dataclass_arguments

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0]
    )
    add_dataclass_arguments(parser, CompareArgs, help=HELP)
    fields = {f.name for f in dataclasses.fields(CompareArgs)}
    return CompareArgs(**{k: v for k, v in vars(parser.parse_args(argv)).items() if k in fields})


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from agents.evaluate import evaluate
    from ee_gym.envs.prepare import load_model, load_table
    from ee_gym.protocols import get_protocol
    from ee_gym.rewards import default_alpha

    began = time.perf_counter()
    args = parse_args(argv).resolved()
    task = args.task
    policy_split = args.policy_split or get_protocol(args.protocol).policy_split
    model = load_model(
        task, model=args.model, backbone=args.backbone, data_dir=args.data_dir, progress=args.progress,
        protocol=args.protocol,
    )  # fmt: skip
    tables = dict(data_dir=args.data_dir, progress=args.progress)
    train = load_table(model, task, policy_split, **tables)
    dev = load_table(model, task, "dev", **tables)
    num_layers, alpha = dev.num_layers, default_alpha(task, dev.num_layers)

    bar = tqdm(
        total=count_runs(args, num_layers), desc=f"compare [{task}]", unit="run", disable=not args.progress
    )
    runs, operating = run_all(args, train, dev, alpha, bar)
    bar.set_postfix_str("wall-clock timing")
    wall = wall_speedups(model, task, args, operating)
    bar.close()

    rows, anchors = summarise(runs, num_layers, wall)
    full_result = evaluate(operating["full model"], dev)
    metric = full_result.metric
    noise = dev_set_interval(task, full_result.predictions, dev.labels)
    stats = paired_statistics(task, runs, rows, np.asarray(dev.labels), num_layers)
    found = claims(runs, rows, anchors, num_layers, stats)
    command = "python -m benchmarks.compare " + shlex.join(argv if argv is not None else sys.argv[1:])

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{task} dev ({dev.num_inputs} inputs), {model.config.backbone}, {args.protocol} protocol"
    plot(runs, rows, out / "curves.png", title, metric, num_layers)
    record = {
        "task": task,
        "metric": metric,
        "num_layers": num_layers,
        "dev_inputs": dev.num_inputs,
        "protocol": args.protocol,
        "policy_split": policy_split,
        "policy_inputs": train.num_inputs,
        "default_alpha": alpha,
        "model": model.config.backbone,
        "model_fingerprint": model.fingerprint(),
        "full_model_dev_interval": list(noise),
        "table": rows,
        "claims": found,
        "best_rule": stats["best_rule"],
        "mde_auc": stats["mde_auc"],
        "bootstrap": stats["bootstrap"],
        "paired": stats["paired"],
        "curves": stats["curves"],
        "runs": [r.to_dict() for r in runs],
        "wall": wall,
        "command": command,
        "args": dataclasses.asdict(args),
        "versions": versions(),
        "seconds": round(time.perf_counter() - began, 1),
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    text = [
        f"# {task}: exit policies compared",
        "",
        f"{title}; policies learn on `{policy_split}` ({train.num_inputs} inputs); default alpha "
        f"{alpha:.3g}; {args.seeds} seed(s) per learner. Sorted by AUC: mean {metric} over layer speed-ups "
        f"1x to {num_layers / 2:g}x of each policy's curve (`benchmarks.compare.curve_auc`). Wall speed-up: "
        f"batched early-exit inference at batch size {args.wall_batch_size} against full depth, same batches.",
        "",
        markdown_table(rows, metric, stats),
        "",
        f"Dev-set noise: the full model's {metric} has a 95% bootstrap interval of {_interval(list(noise))} "
        f"over the {dev.num_inputs} dev inputs. Every policy is scored on the same inputs, so the differences "
        f"(AUC - best rule, here {stats['best_rule'] or 'none'}; AUC - full model: the full model's {metric} "
        f"as a flat line) are paired: a bootstrap resampling the dev inputs and the learners' seeds jointly "
        f"(`benchmarks.paired`, {stats['bootstrap']['resamples']} replicates). Minimum detectable AUC "
        f"difference of this setup: {stats['mde_auc']:.2f} points (median half-width of the paired 95% "
        "intervals against the best rule).",
        "",
        "![metric against speed-up](curves.png)",
        "",
        "## Claims tested",
        "",
        "Verdicts read the paired 95% interval of the difference (dev inputs and learners' seeds resampled",
        'jointly): "beats" where it lies above 0, "ties with" where it holds 0. Stage-1 training noise is',
        "not in it (one stage-1 model).",
        "",
        *[f"- {line}" for line in found],
        "",
        "## Reproduce",
        "",
        f"```bash\n{command}\n```",
        "",
        f"{time.perf_counter() - began:.0f} s on {platform.machine()}; versions and every run's numbers in "
        "`results.json`.",
        "",
    ]
    (out / "results.md").write_text("\n".join(text))
    print("\n".join(text[:8]))
    print("\n".join(f"- {line}" for line in found))
    print(f"\nwritten: {out / 'results.md'}, {out / 'curves.png'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
