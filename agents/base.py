"""The protocol every exit policy follows, learned or rule-based.

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
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ee_gym.envs import ConsistentEEVectorEnv
from ee_gym.envs.observations import OBS_MODES
from ee_gym.files import CorruptFileError, read_json, write_json_atomic

POLICY_FILE = "policy.json"
#: what a learner records of the table it learned on (``ExitPolicy.shapes``)
SHAPE_KEYS = ("num_layers", "hidden_size", "num_labels", "obs_mode")
_LOAD_FIX = "save the policy again (policy.save(folder)) or train a new one"


class PolicyMismatchError(ValueError):
    """A learned policy was bound to an env whose table has other shapes than the one it learned on."""


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


class ExitPolicy(ABC):
    """Base class of exit policies. Subclasses set ``name`` and ``obs_mode`` and implement ``act``."""

    name: ClassVar[str] = "policy"
    #: the observation mode this policy reads (the env is made with it)
    obs_mode: ClassVar[str] = "stats"
    #: False for references that read what a deployed model cannot know (labels, later layers)
    deployable: ClassVar[bool] = True
    #: True for policies whose ``learn`` trains something
    learns: ClassVar[bool] = False
    #: a learner's table shapes (:data:`SHAPE_KEYS`), recorded on its first learn/bind; None for rules
    shapes: dict[str, Any] | None = None

    def bind(self, env: ConsistentEEVectorEnv) -> None:
        """Called with the vector env before acting in it. Learners check (or, the first time, record)
        the env's shapes (:class:`PolicyMismatchError` for others); rules: nothing to do."""
        if self.learns:
            self._check_shapes(env_shapes(env, self.obs_mode))
        return None

    @abstractmethod
    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions (int64, 0 or 1) for a batch of observations."""

    def learn(self, env: ConsistentEEVectorEnv, **kwargs: Any) -> ExitPolicy:
        """Train on ``env`` (a vector env made with this policy's ``obs_mode``). Rules: no-op."""
        return self

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
        """The keyword arguments the constructor takes (what ``agents.make`` checks); None: any."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in params if p.kind in kinds]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy to a folder (``policy.json`` plus whatever a learner adds)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_weights(folder)  # first: a learner that cannot save leaves no policy.json behind
        record: dict[str, Any] = {"name": self.name, "params": self.get_params()}
        if self.shapes is not None:
            record["shapes"] = self.shapes
        write_json_atomic(folder / POLICY_FILE, record)
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


def _saved_shapes(shapes: Any, path: Path) -> dict[str, Any]:
    """The ``shapes`` entry of a policy.json, checked, or CorruptFileError."""
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
    from agents import make

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
    policy = make(record["name"], **record["params"])
    policy._load_weights(folder)
    if shapes is not None:
        problem = policy._check_loaded_shapes(shapes)
        if problem is not None:
            raise CorruptFileError(f"{file}: {problem}; {_LOAD_FIX}")
        policy.shapes = shapes
    return policy
