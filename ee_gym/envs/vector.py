"""The natively batched vector env: every sub-env steps at once by array indexing into the table.

``gym.make_vec("ConsistentEE-RTE-v0", num_envs=4096)`` returns it. Two autoreset modes
(``autoreset_mode=``, recorded per instance in ``env.metadata["autoreset_mode"]``):

* ``"same-step"`` (``AutoresetMode.SAME_STEP``, the default): sub-envs reset in the same step as they
  exit: the returned observation is layer 1 of the next input, and ``info["final_obs"]`` /
  ``info["final_info"]`` (masked by ``info["_final_obs"]``) hold the exit's.
* ``"next-step"`` (``AutoresetMode.NEXT_STEP``, Gymnasium's default, which wrappers such as
  ``gymnasium.wrappers.vector.NormalizeObservation`` require): the exit step returns the exit layer's
  observation, its reward and ``terminated`` True, with the exit's fields in ``info`` (``info["exit_layer"]``
  masked by ``info["_exit_layer"]``, and so on); the next step resets that sub-env, ignoring its
  action: layer 1 of the next input, reward 0, ``terminated`` False.

Order of inputs: seeded draws on the training split (and its slices); on other splits (``dev``) a walk
0, 1, ..., N-1, 0, ..., in the order sub-envs need new inputs (at ``reset()`` sub-env i takes the
i-th next input). As in the single env, ``reset()`` continues the walk where it is and
``reset(seed=...)`` starts it again at input 0 (so ``reset(seed=s)`` on a fresh env and on a used one
give the same inputs); ``reset(options={"index": [...]})`` puts sub-envs on chosen inputs and leaves
the walk where it was.

Bad arguments raise :class:`~ee_gym.validation.ConfigError` (a ValueError) naming the setting: at
construction (before anything is loaded), in ``reset`` (a seed, ``options``, an ``index`` that is
not one whole number per sub-env; out of range: :class:`~ee_gym.envs.classification.InputIndexError`)
and in ``step`` (actions); ``step`` before the first ``reset`` raises ``EpisodeOverError``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from ee_gym.envs.classification import (
    EXIT,
    EpisodeOverError,
    InputIndexError,
    check_env_settings,
    check_options,
    check_seed,
    draws_at_random,
)
from ee_gym.envs.table import ExitTable
from ee_gym.observations import ObservationEncoder
from ee_gym.protocols import env_split
from ee_gym.rewards import default_alpha
from ee_gym.validation import ConfigError, check_int

if TYPE_CHECKING:
    from ee_gym.multiexit import MultiExitModel

FINAL_INFO_KEYS = (
    "index",
    "exit_layer",
    "prediction",
    "label",
    "correct",
    "memorized_layer",
    "cross_entropy",
)
#: what ``autoreset_mode=`` accepts, by name (the AutoresetMode members, their values, and these)
AUTORESET_MODES = {
    "same-step": AutoresetMode.SAME_STEP,
    "next-step": AutoresetMode.NEXT_STEP,
}


def check_autoreset_mode(mode: Any) -> AutoresetMode:
    """``AutoresetMode.SAME_STEP`` or ``NEXT_STEP`` from the member itself, its value (``"SameStep"``)
    or ``"same-step"`` / ``"next-step"`` (any case, ``_`` for ``-``); else ConfigError."""
    if isinstance(mode, AutoresetMode):
        found = mode
    elif isinstance(mode, str):
        key = mode.strip().lower().replace("_", "-")
        by_value = {m.value.lower(): m for m in AutoresetMode}
        found = AUTORESET_MODES.get(key) or by_value.get(key.replace("-", ""))
    else:
        found = None
    if found not in AUTORESET_MODES.values():
        raise ConfigError(
            f"unknown autoreset_mode {mode!r}; choose 'same-step' (AutoresetMode.SAME_STEP, the default) "
            "or 'next-step' (AutoresetMode.NEXT_STEP)"
        )
    return found


class ConsistentEEVectorEnv(VectorEnv):
    """``num_envs`` copies of :class:`~ee_gym.envs.ConsistentEEEnv` over one shared table.

    Takes the single env's keyword arguments (cached mode only), plus ``final_obs=False`` to skip
    copying exit observations into ``info`` when nothing reads them (same-step mode), ``copy=False``
    to return the env's own observation buffer (overwritten by the next step) instead of a copy, and
    ``autoreset_mode`` (``"same-step"``, the default, or ``"next-step"``: see the module docstring).
    ``num_envs`` is a whole number >= 1.

    Inputs: seeded draws on the training split; on other splits the walk of the module docstring:
    ``reset()`` continues it, ``reset(seed=...)`` starts it at input 0, as the single env does.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        task: str = "rte",
        split: str | None = None,  # None: the protocol's policy split (prepare.env_split)
        *,
        protocol: str | None = None,  # None: the default, "paper" (ee_gym.protocols)
        model: MultiExitModel | str | os.PathLike | None = None,
        backbone: str | None = None,
        reward: str = "hardness",
        alpha: float | None = None,
        obs_mode: str = "state+layer",
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_inputs: int | None = None,
        max_length: int | None = None,
        mode: str = "cached",
        progress: bool = True,
        table: ExitTable | None = None,
        final_obs: bool = True,
        copy: bool = True,
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
        task_spec: dict | None = None,
    ):
        # Every keyword first: nothing below (stage 1, the cache) starts for a setting that cannot be right.
        split = env_split(split, protocol, model, table)
        num_envs = check_int("num_envs", num_envs, minimum=1)
        checked = check_env_settings(
            task=task,
            split=split,
            reward=reward,
            alpha=alpha,
            obs_mode=obs_mode,
            max_inputs=max_inputs,
            max_length=max_length,
            mode=mode,
            model=model,
            backbone=backbone,
            table=table,
            task_spec=task_spec,
        )
        if mode != "cached":
            raise ConfigError("the vector env replays the cache: use mode='cached' (live mode is single-env)")
        if render_mode is not None:
            raise ConfigError("the vector env does not render; use the single env with render_mode='ansi'")
        self.autoreset_mode = check_autoreset_mode(autoreset_mode)
        split, alpha, max_inputs, max_length = (
            checked[k] for k in ("split", "alpha", "max_inputs", "max_length")
        )
        if table is None:  # the model and the cache code load only now (torch with them)
            from ee_gym.envs.prepare import env_table

            _, table = env_table(
                checked["spec"].name, split, protocol=protocol, model=model, backbone=backbone,
                data_dir=data_dir, cache_dir=cache_dir, max_inputs=max_inputs, max_length=max_length,
                progress=progress,
            )  # fmt: skip
        if table.num_inputs < 1:
            raise ConfigError(
                f"the split {split!r} has no inputs: an episode needs at least one "
                "(check the data files, the split's slice and max_inputs)"
            )
        self.table, self.split, self.task = table, split, table.task
        self.num_envs = num_envs
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        self.num_layers = table.num_layers
        self.reward_fn, self.reward_name = checked["reward_fn"], reward
        self.alpha = default_alpha(self.task, self.num_layers) if alpha is None else alpha
        self.encoder = ObservationEncoder(obs_mode, table.num_layers, table.hidden_size, table.num_labels)
        self.single_observation_space = self.encoder.space
        self.observation_space = batch_space(self.encoder.space, self.num_envs)
        self.single_action_space = spaces.Discrete(2)
        self.action_space = spaces.MultiDiscrete(np.full(self.num_envs, 2))
        self.final_obs, self.copy = final_obs, copy

        self.index = np.zeros(self.num_envs, dtype=np.int64)
        self.layer = np.zeros(self.num_envs, dtype=np.int64)  # 0: not reset yet
        self._restart = np.zeros(self.num_envs, dtype=bool)  # next-step mode: rows that ended last step
        self._obs = self.encoder.allocate(self.num_envs)
        self._spare = self.encoder.allocate(self.num_envs)  # two buffers, swapped every step
        self._returned = self._obs  # what the last reset/step returned (final_obs of the next)
        self._next_in_order = 0
        self._np_random, self._np_random_seed = seeding.np_random()

    # -- Gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Layer 1 of an input in every sub-env: ``options={"index": [...]}`` (one per sub-env), else
        the next draws (the module docstring's order: ``seed`` re-seeds and restarts the dev walk)."""
        seed, options = check_seed(seed), check_options(options)
        index = self._check_indices(options["index"]) if options and "index" in options else None
        if seed is not None:  # reset(seed=s) is reproducible on ordered splits too
            self._np_random, self._np_random_seed = seeding.np_random(seed)
            self._next_in_order = 0
        self.index[:] = self._draw(self.num_envs) if index is None else index
        self.layer[:] = 1
        self._restart[:] = False
        self.encoder.batch(self.table, self.index, self.layer, self._obs)
        self._returned = self._copy(self._obs)
        return self._returned, {}

    def step(self, actions):
        try:
            actions = np.asarray(actions)
        except (TypeError, ValueError):  # ragged nested lists
            raise ConfigError(
                f"invalid actions {actions!r}: give {self.num_envs} actions, each 0 or 1"
            ) from None
        if actions.shape != (self.num_envs,):
            raise ConfigError(f"expected {self.num_envs} actions, got shape {actions.shape}")
        # Non-numeric (strings, None) and non-integral (0.5) actions are refused too, not only 2 and -1.
        if actions.dtype.kind not in "biuf" or not ((actions == 0) | (actions == 1)).all():
            raise ConfigError("invalid action: every action must be 0 (CONTINUE) or 1 (EXIT)")
        if self.layer[0] == 0:
            raise EpisodeOverError("step() before reset(): call reset() first")

        restart = self._restart  # next-step mode: these rows start their next input, actions ignored
        exits = ((actions == EXIT) | (self.layer == self.num_layers)) & ~restart
        rows = np.flatnonzero(exits)
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        infos: dict[str, Any] = {}
        if rows.size:
            index, layer = self.index[rows], self.layer[rows]
            table = self.table
            ce = table.cross_entropy[index, layer - 1]
            correct = table.correct[index, layer - 1]
            memorized = table.memorized[index]
            rewards[rows] = self.reward_fn(ce, correct, layer, memorized, self.num_layers, self.alpha)
            infos = self._final_infos(rows, exits, index, layer, ce, correct, memorized)
        if self.autoreset_mode == AutoresetMode.SAME_STEP:
            if rows.size:
                self.index[rows] = self._draw(rows.size)
                self.layer[rows] = 0  # +1 below: layer 1 of the next input
            self.layer += 1
        else:  # exits stay at their exit layer for this step; last step's exits start anew
            self.layer[~exits & ~restart] += 1
            back = np.flatnonzero(restart)
            if back.size:
                self.index[back] = self._draw(back.size)
                self.layer[back] = 1
            self._restart = exits
        self._obs, self._spare = self._spare, self._obs  # the old buffer stays readable as final_obs
        self.encoder.batch(self.table, self.index, self.layer, self._obs)
        truncated = np.zeros(self.num_envs, dtype=bool)
        self._returned = self._copy(self._obs)
        return self._returned, rewards, exits, truncated, infos

    # -- internals ---------------------------------------------------------------------------
    def _check_indices(self, raw: Any) -> np.ndarray:
        """``options["index"]``: one whole number in 0..N-1 per sub-env (a scalar when num_envs is 1)."""
        n = self.table.num_inputs
        try:
            index = np.asarray(raw)
        except (TypeError, ValueError):  # ragged nested lists
            index = np.asarray(None)
        if index.ndim == 0 and self.num_envs == 1 and index.dtype != object:
            index = index.reshape(1)
        whole = index.dtype.kind in "iu" or (
            index.dtype.kind == "f"
            and bool(np.isfinite(index).all())
            and bool((index == np.round(index)).all())
        )
        if index.shape != (self.num_envs,) or not whole:
            raise ConfigError(
                f'options["index"] must be {self.num_envs} whole number(s), one input index per sub-env, '
                f"got {raw!r}"
            )
        bad = index[(index < 0) | (index >= n)]  # before the cast, which would wrap huge values
        if bad.size:
            raise InputIndexError(f"index {bad[0]} out of range for {n} inputs (use 0..{n - 1})")
        return index.astype(np.int64)

    def _draw(self, count: int) -> np.ndarray:
        """Next inputs: seeded draws on the training split (or a slice of it), in order otherwise."""
        n = self.table.num_inputs
        if draws_at_random(self.split):
            return self._np_random.integers(n, size=count)
        start = self._next_in_order
        self._next_in_order = (start + count) % n
        return (start + np.arange(count)) % n

    def _final_infos(self, rows, exits, index, layer, ce, correct, memorized) -> dict[str, Any]:
        predictions = self.table.predictions[index, layer - 1]
        values = {
            "index": index,
            "exit_layer": layer,
            "prediction": predictions,
            "label": self.table.labels[index],
            "correct": correct,
            "memorized_layer": memorized,
            "cross_entropy": ce,
        }
        final_info = {}
        for key in FINAL_INFO_KEYS:
            column = np.zeros(self.num_envs, dtype=np.asarray(values[key]).dtype)
            column[rows] = values[key]
            final_info[key] = column
            final_info["_" + key] = exits
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            return final_info  # Gymnasium's next-step layout: the exit step's own info, masked
        infos: dict[str, Any] = {"final_info": final_info, "_final_info": exits}
        if self.final_obs:
            # What the previous step returned holds every row's observation at its exit layer: it
            # is handed back as is (no copy). Rows outside the mask hold what that step showed them.
            infos["final_obs"], infos["_final_obs"] = self._returned, exits
        return infos

    def _copy(self, obs):
        """Callers may keep observations across steps, so they get a copy of the buffer."""
        if not self.copy:
            return obs
        if isinstance(obs, dict):
            return {key: value.copy() for key, value in obs.items()}
        return obs.copy()
