"""Stable-Baselines3 on the natively batched env: PPO, A2C and DQN train on it directly.

    venv = make_sb3_vec_env("ConsistentEE-RTE-v0", num_envs=64)
    PPO("MlpPolicy", venv, gamma=1.0).learn(100_000)      # MultiInputPolicy for obs_mode="full"

An episode is one input and lasts at most L steps (one per layer); its one reward comes at the exit,
so gamma = 1 is the natural discount and the return of an episode is its exit reward. Episodes always
end by termination, never by truncation.

What SB3 sees (:class:`SB3VecEnv`): ``dones = terminated | truncated``; the observation of a done
sub-env is already layer 1 of its next input, as in every SB3 ``VecEnv``; ``infos`` is a list of one
dict per sub-env, empty unless the sub-env is done, and then holding

    terminal_observation   the exit layer's observation (a dict of arrays for Dict observations);
                           absent when the vector env was made with ``final_obs=False``, which no
                           algorithm needs here since nothing is truncated
    index, exit_layer, prediction, label, correct, memorized_layer, cross_entropy
                           the exit's fields, as plain Python numbers
    episode                {"r": return, "l": length, "t": seconds since construction}, what
                           SB3's Monitor/VecMonitor write, so ``rollout/ep_rew_mean`` and
                           ``ep_len_mean`` are logged without wrapping in VecMonitor
    TimeLimit.truncated    False (True only for a truncation, which this env never makes)

The sub-envs are rows of one shared env, not separate objects: ``get_attr``/``env_method`` read or
call the vector env once and repeat the answer per index, and ``set_attr`` sets it for every sub-env.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from ee_gym.envs.table import ExitTable
from ee_gym.envs.vector import ConsistentEEVectorEnv
from ee_gym.validation import ConfigError, check_int

#: the exit's fields copied into a done sub-env's info, in the order _fill_done_infos unpacks them
EXIT_FIELDS = ("index", "exit_layer", "prediction", "label", "correct", "memorized_layer", "cross_entropy")


class SB3VecEnv(VecEnv):
    """An SB3 ``VecEnv`` over a :class:`ConsistentEEVectorEnv` (see the module docstring).

    Seeding follows SB3: ``venv.seed(s)`` then ``venv.reset()`` seeds the vector env's one generator
    with ``s`` (SB3 hands sub-env i the seed ``s + i``; only the first is used). ``set_options`` with
    ``{"index": i}`` per sub-env starts each sub-env on a chosen input at the next reset.
    """

    def __init__(self, env: ConsistentEEVectorEnv):
        if not isinstance(env, ConsistentEEVectorEnv):
            raise TypeError(f"expected a ConsistentEEVectorEnv, got {type(env).__name__}")
        if not env.copy:  # SB3 keeps the last observations while it steps
            raise ValueError("SB3 keeps observations across steps: make the vector env with copy=True")
        if env.autoreset_mode != AutoresetMode.SAME_STEP:  # SB3 resets done sub-envs in the same step
            raise ConfigError(
                "SB3 resets sub-envs in the step they end: make the vector env with "
                "autoreset_mode='same-step' (the default)"
            )
        self.env = env
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self._returns = np.zeros(self.num_envs, dtype=np.float64)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._actions: np.ndarray | None = None
        self._start = time.time()

    # -- stepping ------------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        indices = [options.get("index") for options in self._options]
        if any(i is not None for i in indices) and any(i is None for i in indices):
            raise ValueError("set_options: give an 'index' to every sub-env or to none")
        options = None if indices[0] is None else {"index": indices}
        obs, _ = self.env.reset(seed=self._seeds[0], options=options)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self._returns[:] = 0.0
        self._lengths[:] = 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, info = self.env.step(self._actions)
        dones = terminated | truncated
        self._returns += rewards
        self._lengths += 1
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        rows = np.flatnonzero(dones)
        if rows.size:
            self._fill_done_infos(infos, rows, info, terminated, truncated)
            self._returns[rows] = 0.0
            self._lengths[rows] = 0
        return obs, rewards.astype(np.float32), dones, infos

    def _fill_done_infos(self, infos, rows, info, terminated, truncated) -> None:
        """One dict per done sub-env, built column by column (the hot path at large batch)."""
        final, elapsed = info["final_info"], round(time.time() - self._start, 6)
        columns = [final[key][rows].tolist() for key in EXIT_FIELDS]
        truncation = (truncated[rows] & ~terminated[rows]).tolist()
        returns, lengths = self._returns[rows].tolist(), self._lengths[rows].tolist()
        done = rows.tolist()
        for i, index, layer, prediction, label, correct, memorized, ce, cut, ret, length in zip(
            done, *columns, truncation, returns, lengths, strict=True
        ):
            infos[i] = {
                "index": index, "exit_layer": layer, "prediction": prediction, "label": label,
                "correct": correct, "memorized_layer": memorized, "cross_entropy": ce,
                "TimeLimit.truncated": cut, "episode": {"r": ret, "l": length, "t": elapsed},
            }  # fmt: skip
        final_obs = info.get("final_obs")
        if isinstance(final_obs, dict):
            parts = [list(value[rows]) for value in final_obs.values()]
            for i, *values in zip(done, *parts, strict=True):
                infos[i]["terminal_observation"] = dict(zip(final_obs, values, strict=True))
        elif final_obs is not None:
            for i, value in zip(done, final_obs[rows], strict=True):
                infos[i]["terminal_observation"] = value

    def close(self) -> None:
        self.env.close()

    # -- the shared env's attributes and methods ----------------------------------------------------
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.env, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if sorted(self._get_indices(indices)) != list(range(self.num_envs)):
            raise ValueError("the sub-envs share one env: set attributes for all of them (indices=None)")
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs):
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]

    def render(self, mode: str | None = None) -> None:
        """The vector env does not render (use the single env with ``render_mode="ansi"``)."""
        return None


def make_sb3_vec_env(
    env_id_or_task: str | ExitTable | ConsistentEEVectorEnv, num_envs: int | None = None, **env_kwargs
) -> SB3VecEnv:
    """An :class:`SB3VecEnv` from a gym id (``"ConsistentEE-RTE-v0"``), a task name (``"rte"``), an
    :class:`ExitTable`, or a prebuilt :class:`ConsistentEEVectorEnv`.

    ``env_kwargs`` go to the vector env (``obs_mode=``, ``reward=``, ``table=``, ``final_obs=`` ...);
    ``num_envs`` defaults to 1 (or to the prebuilt env's).
    """
    if isinstance(env_id_or_task, ConsistentEEVectorEnv):
        if env_kwargs or num_envs not in (None, env_id_or_task.num_envs):
            raise ValueError("a prebuilt vector env takes no num_envs or env kwargs")
        return SB3VecEnv(env_id_or_task)
    num_envs = 1 if num_envs is None else check_int("num_envs", num_envs, minimum=1)
    if isinstance(env_id_or_task, ExitTable):
        env = ConsistentEEVectorEnv(num_envs, table=env_id_or_task, **env_kwargs)
    elif env_id_or_task in gym.registry:
        env = gym.make_vec(env_id_or_task, num_envs, vectorization_mode="vector_entry_point", **env_kwargs)
    else:
        env = ConsistentEEVectorEnv(num_envs, task=env_id_or_task, **env_kwargs)
    return SB3VecEnv(env)
