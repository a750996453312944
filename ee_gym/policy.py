"""The exit-policy protocol, the training budget every learner reads, and the registry of policies.

Why here, in the core: the pipeline, stage 3, batched inference and the CLI all drive policies, and
none of them may import ``agents`` (stable-baselines3 never has ``common/`` import an algorithm).
They speak to any policy through :class:`ExitPolicy` and find one by name through the registry
below; ``agents`` implements the protocol and fills the registry, and so can any other package.

A policy sees a batch of observations of one mode (``obs_mode``, see ee_gym.envs.observations) and
answers one action per row: 0 = CONTINUE, 1 = EXIT. Learners train on an env first (``learn``); rules
have nothing to learn. ``bind`` hands a policy the vector env it is about to act in, before any
``act``: most policies ignore it; the oracles use it to peek at labels and later layers, which is
why they are marked ``deployable = False``: they are references, not policies one could ship.

A learner only fits the table it was trained on: it records that table's shapes (:data:`SHAPE_KEYS`:
L layers, state size d, K labels, the observation mode) on its first ``learn`` or ``bind``, saves them
in ``policy.json``, and ``bind`` refuses an env of other shapes with :class:`PolicyMismatchError`
(otherwise a policy trained on L=4, d=8 would act on an L=6, d=6 table of the same observation width
and report nonsense). Rules work on any shape and record nothing.

**One learning signature.** ``policy.learn(env, budget)`` for every learner, ``budget`` a
:class:`TrainingBudget` (or its fields as keywords: ``learn(env, epochs=3)``); a learner reads the
fields that apply to it (epochs for REINFORCE, total_timesteps for SB3) and its own default for
every field left None, so a caller (the pipeline's stage 2) never asks which learner it holds.

**Joint training (stage 3) is a capability**, not a name: a policy with ``trains_jointly = True``
hands stage 3 its trainable module (``joint_module``), a decider for the layer runner
(``joint_decider``, :mod:`ee_gym.runner`) and its loss on a rollout (``joint_loss``). Every other
policy is held fixed there, deciding through ``act`` on the observation its envs would give
(:meth:`ExitPolicy.joint_decider`'s default).

**A curve from one trained policy is a capability too**: a policy with ``sweeps_threshold = True``
decides "EXIT when my score passes a threshold" (REINFORCE's exit probability, an actor-critic's
EXIT probability, a Q-network's margin Q(EXIT) - Q(CONTINUE)). ``with_threshold(tau)`` gives the
same trained policy acting at another threshold, and ``threshold_sweep`` lists thresholds from the
earliest exit to the latest, so one training run traces a dense metric-vs-cost curve
(:func:`ee_gym.evaluation.evaluate_sweep`) instead of one point per trained price.

**The registry.** :func:`make_policy` ("reinforce", "entropy", ...) looks a name up in
:func:`register_policy`'s table, filled on first use from the ``ee_gym.policies`` entry-point group
(``[project.entry-points."ee_gym.policies"] mine = "my_package.mine:MyPolicy"`` in a package's
pyproject.toml, the way Python plugins are found) and by the bundled ``agents`` package, imported
then by name (an install whose metadata predates the entry points still finds it).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ee_gym.files import CorruptFileError, read_json, write_json_atomic
from ee_gym.model_card import CardFacts, policy_card, write_card
from ee_gym.scalars import check_tensorboard
from ee_gym.validation import ConfigError, check_choice, check_float, check_int, check_optional_int

if TYPE_CHECKING:  # types only: this module loads without torch
    import torch

    from ee_gym.multiexit import MultiExitModel
    from ee_gym.runner import Decider, LayerRun

POLICY_FILE = "policy.json"
#: what a learner records of the table it learned on (``ExitPolicy.shapes``)
SHAPE_KEYS = ("num_layers", "hidden_size", "num_labels", "obs_mode")
#: the entry-point group where packages declare their policies (name = "module:Class")
ENTRY_POINT_GROUP = "ee_gym.policies"
#: how a learner with per-layer exit probabilities draws its training actions: a Bernoulli sample,
#: or the authors' p > 0.5 (replicas then differ by dropout only)
ROLLOUTS = ("sample", "threshold")
#: how a learner that reads the table's exit losses may weight them per input (TrainingBudget.loss_weights)
LOSS_WEIGHTS = ("balanced",)
#: the package shipped with ee-gym whose import registers its policies
BUNDLED_POLICIES = "agents"
_LOAD_FIX = "save the policy again (policy.save(folder)) or train a new one"


class PolicyMismatchError(ValueError):
    """A learned policy was bound to an env whose table has other shapes than the one it learned on."""


def decides_at(layer, min_layer: int = 1, every: int = 1):
    """Whether a policy guarded by ``min_layer`` and probing every ``every``-th layer decides at
    ``layer`` (an int, or elementwise on an array or tensor of layers): layers min_layer,
    min_layer + every, ... Elsewhere it continues without reading anything, which is what makes a
    decision cheap on a decoder (one probe per ``every`` layers). The last layer exits whatever the
    policy says, so callers treat it apart."""
    return (layer >= min_layer) & ((layer - min_layer) % every == 0)


def env_shapes(env: Any, obs_mode: str) -> dict[str, Any]:
    """The :data:`SHAPE_KEYS` of ``env`` (a vector env, a single env, or anything with ``num_layers``
    and a ``table`` with ``hidden_size`` and ``num_labels``, as ``ee_gym.inference`` binds to).
    ``obs_mode``: the mode recorded (the env's own where it has an encoder, else this one)."""
    table = getattr(env, "table", None)
    source = table if table is not None else env
    num_layers = getattr(env, "num_layers", None) or source.num_layers
    encoder = getattr(env, "encoder", None)
    return {
        "num_layers": int(num_layers),
        "hidden_size": int(source.hidden_size),
        "num_labels": int(source.num_labels),
        "obs_mode": getattr(encoder, "mode", None) or obs_mode,
    }


def describe_shapes(shapes: dict[str, Any]) -> str:
    return (
        f"L={shapes['num_layers']} layers, d={shapes['hidden_size']}, K={shapes['num_labels']} labels, "
        f"obs_mode {shapes['obs_mode']!r}"
    )


# -- what a learner may spend -------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingBudget:
    """What ``learn`` may spend and how; None: the learner's own default.

    One object for every learner, so that a caller never branches on which learner it holds: an
    epoch-based learner (REINFORCE) reads ``epochs``, ``batch_size``, ``replicas``,
    ``learning_rate`` and ``rollout``; a step-based one (SB3) reads ``total_timesteps``; all read
    ``seed`` and ``progress``. Fields a learner has no use for are ignored.
    """

    epochs: int | None = None  # passes over the table
    total_timesteps: int | None = None  # env steps
    batch_size: int | None = None  # inputs per update
    replicas: int | None = None  # trajectories per input (REINFORCE's group baseline)
    learning_rate: float | None = None
    rollout: str | None = None  # "sample" or "threshold" (REINFORCE)
    seed: int | None = None  # re-seeds the learner's draws
    progress: bool | None = None  # a progress bar
    tensorboard_log: str | None = None  # a folder for TensorBoard scalars (SB3's name for it)
    # "balanced": each input's exit loss (what the reward pays) scaled by N / (K n_y), so that every
    # class weighs the same in the reward, as in a class-balanced metric (Matthews, F1); REINFORCE
    loss_weights: str | None = None

    #: older keyword spellings ``learn`` still takes
    ALIASES: ClassVar[dict[str, str]] = {"lr": "learning_rate", "timesteps": "total_timesteps"}

    def __post_init__(self) -> None:
        for name in ("epochs", "total_timesteps", "batch_size", "replicas"):
            object.__setattr__(self, name, check_optional_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "seed", check_optional_int("seed", self.seed, minimum=0))
        if self.learning_rate is not None:
            rate = check_float("learning_rate", self.learning_rate, minimum=0.0, exclusive_minimum=True)
            object.__setattr__(self, "learning_rate", rate)
        if self.rollout is not None:
            object.__setattr__(self, "rollout", check_choice("rollout", self.rollout, ROLLOUTS))
        if self.loss_weights is not None:
            object.__setattr__(
                self, "loss_weights", check_choice("loss_weights", self.loss_weights, LOSS_WEIGHTS)
            )
        object.__setattr__(
            self, "tensorboard_log", check_tensorboard("tensorboard_log", self.tensorboard_log)
        )

    @classmethod
    def of(cls, budget: TrainingBudget | None = None, **settings: Any) -> TrainingBudget:
        """``budget`` (default: all None) with ``settings`` (field names or :attr:`ALIASES`) over it;
        an unknown keyword is a ConfigError naming the fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {}
        for key, value in settings.items():
            name = cls.ALIASES.get(key, key)
            if name not in fields:
                raise ConfigError(
                    f"learn() takes no setting {key!r}; a training budget has {', '.join(sorted(fields))}"
                )
            given[name] = value
        if budget is not None and not isinstance(budget, TrainingBudget):
            raise ConfigError(f"budget must be a TrainingBudget, got {type(budget).__name__}")
        return dataclasses.replace(budget or cls(), **given)

    def get(self, name: str, default: Any) -> Any:
        """The field ``name``, or ``default`` (the learner's) when it is None."""
        value = getattr(self, name)
        return default if value is None else value


# -- the protocol -------------------------------------------------------------------------------
class ExitPolicy(ABC):
    """Base class of exit policies. Subclasses set ``name`` and ``obs_mode`` and implement ``act``;
    learners set ``learns = True`` and implement :meth:`fit`."""

    name: ClassVar[str] = "policy"
    #: the observation mode this policy reads (the env is made with it)
    obs_mode: ClassVar[str] = "stats"
    #: False for references that read what a deployed model cannot know (labels, later layers)
    deployable: ClassVar[bool] = True
    #: True for policies whose ``learn`` trains something
    learns: ClassVar[bool] = False
    #: True for policies that train with the model in stage 3 (see the joint_* methods)
    trains_jointly: ClassVar[bool] = False
    #: for learners: whether what they learn depends on the layer price alpha (the env's reward);
    #: False for a supervised learner, whose trade-off is set by its threshold alone
    priced: ClassVar[bool] = True
    #: for learners: the settings a comparison may choose among on a validation slice of the policy
    #: split (benchmarks.tuning), each (constructor arguments, learn budget fields); the first is the
    #: defaults. A learner's own class states its search, within a budget of a few trainings.
    candidates: ClassVar[tuple[tuple[dict[str, Any], dict[str, Any]], ...]] = (({}, {}),)
    #: a learner's table shapes (:data:`SHAPE_KEYS`), recorded on its first learn/bind; None for rules
    shapes: dict[str, Any] | None = None
    #: True for policies whose deterministic ``act`` is "EXIT where ``exit_scores`` > a threshold"
    sweeps_threshold: ClassVar[bool] = False
    #: the threshold of the policy's own rule (what ``act`` uses while ``exit_threshold`` is None)
    default_threshold: ClassVar[float | None] = None
    #: the values ``exit_scores`` can take when known in advance ((0, 1) for probabilities); None:
    #: unbounded (a Q-value margin), so a sweep needs the scores of a table to place its thresholds
    score_range: ClassVar[tuple[float, float] | None] = None
    #: the threshold ``act`` uses (set through :meth:`with_threshold`); None: ``default_threshold``
    exit_threshold: float | None = None

    def bind(self, env: Any) -> None:
        """Called with the vector env before acting in it. Learners check (or, the first time, record)
        the env's shapes (:class:`PolicyMismatchError` for others); rules: nothing to do."""
        if self.learns:
            self._check_shapes(env_shapes(env, self.obs_mode))
        return None

    @abstractmethod
    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions (int64, 0 or 1) for a batch of observations."""

    def learn(self, env: Any, budget: TrainingBudget | None = None, **settings: Any) -> ExitPolicy:
        """Train on ``env`` (a vector env made with this policy's ``obs_mode``) within ``budget``
        (a :class:`TrainingBudget`; its fields may also be given as keywords). Rules: no-op."""
        budget = TrainingBudget.of(budget, **settings)
        if self.learns:
            self.fit(env, budget)
        return self

    def fit(self, env: Any, budget: TrainingBudget) -> None:
        """What a learner implements: train on ``env`` within ``budget`` (its defaults for None)."""
        return None

    # -- a dense curve from one trained policy (sweeps_threshold policies) -------------------------
    def exit_scores(self, obs: Any) -> np.ndarray:
        """One score per observation row (float64 [B]); ``act`` exits where it exceeds
        :attr:`threshold_in_force`. Sweeping policies implement it."""
        raise NotImplementedError(self._no_sweep())

    @property
    def threshold_in_force(self) -> float:
        """The threshold deterministic ``act`` compares ``exit_scores`` against."""
        if not self.sweeps_threshold:
            raise NotImplementedError(self._no_sweep())
        return self.default_threshold if self.exit_threshold is None else self.exit_threshold

    def with_threshold(self, tau: float | None) -> ExitPolicy:
        """This trained policy acting at threshold ``tau`` (None: its own rule), as a shallow copy:
        the weights are shared, nothing is retrained, and ``self`` keeps its threshold. A higher
        ``tau`` never exits earlier: an input exits at its first layer whose score exceeds it."""
        if not self.sweeps_threshold:
            raise NotImplementedError(self._no_sweep())
        if tau is not None:
            tau = check_float("tau", tau)  # finite
        other = copy.copy(self)
        other.exit_threshold = tau
        return other

    def threshold_sweep(self, scores: Any = None, num: int = 21) -> np.ndarray:
        """Thresholds (sorted, float64) spanning this policy's decisions, from the earliest exit
        (below every score: exit at the first layer allowed) to the latest (the highest score: no
        exit before the last layer), always including :attr:`default_threshold`.

        ``scores``: the policy's :meth:`exit_scores` on the observations it will meet (any shape;
        :func:`ee_gym.evaluation.table_scores` gives a table's): the thresholds are then their
        quantiles, dense where the decisions are. Without them the thresholds are evenly spaced over
        :attr:`score_range` (a ConfigError for a policy whose scores are unbounded). ``num`` (>= 2)
        thresholds at most, plus the default; ties among the scores give fewer.
        """
        if not self.sweeps_threshold:
            raise NotImplementedError(self._no_sweep())
        num = check_int("num", num, minimum=2)
        if scores is not None:
            values = np.asarray(scores, dtype=np.float64).ravel()
            values = values[np.isfinite(values)]
            if values.size == 0:
                raise ConfigError("threshold_sweep: no finite scores to place the thresholds on")
            lowest = np.nextafter(values.min(), -np.inf)  # every score passes it
            inner = np.quantile(values, np.linspace(0.0, 1.0, num)[1:-1]) if num > 2 else []
            taus = np.concatenate([[lowest], inner, [values.max()]])
        elif self.score_range is not None:
            taus = np.linspace(*self.score_range, num)
        else:
            raise ConfigError(
                f"{self.name}'s scores are unbounded: pass the scores it gives on a table "
                "(threshold_sweep(ee_gym.evaluation.table_scores(policy, table)))"
            )
        return np.unique(np.append(taus, self.default_threshold).astype(np.float64))

    def _no_sweep(self) -> str:
        return (
            f"{self.name} has no decision threshold to sweep (sweeps_threshold is False); "
            "trace its curve by its own settings (a rule's threshold, a learner's price alpha)"
        )

    # -- stage 3: training with the model (trains_jointly policies) ------------------------------
    def joint_module(self, model: MultiExitModel) -> torch.nn.Module:
        """The module stage 3 trains with ``model`` (built for its sizes, or checked against them)."""
        raise NotImplementedError(f"{self.name} does not train jointly (trains_jointly is False)")

    def joint_decider(
        self, model: MultiExitModel, replicas: int = 1, generator: torch.Generator | None = None
    ) -> Decider:
        """Who decides the exits of stage 3's rollouts (:func:`ee_gym.runner.run_layers`).

        Default, for a policy held fixed: its deterministic ``act`` on the observation its envs
        would give (one trajectory per input, ``replicas`` and ``generator`` unused). A policy that
        trains jointly returns ``replicas`` trajectories per input drawn from ``generator``."""
        from ee_gym.inference import acting_exits

        return acting_exits(self, model)

    def joint_loss(self, rollout: LayerRun, rewards: torch.Tensor, group: int) -> torch.Tensor:
        """The policy's loss on one stage-3 rollout (``rewards``: one per trajectory, ``group``
        trajectories per input, consecutive). Held policies have none."""
        raise NotImplementedError(f"{self.name} does not train jointly (trains_jointly is False)")

    # -- the shapes a learner was trained for -----------------------------------------------------
    def _learned_on(self, env: Any, fresh: bool) -> None:
        """``learn`` calls this with its env: a ``fresh`` model (trained from scratch) records the
        env's shapes; a model trained further must fit them first."""
        found = env_shapes(env, self.obs_mode)
        found["obs_mode"] = self.obs_mode  # a learner trains on its own mode, whatever env's
        if fresh:
            self.shapes = found
        else:
            self._check_shapes(found)

    def _check_shapes(self, found: dict[str, Any]) -> None:
        if self.shapes is None:
            self.shapes = found
            return
        if any(self.shapes.get(key) != found[key] for key in SHAPE_KEYS):
            raise PolicyMismatchError(
                f"this {self.name} policy was trained on a table of {describe_shapes(self.shapes)}, but "
                f"this env's table has {describe_shapes(found)}: train the policy on this model's table "
                "(policy.learn(env) on a vector env over it), or load one trained on it"
            )

    # -- persistence: rules save their parameters as JSON; learners add their weights -------------
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments that recreate this policy."""
        return {}

    @classmethod
    def accepted_arguments(cls) -> list[str] | None:
        """The keyword arguments the constructor takes (what ``make_policy`` checks); None: any."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in params if p.kind in kinds]

    def save(self, path: str | os.PathLike, card: CardFacts | None = None) -> Path:
        """Write the policy to a folder: ``policy.json``, whatever a learner adds, and a model card
        (``README.md``; ``card`` adds what the trainer knows, see :mod:`ee_gym.model_card`)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_weights(folder)  # first: a learner that cannot save leaves no policy.json behind
        record: dict[str, Any] = {"name": self.name, "params": self.get_params()}
        if self.shapes is not None:
            record["shapes"] = self.shapes
        if self.exit_threshold is not None:  # an operating point chosen on a sweep
            record["exit_threshold"] = self.exit_threshold
        write_card(folder, policy_card(record, card))
        write_json_atomic(folder / POLICY_FILE, record)  # last: policy.json marks a complete folder
        return folder

    def _save_weights(self, folder: Path) -> None:
        """Learners write their weights here."""
        return None

    def _load_weights(self, folder: Path) -> None:
        """Learners read their weights here."""
        return None

    def _check_loaded_shapes(self, shapes: dict[str, Any]) -> str | None:
        """Why the loaded weights do not fit the saved ``shapes`` (None: they fit). Learners check."""
        if shapes["obs_mode"] != self.obs_mode:
            return f"the shapes record obs_mode {shapes['obs_mode']!r}, the policy reads {self.obs_mode!r}"
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


# -- the registry -------------------------------------------------------------------------------
_REGISTRY: dict[str, str | type[ExitPolicy]] = {}
_plugins_loaded = False


def register_policy(name: str, target: str | type[ExitPolicy], replace: bool = False) -> None:
    """Make ``make_policy(name)`` build ``target`` (a class, or ``"module:Class"`` imported on first
    use, so that a missing optional dependency only affects the policies that need it). A name
    already taken by another target is refused unless ``replace``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a policy name must be a non-empty string, got {name!r}")
    if isinstance(target, str) and target.count(":") != 1:
        raise ConfigError(f"policy {name!r}: target {target!r} is not 'module:Class'")
    old = _REGISTRY.get(name)
    if old is not None and old != target and not replace:
        raise ConfigError(f"policy name {name!r} is taken by {old!r}; pass replace=True to rebind it")
    _REGISTRY[name] = target


def _load_plugins() -> None:
    """Fill the registry once: the bundled policies, then every ``ee_gym.policies`` entry point."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    try:
        importlib.import_module(BUNDLED_POLICIES)  # registers its policies on import
    except ModuleNotFoundError as error:
        if error.name != BUNDLED_POLICIES:
            raise
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        old = _REGISTRY.get(point.name)
        if old is None:
            _REGISTRY[point.name] = point.value
        elif old != point.value and not (isinstance(old, type) and _target_of(old) == point.value):
            warnings.warn(
                f"entry point {point.value!r} ({ENTRY_POINT_GROUP}) names policy {point.name!r}, already "
                f"registered as {old!r}: the first stays",
                stacklevel=2,
            )


def _target_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def policy_names() -> list[str]:
    """Every registered policy name (bundled, entry points, and :func:`register_policy` calls)."""
    _load_plugins()
    return sorted(_REGISTRY)


def check_policy_name(field: str, name: Any) -> str:
    """``name`` when a policy of that name is registered, else ConfigError naming ``field``."""
    if not isinstance(name, str) or name not in policy_names():
        raise ConfigError(f"unknown {field} {name!r}; known: {', '.join(policy_names())}")
    return name


def policy_class(name: str) -> type[ExitPolicy]:
    """The class registered under ``name`` (imported now), or ConfigError listing the names."""
    check_policy_name("policy", name)
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, cls_name = target.split(":")
        target = getattr(importlib.import_module(module), cls_name)
    return target


def make_policy(name: str, **kwargs: Any) -> ExitPolicy:
    """A ready policy: ``make_policy("ppo")``, ``make_policy("patience", patience=2)``.

    An unknown name, or a keyword the policy does not take, raises
    :class:`~ee_gym.validation.ConfigError` (a ValueError) listing the valid ones; so do values out of
    range (``make_policy("reinforce", hidden_size=0)``, ``make_policy("maxprob", threshold=2.0)``).
    """
    cls = policy_class(name)
    accepted = cls.accepted_arguments()
    unknown = [key for key in kwargs if accepted is not None and key not in accepted]
    if unknown:
        raise ConfigError(
            f"policy {name!r} takes no argument {', '.join(map(repr, unknown))}; it accepts "
            f"{', '.join(accepted) if accepted else 'no arguments'}"
        )
    return cls(**kwargs)


def make_policy_with(name: str, settings: dict[str, Any]) -> ExitPolicy:
    """``make_policy(name)`` given those of ``settings`` its constructor names (a run's seed and
    rollout go to the policies that take them; a rule takes neither)."""
    accepted = policy_class(name).accepted_arguments() or []
    return make_policy(name, **{key: value for key, value in settings.items() if key in accepted})


# -- loading ------------------------------------------------------------------------------------
def _saved_shapes(shapes: Any, path: Path) -> dict[str, Any]:
    """The ``shapes`` entry of a policy.json, checked, or CorruptFileError."""
    from ee_gym.observations import OBS_MODES

    fine = isinstance(shapes, dict) and set(SHAPE_KEYS) <= set(shapes)
    fine = fine and all(
        isinstance(shapes[key], int) and not isinstance(shapes[key], bool) and shapes[key] >= 1
        for key in SHAPE_KEYS[:3]
    )
    if not fine or shapes["obs_mode"] not in OBS_MODES:
        raise CorruptFileError(
            f"{path}: its 'shapes' entry {shapes!r} is not {{num_layers, hidden_size, num_labels: whole "
            f"numbers >= 1, obs_mode: one of {', '.join(OBS_MODES)}}}; {_LOAD_FIX}"
        )
    return {key: shapes[key] for key in SHAPE_KEYS}


def load_policy(path: str | os.PathLike) -> ExitPolicy:
    """Load any policy saved with ``ExitPolicy.save``. A policy.json that is not valid JSON, or not a
    saved policy, raises :class:`~ee_gym.files.CorruptFileError` naming the file."""
    folder = Path(path)
    file = folder / POLICY_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{folder} holds no saved policy (no {POLICY_FILE})")
    record = read_json(file, _LOAD_FIX)
    if not (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and isinstance(record.get("params"), dict)
    ):
        raise CorruptFileError(
            f"{file} is not a saved policy (expected {{'name': ..., 'params': {{...}}}}, got {record!r:.200}); "
            f"{_LOAD_FIX}"
        )
    shapes = None if record.get("shapes") is None else _saved_shapes(record["shapes"], file)
    policy = make_policy(record["name"], **record["params"])
    policy._load_weights(folder)
    if shapes is not None:
        problem = policy._check_loaded_shapes(shapes)
        if problem is not None:
            raise CorruptFileError(f"{file}: {problem}; {_LOAD_FIX}")
        policy.shapes = shapes
    if record.get("exit_threshold") is not None:
        if not isinstance(record["exit_threshold"], (int, float)) or isinstance(
            record["exit_threshold"], bool
        ):
            raise CorruptFileError(
                f"{file}: its 'exit_threshold' {record['exit_threshold']!r} is not a number; {_LOAD_FIX}"
            )
        policy = policy.with_threshold(float(record["exit_threshold"]))
    return policy


__all__ = [
    "ENTRY_POINT_GROUP",
    "POLICY_FILE",
    "LOSS_WEIGHTS",
    "ROLLOUTS",
    "SHAPE_KEYS",
    "ExitPolicy",
    "PolicyMismatchError",
    "TrainingBudget",
    "check_policy_name",
    "describe_shapes",
    "env_shapes",
    "load_policy",
    "make_policy",
    "make_policy_with",
    "policy_class",
    "policy_names",
    "register_policy",
]
