"""The natively batched vector env: every sub-env steps at once by array indexing into the table.

``gym.make_vec("ConsistentEE-RTE-v0", num_envs=4096)`` returns it. Sub-envs reset in the same step as
they exit (``AutoresetMode.SAME_STEP``): the returned observation is layer 1 of the next input, and
``info["final_obs"]`` / ``info["final_info"]`` (masked by ``info["_final_obs"]``) hold the exit's.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from ee_gym.backbones import DEFAULT_BACKBONE
from ee_gym.envs.classification import EXIT, EpisodeOverError, draws_at_random
from ee_gym.envs.observations import ObservationEncoder
from ee_gym.envs.prepare import default_max_length, load_model, load_table
from ee_gym.envs.table import ExitTable
from ee_gym.multiexit import MultiExitModel
from ee_gym.rewards import default_alpha, get_reward
from ee_gym.tasks import get_task

FINAL_INFO_KEYS = (
    "index",
    "exit_layer",
    "prediction",
    "label",
    "correct",
    "memorized_layer",
    "cross_entropy",
)


class ConsistentEEVectorEnv(VectorEnv):
    """``num_envs`` copies of :class:`~ee_gym.envs.ConsistentEEEnv` over one shared table.

    Takes the single env's keyword arguments (cached mode only), plus ``final_obs=False`` to skip
    copying exit observations into ``info`` when nothing reads them, and ``copy=False`` to return the
    env's own observation buffer (overwritten by the next step) instead of a copy.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        task: str = "rte",
        split: str = "train",
        *,
        model: MultiExitModel | str | os.PathLike | None = None,
        backbone: str = DEFAULT_BACKBONE,
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
    ):
        if mode != "cached":
            raise ValueError("the vector env replays the cache: use mode='cached' (live mode is single-env)")
        if render_mode is not None:
            raise ValueError("the vector env does not render; use the single env with render_mode='ansi'")
        if table is None:
            task = get_task(task).name
            loaded = load_model(task, model=model, backbone=backbone, data_dir=data_dir, progress=progress)
            table = load_table(
                loaded,
                task,
                split,
                data_dir=data_dir,
                cache_dir=cache_dir,
                max_inputs=max_inputs,
                max_length=max_length or default_max_length(task),
                progress=progress,
            )
        self.table, self.split, self.task = table, split, table.task
        self.num_envs = int(num_envs)
        self.num_layers = table.num_layers
        self.reward_fn, self.reward_name = get_reward(reward), reward
        self.alpha = default_alpha(self.task, self.num_layers) if alpha is None else float(alpha)
        self.encoder = ObservationEncoder(obs_mode, table.num_layers, table.hidden_size, table.num_labels)
        self.single_observation_space = self.encoder.space
        self.observation_space = batch_space(self.encoder.space, self.num_envs)
        self.single_action_space = spaces.Discrete(2)
        self.action_space = spaces.MultiDiscrete(np.full(self.num_envs, 2))
        self.final_obs, self.copy = final_obs, copy

        self.index = np.zeros(self.num_envs, dtype=np.int64)
        self.layer = np.zeros(self.num_envs, dtype=np.int64)  # 0: not reset yet
        self._obs = self.encoder.allocate(self.num_envs)
        self._spare = self.encoder.allocate(self.num_envs)  # two buffers, swapped every step
        self._returned = self._obs  # what the last reset/step returned (final_obs of the next)
        self._next_in_order = 0
        self._np_random, self._np_random_seed = seeding.np_random()

    # -- Gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        self._next_in_order = 0
        if options and "index" in options:
            index = np.asarray(options["index"], dtype=np.int64).reshape(self.num_envs)
            if index.min() < 0 or index.max() >= self.table.num_inputs:
                raise IndexError(f"index out of range for {self.table.num_inputs} inputs")
            self.index[:] = index
        else:
            self.index[:] = self._draw(self.num_envs)
        self.layer[:] = 1
        self.encoder.batch(self.table, self.index, self.layer, self._obs)
        self._returned = self._copy(self._obs)
        return self._returned, {}

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"expected {self.num_envs} actions, got shape {actions.shape}")
        # Non-numeric (strings, None) and non-integral (0.5) actions are refused too, not only 2 and -1.
        if actions.dtype.kind not in "biuf" or not ((actions == 0) | (actions == 1)).all():
            raise ValueError("invalid action: every action must be 0 (CONTINUE) or 1 (EXIT)")
        if self.layer[0] == 0:
            raise EpisodeOverError("step() before reset(): call reset() first")

        exits = (actions == EXIT) | (self.layer == self.num_layers)
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
            self.index[rows] = self._draw(rows.size)
            self.layer[rows] = 0  # +1 below: layer 1 of the next input
        self.layer += 1
        self._obs, self._spare = self._spare, self._obs  # the old buffer stays readable as final_obs
        self.encoder.batch(self.table, self.index, self.layer, self._obs)
        truncated = np.zeros(self.num_envs, dtype=bool)
        self._returned = self._copy(self._obs)
        return self._returned, rewards, exits, truncated, infos

    # -- internals ---------------------------------------------------------------------------
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
