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

Learners train on the policy split of ``--protocol`` (:mod:`ee_gym.protocols`) less a seeded
validation slice (a fifth, :func:`ee_gym.evaluation.validation_split`) that no policy trains on: it
chooses learners' settings and rules' operating points (:mod:`benchmarks.tuning`) and, for every
policy, which of its settings form its curve (:func:`choose_curves`), so that dev is read once and
never picked from. One
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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.journal import COMPLETE_NAME, Journal
from ee_gym.config import RESUMABLE_CHANGES
from ee_gym.validation import ConfigError, check_int

DEFAULT_AGENTS = (
    "reinforce,ppo,a2c,dqn,learned-exit,entropy,patience,pcee,maxprob,static,oracle,oracle-consistent"
)
REFERENCES = ("oracle", "oracle-consistent")
#: a regression task's default: the rules that read no softmax (PABEE's regression patience, static)
REGRESSION_AGENTS = "reinforce,ppo,a2c,dqn,learned-exit,patience,static,oracle,oracle-consistent"
#: the journal of finished runs in the output folder (benchmarks.journal); gone once results.json is
JOURNAL_NAME = "runs.partial.jsonl"
#: comparison settings that change where results go or how a run is timed and reported, not its runs
_NOT_IN_JOURNAL_KEY = RESUMABLE_CHANGES | {
    "publish",
    "wall_batch_size",
    "wall_limit",
    "wall_repeat",
    "rescore",
}
#: the committed results pages (``--publish`` writes there)
RESULTS = Path(__file__).resolve().parent / "results"
#: where a run writes when neither --output-dir nor --publish is given (relative to the working folder)
USER_RESULTS = Path("ee-gym-results")


@dataclass
class CompareArgs:
    """Arguments of the comparison (every field is a ``--flag``)."""

    task: str = "rte"
    agents: str = DEFAULT_AGENTS  # comma-separated registry names
    seeds: int = 3  # per learner and price
    alpha_scales: str = "0.25,0.5,1,2,4,8"  # learners' prices, as multiples of the task's default alpha
    rewards: str = "hardness,plain,ce"  # the first is every learner's reward; reward_variants run under all
    reward_variants: str = "reinforce"  # learners also run under the other rewards (what the reward buys)
    sweep_points: int = 12  # thresholds swept per trained learner that has one (0: none)
    tune: bool = True  # choose learners' settings and rules' operating points on a validation slice
    protocol: str | None = None  # None: ee_gym.protocols.DEFAULT_PROTOCOL
    policy_split: str | None = None  # learners' split instead of the protocol's, e.g. "train[:8000]"
    backbone: str = "minilm-l6"
    model: str | None = None  # a multi-exit model folder instead of stage 1 of (task, backbone)
    data_dir: str | None = None
    output_dir: str | None = None  # default: ee-gym-results/<task> (--publish: benchmarks/results/<task>)
    publish: bool = False  # write the committed page benchmarks/results/<task>
    sb3_timesteps: int | None = None  # SB3 learners' training steps (None: each agent's default)
    wall_batch_size: int = 64
    wall_limit: int | None = None  # dev inputs timed for the wall-clock speed-up (None: all)
    wall_repeat: int = 3  # timed rounds (full depth, then every policy); each keeps its best
    quick: bool = False  # 1 seed, prices x 0.5, 1, 2, 6 swept thresholds; no reward variants, no tuning
    threads: int = 1  # torch threads of the policy work: small networks gain nothing from more
    progress: bool = True
    rescore: bool = False  # read every run back from the output folder's runs.jsonl: statistics only

    def resolved(self) -> CompareArgs:
        from ee_gym.policy import policy_class
        from ee_gym.protocols import get_protocol
        from ee_gym.tasks import get_task

        spec = get_task(self.task)
        agents = self.agents
        if spec.is_regression:  # the rules that read a softmax have nothing to read: refused before any work
            agents = REGRESSION_AGENTS if agents == DEFAULT_AGENTS else agents
            refused = [
                a for a in agents.split(",") if a and getattr(policy_class(a), "classification_only", False)
            ]
            if refused:
                raise ConfigError(
                    f"{', '.join(refused)} read the heads' softmax, and {spec.name!r} is a regression task "
                    f"(one output per head): leave them out of --agents (its default: {REGRESSION_AGENTS})"
                )
        changes: dict[str, Any] = {
            "task": spec.name,
            "agents": agents,
            "protocol": get_protocol(self.protocol).name,  # checked: an unknown name lists the choices
        }
        if self.quick:
            changes.update(
                seeds=1,
                alpha_scales="0.5,1,2",
                rewards=self.rewards.split(",")[0],
                sweep_points=6,
                tune=False,
            )
        if self.publish and self.output_dir:
            raise ConfigError("give --output-dir or --publish, not both")
        args = dataclasses.replace(self, **changes)
        args.output_dir = args.output_dir or str((RESULTS if args.publish else USER_RESULTS) / args.task)
        check_int("seeds", args.seeds, minimum=1)
        check_int("sweep_points", args.sweep_points, minimum=0)
        if args.sweep_points == 1:
            raise ConfigError("--sweep-points must be 0 (no sweep) or at least 2, got 1")
        return args


#: ``--help`` text of every option (each followed by its default).
HELP: dict[str, str] = {
    "task": "the task compared on: a GLUE name (rte, mrpc, sst2, ...) or one you added",
    "agents": "comma-separated policy names (agents.REGISTRY): learners, rules and oracles",
    "seeds": "seeds per learner and layer price",
    "alpha_scales": "comma-separated layer prices of the learners, as multiples of the task's default alpha",
    "rewards": "comma-separated rewards; the first is every learner's, --reward-variants run under each",
    "reward_variants": "comma-separated learners that also run under every other reward of --rewards",
    "sweep_points": "thresholds swept per trained learner that has one (0: none; placed on the policy split)",
    "tune": "choose each learner's settings (its class's candidates) and each rule's operating point on a "
    "validation slice of the policy split (benchmarks.tuning); --no-tune: class defaults",
    "protocol": "which inputs learners train on: paper, held-out, cross-fit or cross-fit:<k> "
    "(ee_gym.protocols; None: DEFAULT_PROTOCOL)",
    "policy_split": "the learners' split instead of the protocol's, e.g. 'train[:8000]'",
    "backbone": "the backbone whose stage-1 model is compared (trained on first use)",
    "model": "a multi-exit model folder, used instead of stage 1 of (task, backbone)",
    "data_dir": "the data folder (GLUE layout; None: $EE_GYM_DATA, else the Hugging Face hub)",
    "output_dir": "where results.md, curves.png and results.json go (None: ee-gym-results/<task>)",
    "publish": "write the committed page benchmarks/results/<task> instead of a folder of your own",
    "sb3_timesteps": "training steps of each SB3 learner (None: each agent's default)",
    "wall_batch_size": "batch size of the batched early-exit inference timed for the wall-clock speed-up",
    "wall_limit": "dev inputs timed for the wall-clock speed-up (None: all)",
    "wall_repeat": "timed rounds (full depth, then every policy); each keeps its best",
    "quick": "1 seed, prices x 0.5, 1, 2, 6 swept thresholds per learner, no reward variants, no tuning",
    "threads": "torch threads of the policy work, set once for every learner (stage 1 and the caches "
    "run before, on torch's default)",
    "progress": "show progress bars",
    "rescore": "recompute the statistics, table and plot of a finished comparison from its output folder's "
    "runs.jsonl (same settings), training nothing; the wall clock is timed again",
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


def frontier_indices(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both speed-up and metric, by speed-up (of
    exact duplicates, the first)."""
    best: list[int] = []
    for i in sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1])):
        if not best or points[i][1] > points[best[-1]][1]:
            best.append(i)
    return best[::-1]


def frontier(points: list[tuple[float, float]]) -> np.ndarray:
    """The points no other point beats on both speed-up and metric, by speed-up: [P, 2]."""
    return np.asarray([points[i] for i in frontier_indices(points)], dtype=np.float64).reshape(-1, 2)


def curve_auc(points: list[tuple[float, float]], full: float, first_layer: float, num_layers: int,
              frontier: bool = True) -> float:  # fmt: skip
    """Mean metric over speed-ups 1x to L/2 x of a policy's curve (linear between its points).

    Every curve is anchored at the two settings any exit rule reaches at its extremes: never exiting
    early (1x, the full model's metric) and exiting everyone at layer 1 (L x, layer 1's metric), so
    that a policy is neither rewarded nor punished for a range its sweep did not visit.
    ``frontier`` True: through the points no other beats (what the settings can reach on the data
    they are scored on); False: through every point in speed-up order (points chosen beforehand, as
    the comparison's dev curves are: :func:`choose_curves`).
    """
    from benchmarks.paired import auc_of

    return auc_of(points, full, first_layer, num_layers, frontier)


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
    exit_histogram: list[int] = field(default_factory=list)  # dev inputs exiting at layers 1..L
    # the same setting on the validation slice (never trained on), and whether that slice chose it
    # as one of the points of the policy's curve (choose_curves)
    validation_metric: float | None = None
    validation_speedup: float | None = None
    on_curve: bool = False
    # per dev input, for the paired statistics (benchmarks.paired); not written to results.json
    predictions: np.ndarray | None = field(default=None, repr=False, compare=False)
    exit_layers: np.ndarray | None = field(default=None, repr=False, compare=False)
    # the same setting on dev when the protocol evaluates on a split carved from train: the fields
    # above (metric, metrics, speedup, ..., predictions, exit_layers) read there (see on_second)
    second: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (without the per-input arrays)."""
        record = dataclasses.asdict(self)
        record.pop("predictions")
        record.pop("exit_layers")
        second = record.pop("second")
        if second is not None:
            record["dev"] = {k: v for k, v in second.items() if k not in ("predictions", "exit_layers")}
        return record

    def on_second(self) -> Run:
        """This run as read on the second evaluation table (dev), same setting and curve choice."""
        return dataclasses.replace(self, **self.second, second=None)


def journal_key(args: CompareArgs, model, train, dev, second) -> dict[str, Any]:
    """What the planned runs depend on: a journal made under another key is not resumed."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in _NOT_IN_JOURNAL_KEY}
    tables = {"policy": (train.split, train.num_inputs), "evaluation": (dev.split, dev.num_inputs),
              "dev": None if second is None else (second.split, second.num_inputs)}  # fmt: skip
    return {"args": settings, "model": model.fingerprint(), "tables": tables}


def run_record(run: Run) -> dict[str, Any]:
    """Everything of a run, per-input arrays included (the journal's form; :func:`run_from_record`)."""
    return {f.name: getattr(run, f.name) for f in dataclasses.fields(Run)}


def run_from_record(record: dict[str, Any]) -> Run:
    """The run a :func:`run_record` (read back from JSON) describes."""
    arrays = {
        k: None if record.get(k) is None else np.asarray(record[k]) for k in ("predictions", "exit_layers")
    }
    second = record.get("second")
    if second is not None:
        second = {k: np.asarray(v) if k in ("predictions", "exit_layers") else v for k, v in second.items()}
    return Run(**{**record, **arrays, "second": second})


def _score(policy, dev) -> dict[str, Any]:
    from agents.evaluate import evaluate

    return _fields(evaluate(policy, dev))


def _fields(result) -> dict[str, Any]:
    """A :class:`Run`'s numbers from an :class:`~ee_gym.evaluation.EvalResult`."""
    return dict(
        metric=result.score,
        metrics=result.metrics,
        mean_exit_layer=result.mean_exit_layer,
        saved_layers=result.saved_layers,
        speedup=result.speedup,
        exit_histogram=list(result.exit_histogram),
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
    budget: dict[str, Any] = field(default_factory=dict)  # a learner's learn budget (epochs, ...)


@dataclass
class Settings:
    """What the validation slice chose (:mod:`benchmarks.tuning`): each learner's search and each
    rule's operating point. Empty: every policy at its class defaults."""

    learners: dict[str, Any] = field(default_factory=dict)  # name -> tuning.LearnerChoice
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> the operating point's params

    def to_dict(self) -> dict[str, Any]:
        return {
            "learners": {name: choice.to_dict() for name, choice in self.learners.items()},
            "rules": self.rules,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Settings:
        """The settings a :meth:`to_dict` (read back from JSON) describes."""
        from benchmarks.tuning import LearnerChoice

        learners = {name: LearnerChoice(**choice) for name, choice in record.get("learners", {}).items()}
        return cls(learners, dict(record.get("rules", {})))


def plan_runs(args: CompareArgs, num_layers: int, settings: Settings | None = None) -> list[Planned]:
    """Every run of the comparison, in order; the full model (static exit at L) last.

    A learner trains at every price of ``alpha_scales`` (once, at the default price, when what it
    learns does not depend on one: ``priced`` False) and seed; ``reward_variants`` also under every
    other reward. Its threshold sweep (``sweep_points``) adds curve points to each training run.
    ``settings``: the learners' chosen settings and the rules' operating points (else the defaults).
    """
    import agents
    from ee_gym.tasks import get_task

    rewards = [r for r in args.rewards.split(",") if r]
    variants = {v for v in args.reward_variants.split(",") if v}
    scales = list(dict.fromkeys(float(s) for s in args.alpha_scales.split(",") if s))
    if 1.0 not in scales:
        scales.append(1.0)  # the default price is the operating point
    plan = []
    settings = settings or Settings()
    for name in [a for a in args.agents.split(",") if a]:
        probe = agents.make(name)
        if probe.learns:
            params, budget = fixed_params(args, name), {}
            if name in settings.learners:
                params, budget = settings.learners[name].params, settings.learners[name].budget
            for reward in rewards if name in variants else rewards[:1]:
                if not probe.priced and reward != rewards[0]:
                    continue  # it never reads the reward
                label = name if reward == rewards[0] else f"{name} ({reward})"
                plan += [
                    Planned(label, name, "learner", params, scale == 1.0, scale, reward, seed, budget)
                    for scale in (scales if probe.priced else [1.0])
                    for seed in range(args.seeds)
                ]
        elif name in REFERENCES:
            plan.append(Planned(name, name, "reference", {}, True))
        else:
            outputs = get_task(args.task).num_labels  # 1: a regression task's heads
            plan += [Planned(name, name, "rule", p, False) for p in type(probe).sweep(num_layers, outputs)]
            plan.append(Planned(name, name, "rule", settings.rules.get(name, probe.get_params()), True))
    plan.append(Planned("full model", "static", "reference", {"layer": num_layers}, True))
    return plan


def fixed_params(args: CompareArgs, name: str) -> dict[str, Any]:
    """Constructor arguments the command line fixes for learner ``name`` (``--sb3-timesteps``)."""
    from ee_gym.policy import policy_class

    accepted = policy_class(name).accepted_arguments() or []
    return (
        {"total_timesteps": args.sb3_timesteps}
        if args.sb3_timesteps and "total_timesteps" in accepted
        else {}
    )


def count_runs(args: CompareArgs, num_layers: int) -> int:
    """How many planned runs :func:`run_all` makes (each trained learner's sweep adds points to them)."""
    return len(plan_runs(args, num_layers))


def choose_settings(args: CompareArgs, fit, validation, alpha: float, bar) -> Settings:
    """Each learner's settings and each rule's operating point, chosen on the validation slice of the
    policy split (:mod:`benchmarks.tuning`; learners train on ``fit``); the defaults when
    ``args.tune`` is False."""
    import agents
    from benchmarks.tuning import choose_learner_settings
    from ee_gym.evaluation import calibrated_rule

    settings = Settings()
    if not args.tune:
        return settings
    reward = next(r for r in args.rewards.split(",") if r)
    for name in [a for a in args.agents.split(",") if a]:
        probe = agents.make(name)
        if probe.learns:
            bar.set_postfix_str(f"choosing {name}'s settings on the validation slice")
            settings.learners[name] = choose_learner_settings(
                name, fit, validation, alpha, reward, args.sweep_points, fixed=fixed_params(args, name)
            )
        elif probe.deployable:
            settings.rules[name] = calibrated_rule(name, validation)
    return settings


def run_all(
    args: CompareArgs,
    fit,
    validation,
    dev,
    alpha: float,
    bar,
    settings: Settings | None = None,
    journal: Journal | None = None,
    second=None,
) -> tuple[list[Run], dict[str, Any]]:
    """Every planned run, and the policy object of each table row (for wall-clock timing).

    Learners train on ``fit``; every run is scored on dev and on ``validation`` (its
    ``validation_metric`` and ``validation_speedup``, read by :func:`choose_curves`). A trained
    learner that sweeps a threshold is also scored at ``sweep_points`` thresholds placed on its
    scores over ``fit``, never on dev: extra points of its curve, same seed, not the operating point.
    ``journal`` (:mod:`benchmarks.journal`) gets every planned run as it finishes (its numbers, per-input
    predictions and exits, and a table row's policy), and gives back those an interrupted comparison
    finished, which are not run again. ``second``: another
    evaluation table (dev, when ``dev`` is an evaluation split carved from train) that every run is
    also read on (``Run.second``).
    """
    import agents
    from agents.__main__ import train_policy
    from ee_gym.evaluation import evaluate, evaluate_sweep, sweep_thresholds
    from ee_gym.policy import load_policy

    runs, operating, done = [], {}, 0
    for index, item in enumerate(plan_runs(args, dev.num_layers, settings)):
        table_row = item.default and item.seed in (None, 0) and item.kind != "reference"
        timed = table_row or item.label == "full model"  # the policies wall-clock timing runs
        finished = None if journal is None else journal.done(index)
        if finished is not None:  # an interrupted comparison did this one
            runs += [run_from_record(record) for record in finished["runs"]]
            done = len(runs)
            if timed:
                operating[item.label] = load_policy(journal.path.parent / finished["policy"])
            bar.update(1)
            continue
        seconds, run_alpha = 0.0, None
        if item.kind == "learner":
            run_alpha = alpha * item.alpha_scale
            bar.set_postfix_str(f"{item.label} alpha x{item.alpha_scale:g} seed {item.seed}")
            policy, seconds = train_policy(
                item.policy, fit, run_alpha, item.reward, item.seed, budget=item.budget, **item.params
            )
        else:
            policy = agents.make(item.policy, **item.params)
        common = dict(
            default=item.default, alpha=run_alpha, alpha_scale=item.alpha_scale, reward=item.reward,
            seed=item.seed, train_seconds=round(seconds, 3),
        )  # fmt: skip
        runs.append(
            Run(item.label, item.policy, item.kind, policy.get_params(), **_score(policy, dev),
                **_validation_fields(evaluate(policy, validation)), **common,
                second=None if second is None else _score(policy, second))
        )  # fmt: skip
        if item.kind == "learner" and policy.sweeps_threshold and args.sweep_points:
            taus = sweep_thresholds(policy, fit, args.sweep_points)  # placed on the fitting part
            on_dev, on_validation = (
                evaluate_sweep(policy, dev, taus=taus),
                evaluate_sweep(policy, validation, taus=taus),
            )
            on_second = [None] * len(taus) if second is None else evaluate_sweep(policy, second, taus=taus)
            for result, held, other in zip(on_dev, on_validation, on_second, strict=True):
                params = {**policy.get_params(), "exit_threshold": result.threshold}
                runs.append(
                    Run(item.label, item.policy, item.kind, params, **_fields(result),
                        **_validation_fields(held), **{**common, "default": False},
                        second=None if other is None else _fields(other))
                )  # fmt: skip
        if journal is not None:
            journal.record(index, [run_record(run) for run in runs[done:]], policy if timed else None)
        done = len(runs)
        if timed:
            operating[item.label] = policy
        bar.update(1)
    choose_curves(runs)
    return runs, operating


def _validation_fields(result) -> dict[str, float]:
    return {"validation_metric": result.score, "validation_speedup": result.speedup}


def choose_curves(runs: list[Run]) -> None:
    """Mark the runs that form each policy's curve (``on_curve``), chosen on the validation slice.

    Per curve and seed: the settings on the upper frontier of their validation points (with the
    full model's and layer 1's validation points as anchors: a setting below layer 1's metric is
    never worth its speed), plus the default setting (the table's operating point). Dev then reads
    exactly those settings, through their dev points in speed-up order (:func:`curve_auc` with
    ``frontier`` False). Taking the frontier on dev instead would pick each curve's luckiest dev
    points, and the more settings a policy has (a learner's prices x thresholds against a rule's
    sweep) the more lucky picks it gets: a bias the validation slice, independent of dev, does not
    have.
    """
    full = next(r for r in runs if r.label == "full model")
    static1 = [r for r in runs if r.policy == "static" and r.params.get("layer") == 1]
    num_layers = full.params["layer"]
    first = static1[0].validation_metric if static1 else full.validation_metric
    anchors = [(1.0, full.validation_metric), (float(num_layers), first)]
    for label in dict.fromkeys(r.label for r in runs):
        for seed in dict.fromkeys(r.seed for r in runs if r.label == label):
            mine = [r for r in runs if r.label == label and r.seed == seed]
            chosen = set(
                frontier_indices([(r.validation_speedup, r.validation_metric) for r in mine] + anchors)
            )
            for i, run in enumerate(mine):
                run.on_curve = run.default or i in chosen


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
        # the full model is one point at 1x, read as a flat line at its metric (as the paired
        # statistics read it): joined to the layer-1 anchor it would score below itself
        aucs = [full] if label == "full model" else [
            curve_auc([(r.speedup, r.metric) for r in mine if r.seed == s and r.on_curve], full, first,
                      num_layers, frontier=False)
            for s in seeds
        ]  # fmt: skip
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
                "exit_histogram": point[0].exit_histogram,  # the first seed's, at the operating point
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
    label's on-curve run points ``[layer_speedup, metric]``, metric in points; the AUC adds the
    full-model and layer-1 anchors), plus ``best_rule``, the bootstrap settings and the replicates (not for JSON).
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
            label,
            tuple(outcome[id(r)] for r in runs if r.label == label and r.on_curve),
            flat=label == "full model",
            frontier=False,  # its runs were chosen on the validation slice (choose_curves)
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
        # how far each curve goes at the full model's metric (paired): the "speed-up at a tie"
        "tie_speedups": paired.tie_speedups(setup, curves, "full model", settings),
        "num_layers": num_layers,
        "mde_auc": paired.minimum_detectable_auc(records, reference=references[0]),
        "paired": records,
        "curves": {
            c.label: sorted(
                [float(r.speedup), 100 * float(r.metric)] for r in runs if r.label == c.label and r.on_curve
            )
            for c in curves
        },
        "bootstrap": dataclasses.asdict(settings),
        "replicates": reps,
        "settings": settings,
    }


def second_reading(task: str, runs: list[Run], second, num_layers: int) -> dict[str, Any]:
    """The same runs, settings and curve choices read on a second evaluation table (dev, when the
    protocol carves its evaluation split from train): each curve's AUC, the paired differences to
    the best rule there and to the full model, and the minimum detectable AUC difference."""
    moved = [r.on_second() for r in runs]
    rows, _ = summarise(moved, num_layers, {})
    stats = paired_statistics(task, moved, rows, np.asarray(second.labels), num_layers)
    return {
        "split": second.split,
        "inputs": second.num_inputs,
        "auc": {row["label"]: row["auc"] for row in rows},
        "metric": {row["label"]: row["metric"] for row in rows},
        "speedup": {row["label"]: row["speedup"] for row in rows},
        "best_rule": stats["best_rule"],
        "mde_auc": stats["mde_auc"],
        "paired": stats["paired"],
        "curves": stats["curves"],
        "tie_speedups": stats["tie_speedups"],
    }


def stage1_spread(task: str, train, metric: str, tables: dict) -> dict | None:
    """Under cross-fit, the full-depth dev metric of every fold model: k stage-1 runs that differ in
    the data they saw, a measure of how much stage 1 alone moves the numbers (None otherwise)."""
    if not train.cross_fit:
        return None
    from ee_gym.envs.prepare import load_table
    from ee_gym.evaluation import curve_anchors
    from ee_gym.multiexit import MultiExitModel

    values = []
    for fold in train.cross_fit["folds"]:
        fold_model = MultiExitModel.from_pretrained(Path(fold["run_dir"]) / "model").eval()
        values.append(100 * curve_anchors(load_table(fold_model, task, "dev", **tables))[0])
    k = train.cross_fit.get("k") or len(values)
    if len(values) < 2:  # a policy split inside one fold (a subset of a large train) needs one fold model
        return {
            "fold_full_dev": values,
            "std": None,
            "range": None,
            "text": f"the policy split lies in one fold, so one fold model was trained (stage 1 on {k - 1}/{k} of "
            f"train); it scores {values[0]:.1f} {metric} at full depth on dev, and one run measures no spread",
        }
    text = (
        f"the {len(values)} fold models (stage 1 on {k - 1}/{k} of train each) score "
        f"{', '.join(f'{v:.1f}' for v in values)} {metric} at full depth on dev (spread {np.ptp(values):.1f} points)"
    )
    return {
        "fold_full_dev": values,
        "std": float(np.std(values, ddof=1)),
        "range": float(np.ptp(values)),
        "text": text,
    }


def _layer_one_metric(runs: list[Run], full: float) -> float:
    static1 = [r for r in runs if r.policy == "static" and r.params.get("layer") == 1]
    return static1[0].metric if static1 else full  # without a layer-1 run the curve's far end is flat


def claims(rows: list[dict], stats: dict) -> list[str]:
    """The claims the comparison tests, each stated with its numbers: verdicts on the paired
    differences of :func:`paired_statistics` ("beats" where the 95 % interval lies above 0), then
    each learner's AUC gap to oracle-consistent."""
    from benchmarks.paired import tie_share, ties_unresolved

    by_label = {row["label"]: row for row in rows}
    lines = _paired_claims(rows, stats)
    ties, best = stats["tie_speedups"], stats["best_rule"]
    ceiling = ties.get("oracle-consistent")
    if ties_unresolved(ties, stats["num_layers"]):
        lines.append(
            "on these inputs a curve that exits at layer 1 still ties the full model (paired), so the "
            "speed-ups at the full model's metric below cannot tell policies apart (nor be read as a "
            "share of oracle-consistent's, which stops at its one run)"
        )
    for row in rows:
        if (
            row["label"] in ties
            and (row["kind"] == "learner" or row["label"] == best)
            and "(" not in row["label"]
        ):
            share = tie_share(ties, row["label"])
            share = "" if share is None else f", {share:.2f} of oracle-consistent's {ceiling:.2f}x"
            lines.append(
                f"{row['label']} keeps the full model's metric (paired 95% interval reaching 0) up to "
                f"{ties[row['label']]:.2f}x{share}"
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
    """Each learner against the best rule, reinforce (ConsistentEE) against entropy and patience, and
    every learner run under several rewards against its reward variants."""
    from benchmarks.paired import difference, verdict

    reps, settings, best = stats["replicates"], stats["settings"], stats["best_rule"]
    labels = {row["label"] for row in rows}
    pairs = [(row["label"], best) for row in rows if best and row["kind"] == "learner"]
    pairs += [("reinforce", rule) for rule in ("entropy", "patience") if rule != best and rule in labels]
    # each reward variant against the learner under the first reward: what the reward buys
    pairs += [
        (row["label"].split(" (")[0], row["label"])
        for row in rows
        if " (" in row["label"] and row["kind"] == "learner"
    ]
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


# -- writing ----------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _interval(ci: list[float]) -> str:
    return "n/a" if any(math.isnan(v) for v in ci) else f"{_pct(ci[0])} to {_pct(ci[1])}"


def markdown_table(rows: list[dict], metric: str, stats: dict) -> str:
    """The table of results.md: one row per policy, best AUC first, with the paired AUC differences."""
    paired = {(r["policy"], r["reference"]): r for r in stats["paired"] if r["statistic"] == "auc"}
    best = stats["best_rule"]
    lines = [
        f"| policy | setting | {metric} | 95% CI (seeds) | saved layers | speed-up | wall speed-up | train s | AUC |"
        " AUC - best rule (95%) | AUC - full model (95%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{_pct(row['auc'])} | {_cell(paired, row['label'], best)} | {_cell(paired, row['label'], 'full model')} |"
        )
    return "\n".join(lines)


def _cell(paired: dict, label: str, reference: str | None) -> str:
    if label == reference:
        return "reference"
    record = paired.get((label, reference))
    return "" if record is None else _signed(record)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if v is not None) or "default"


def mean_curve(runs: list[Run], anchors: dict, num_layers: int, grid: np.ndarray) -> np.ndarray:
    """A policy's curve on ``grid`` (speed-ups): each seed's on-curve points as :func:`curve_auc`
    reads them, averaged over seeds (what its AUC is the mean of)."""
    from benchmarks.paired import read_curve

    seeds = sorted({r.seed for r in runs if r.seed is not None}) or [None]
    curves = [
        read_curve([(r.speedup, r.metric) for r in runs if r.seed == seed and r.on_curve], anchors["full"],
                   anchors["first_layer"], num_layers, grid, frontier=False)
        for seed in seeds
    ]  # fmt: skip
    return np.mean(curves, axis=0)


def plot(
    runs: list[Run],
    rows: list[dict],
    path: Path,
    title: str,
    metric: str,
    num_layers: int,
    anchors: dict,
    noise: tuple[float, float] | None = None,
    where: str = "dev",
) -> None:
    """Metric against layer speed-up: one curve (and colour) per policy over the AUC's range.

    Each line is what the policy's AUC integrates: its on-curve settings (:func:`choose_curves`)
    read on dev, averaged over seeds (solid: learners, dashed: rules); faint dots are all its
    settings' dev points. A learner's operating point carries its interval over seeds. The full
    model is a star and its dev-set interval a grey band; a reference far above the curves (an
    oracle) is marked at the top edge with its value instead of stretching the axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colours = plt.get_cmap("tab20").colors
    deployable = [row for row in rows if row["kind"] != "reference"]
    palette = {row["label"]: colours[(2 * i) % 20 + (2 * i) // 20 % 2] for i, row in enumerate(deployable)}
    high = num_layers / 2
    grid = np.linspace(1.0, high, 101)
    seen: list[float] = []
    for row in deployable:
        mine = [r for r in runs if r.label == row["label"]]
        colour = palette[row["label"]]
        curve = 100 * mean_curve(mine, anchors, num_layers, grid)
        learner = row["kind"] == "learner"
        ax.plot(
            grid,
            curve,
            "-" if learner else "--",
            color=colour,
            lw=1.8 if learner else 1.3,
            label=row["label"],
        )
        ax.scatter([r.speedup for r in mine], [100 * r.metric for r in mine], s=6, color=colour, alpha=0.3)
        seen += curve.tolist()
        if learner:
            low, up = row["metric_ci"]
            err = None if math.isnan(low) else [[100 * (row["metric"] - low)], [100 * (up - row["metric"])]]
            ax.errorbar(
                [row["speedup"]], [100 * row["metric"]], yerr=err, fmt="o", color=colour, capsize=3, ms=6
            )
    full = 100 * anchors["full"]
    if noise is not None:
        ax.axhspan(100 * noise[0], 100 * noise[1], color="0.85", alpha=0.5, zorder=0,
                   label=f"full model, 95% interval over the {where} inputs")  # fmt: skip
    ax.plot([1.0], [full], "k*", markersize=14, label="full model", zorder=5)
    seen.append(full)
    bottom, top = min(seen), max(seen)
    pad = max(0.5, 0.08 * (top - bottom))
    bottom, top = bottom - pad, top + pad
    for row in rows:
        if row["kind"] != "reference" or row["label"] == "full model":
            continue
        value, x = 100 * row["metric"], min(row["speedup"], high)
        if value > top:  # off the axis: marked at the edge with its value
            ax.annotate(f"{row['label']}: {value:.1f} at {row['speedup']:.2f}x (reference, off the axis)",
                        (x, top), xytext=(0, -14), textcoords="offset points", ha="center", fontsize=7,
                        arrowprops={"arrowstyle": "->"})  # fmt: skip
        else:
            ax.plot([x], [value], "kD", markersize=6, fillstyle="none", label=f"{row['label']} (reference)")
    ax.set_xlim(1.0, high)
    ax.set_ylim(bottom, top)
    ax.set_xlabel("layer speed-up (L / mean exit layer)")
    ax.set_ylabel(f"{where} {metric} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def dev_section(on_dev: dict | None) -> list[str]:
    """results.md's second reading on dev, when the protocol evaluates on a split carved from train."""
    if on_dev is None:
        return []
    paired = {(r["policy"], r["reference"]): r for r in on_dev["paired"] if r["statistic"] == "auc"}
    lines = [
        "## The same runs on dev",
        "",
        f"Read on dev ({on_dev['inputs']} inputs) with the same settings and curve points; best rule there "
        f"{on_dev['best_rule']}; minimum detectable AUC difference {on_dev['mde_auc']:.2f} points.",
        "",
        "| policy | AUC | AUC - best rule (95%) | AUC - full model (95%) |",
        "|---|---|---|---|",
    ]
    for label, auc in sorted(on_dev["auc"].items(), key=lambda item: -item[1]):
        lines.append(
            f"| {label} | {_pct(auc)} | {_cell(paired, label, on_dev['best_rule'])} | "
            f"{_cell(paired, label, 'full model')} |"
        )
    return [*lines, ""]


def settings_section(settings: Settings, train) -> list[str]:
    """results.md's account of what the validation slice chose (or that nothing was chosen)."""
    from benchmarks.tuning import VALIDATION_FRACTION

    if not settings.learners and not settings.rules:
        return [
            "## Settings",
            "",
            "Every policy at its class defaults (no validation search: `--no-tune` or `--quick`).",
        ]
    lines = [
        "## Settings chosen on the validation slice",
        "",
        f"A seeded {VALIDATION_FRACTION:.0%} of the policy split ({train.split}, {train.num_inputs} inputs) "
        "held out (`benchmarks.tuning`); dev is never read. Learners: each candidate of the class's search "
        "trained once (default price, seed 0) on the rest and scored by its validation AUC; the best trains "
        "every price and seed on the rest as well. Rules: the operating point is the fastest setting within "
        "1 point of the full model's validation metric (`ee_gym.evaluation.calibrated_rule`).",
        "",
        "| policy | chosen | validation AUC of each candidate (chosen in bold) |",
        "|---|---|---|",
    ]
    for name, choice in settings.learners.items():
        cells = []
        for i, c in enumerate(choice.candidates):
            text = f"{_params({**c['params'], **c['budget']})}: {_pct(c['validation_auc'])}"
            cells.append(f"**{text}**" if i == choice.chosen else text)
        chosen = _params({**choice.params, **choice.budget})
        lines.append(f"| {name} | {chosen} | {'; '.join(cells)} |")
    for name, params in settings.rules.items():
        lines.append(f"| {name} | {_params(params)} | (rule: operating point only) |")
    return lines


def _json_value(value: Any) -> Any:
    """What JSON cannot hold, as text (a class by its dotted name), so that a record is never lost
    to one odd setting at the end of a long run."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python, the platform and the versions of the packages a result depends on (plus ``extra``)."""
    import importlib.metadata as md

    names = (
        *extra,
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
def machine_load() -> dict[str, float]:
    """The 1-minute load average against the cores (recorded; a warning when the machine is already
    busy, since training seconds and wall-clock speed-ups then measure the other work too)."""
    import os

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if load > cores:
        print(f"ee-gym: warning: the machine is busy (load {load:.1f} on {cores} cores): training times and "
              "wall-clock speed-ups will include the other work", file=sys.stderr)  # fmt: skip
    return {"load_1min": round(load, 2), "cores": cores}


def set_threads(threads: int) -> None:
    """One thread budget for the whole process: torch's intra- and inter-op pools (the BLAS threads
    of numpy follow OMP_NUM_THREADS, read at import: set it in the shell for more than one). Two
    comparisons on a 2-core machine then share it instead of each asking for every core."""
    import torch

    check_int("threads", threads, minimum=1)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(threads)


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
    from ee_gym.envs.prepare import load_model, load_table, policy_table
    from ee_gym.evaluation import validation_split
    from ee_gym.files import write_text_atomic
    from ee_gym.protocols import check_policy_split, get_protocol
    from ee_gym.rewards import default_alpha

    began = time.perf_counter()
    args = parse_args(argv).resolved()
    task = args.task
    complete = Path(args.output_dir) / COMPLETE_NAME
    if args.rescore and not complete.is_file():
        raise ConfigError(
            f"--rescore reads {complete}, the runs of a finished comparison, and there is none: run the "
            "comparison without --rescore first (or point --output-dir at its folder)"
        )
    protocol = get_protocol(args.protocol)
    policy_split = args.policy_split or protocol.policy_split
    check_policy_split(protocol, task, policy_split, args.data_dir)  # before stage 1: no silent overlap
    # where policies are scored: dev, or the protocol's evaluation split carved from train (then dev
    # is a second reading of the same runs)
    where = protocol.evaluation or "dev"
    model = load_model(
        task, model=args.model, backbone=args.backbone, data_dir=args.data_dir, progress=args.progress,
        protocol=args.protocol,
    )  # fmt: skip
    tables = dict(data_dir=args.data_dir, progress=args.progress)
    train = policy_table(model, task, args.protocol, split=policy_split, backbone=args.backbone, **tables)
    dev = load_table(model, task, where, **tables)
    second = load_table(model, task, "dev", **tables) if protocol.evaluation else None
    num_layers, alpha = dev.num_layers, default_alpha(task, dev.num_layers)
    set_threads(args.threads)  # stage 1 and the caches (above) ran on torch's default threads
    load_at_start = machine_load()

    bar = tqdm(
        total=count_runs(args, num_layers), desc=f"compare [{task}]", unit="run", disable=not args.progress
    )
    fit, validation = validation_split(train)  # no policy trains on the validation slice
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every finished planned run, so that an interrupted comparison resumes (benchmarks.journal)
    key = journal_key(args, model, train, dev, second)
    if args.rescore:  # resumed as a whole (every planned run is in it); runs.jsonl itself stays as it is
        shutil.copyfile(complete, out / JOURNAL_NAME)
    try:
        journal = Journal.open(out / JOURNAL_NAME, key, start_over=not args.rescore)
    except ValueError:  # only under --rescore: its runs are of other settings
        (out / JOURNAL_NAME).unlink()
        raise ConfigError(
            f"{complete} was made with other settings, model or tables: rescore with the command that "
            "made it (in its results.json)"
        ) from None
    if journal.note:
        print(journal.note, file=sys.stderr)
    if journal.settings is not None:
        settings = Settings.from_dict(journal.settings)  # chosen before the interruption
    else:
        settings = choose_settings(args, fit, validation, alpha, bar)
    resumed = len(journal.finished)
    journal.start(settings.to_dict())
    runs, operating = run_all(args, fit, validation, dev, alpha, bar, settings, journal, second)
    bar.set_postfix_str("wall-clock timing")
    wall = wall_speedups(model, task, args, operating)
    bar.close()

    rows, anchors = summarise(runs, num_layers, wall)
    full_result = evaluate(operating["full model"], dev)
    metric = full_result.metric
    noise = dev_set_interval(task, full_result.predictions, dev.labels)
    stats = paired_statistics(task, runs, rows, np.asarray(dev.labels), num_layers)
    on_dev = None if second is None else second_reading(task, runs, second, num_layers)
    spread = stage1_spread(task, train, metric, tables)
    found = claims(rows, stats)
    command = "python -m benchmarks.compare " + shlex.join(argv if argv is not None else sys.argv[1:])

    place = "dev" if second is None else f"{where}, the evaluation split carved from train,"
    title = f"{task} {place} ({dev.num_inputs} inputs), {model.config.backbone}, {args.protocol} protocol"
    plot(runs, rows, out / "curves.png", title, metric, num_layers, anchors, noise, where)
    record = {
        "task": task,
        "metric": metric,
        "num_layers": num_layers,
        "evaluation": where,  # the split every number below is read on ("dev", or carved from train)
        "dev_inputs": dev.num_inputs,  # of that split
        "dev": on_dev,  # a carved evaluation split: the same runs read on dev (table, paired, mde_auc)
        "protocol": args.protocol,
        "policy_split": policy_split,
        "policy_inputs": train.num_inputs,
        "fit_inputs": fit.num_inputs,  # what learners train on
        "validation_inputs": validation.num_inputs,  # what chooses settings and curve points
        "cross_fit": train.cross_fit,  # the folds and fold models, under a cross-fit protocol
        "tuning": settings.to_dict(),  # what the validation slice chose (benchmarks.tuning)
        "stage1_spread": spread,  # cross-fit: the fold models' full-depth dev metrics (stage-1 noise)
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
        "tie_speedups": stats["tie_speedups"],  # label -> speed-up up to which it ties the full model
        "runs": [r.to_dict() for r in runs],
        "wall": wall,
        "command": command,
        "args": dataclasses.asdict(args),
        "versions": versions(),
        "machine": {
            **load_at_start,
            "threads": args.threads,
            "load_1min_at_end": machine_load()["load_1min"],
        },
        "seconds": round(time.perf_counter() - began, 1),  # this leg's, when resumed
        "resumed_runs": resumed,  # planned runs an interrupted earlier leg had finished (its time not counted)
    }
    write_text_atomic(out / "results.json", json.dumps(record, indent=2, default=_json_value))
    journal.finish()
    text = [
        f"# {task}: exit policies compared",
        "",
        f"{title}; policies learn on `{policy_split}` ({fit.num_inputs} of its {train.num_inputs} inputs; the "
        f"other {validation.num_inputs} are the validation slice); default alpha "
        f"{alpha:.3g}; {args.seeds} seed(s) per learner. Sorted by AUC: mean {metric} over layer speed-ups "
        f"1x to {num_layers / 2:g}x of each policy's curve (`benchmarks.compare.curve_auc`). Wall speed-up: "
        f"batched early-exit inference at batch size {args.wall_batch_size} against full depth, same batches.",
        "",
        markdown_table(rows, metric, stats),
        "",
        f"Evaluation noise: the full model's {metric} has a 95% bootstrap interval of {_interval(list(noise))} "
        f"over the {dev.num_inputs} {where} inputs. Every policy is scored on the same inputs, so the differences "
        f"(AUC - best rule, here {stats['best_rule'] or 'none'}; AUC - full model: the full model's {metric} "
        f"as a flat line) are paired: a bootstrap resampling the {where} inputs and the learners' seeds jointly "
        f"(`benchmarks.paired`, {stats['bootstrap']['resamples']} replicates). Minimum detectable AUC "
        f"difference of this setup: {stats['mde_auc']:.2f} points (median half-width of the paired 95% "
        "intervals against the best rule). Which settings form a curve is chosen on the validation slice "
        "(each seed's validation frontier, plus the default setting; `benchmarks.compare.choose_curves`) and "
        f"{where} reads those settings as they are, so a policy with more settings gets no more lucky picks "
        f"on {where} "
        "(settings on the curve / tried: "
        + ", ".join(
            f"{label} {len(points)}/{sum(r.label == label for r in runs)}"
            for label, points in stats["curves"].items()
        )
        + ").",
        "",
        "![metric against speed-up](curves.png)",
        "",
        *dev_section(on_dev),
        *settings_section(settings, train),
        "",
        "## Claims tested",
        "",
        f"Verdicts read the paired 95% interval of the difference ({where} inputs and learners' seeds resampled",
        'jointly): "beats" where it lies above 0, "ties with" where it holds 0. Stage-1 training noise is',
        "not in it (one stage-1 model)" + (f"; {spread['text']}" if spread else "") + ".",
        "",
        *[f"- {line}" for line in found],
        "",
        "## Reproduce",
        "",
        f"```bash\n{command}\n```",
        "",
        f"{time.perf_counter() - began:.0f} s on {platform.machine()}"
        + (
            f" (this leg: {resumed} planned runs came from an interrupted earlier leg's journal)"
            if resumed
            else ""
        )
        + "; versions and every run's numbers in `results.json`.",
        "",
    ]
    (out / "results.md").write_text("\n".join(text))
    print("\n".join(text[:8]))
    print("\n".join(f"- {line}" for line in found))
    print(f"\nwritten: {out / 'results.md'}, {out / 'curves.png'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
