"""Stable-Baselines3 and sb3-contrib learners as exit policies: ``agents.make("ppo")``.

Each policy trains one SB3 model on the native vector env through the SB3 bridge
(:class:`~ee_gym.envs.SB3VecEnv`) and acts with ``model.predict``. An episode is one input, at most
L steps long, with one reward at the exit, so the defaults use no discount (gamma = 1, the paper's
setting), short rollouts and many parallel inputs. Any SB3 constructor argument can be given to the
policy and overrides the defaults: ``agents.make("ppo", total_timesteps=50_000, learning_rate=1e-3)``.

Each also sweeps its decision threshold (``policy.with_threshold(tau)``, one trained model tracing a
curve, ``ee_gym.evaluation.evaluate_sweep``): PPO, A2C and Maskable PPO exit where their EXIT
probability exceeds tau (0.5: the argmax ``model.predict`` takes), DQN and QR-DQN where the margin
Q(EXIT) - Q(CONTINUE) does (0: the greedy action). While no threshold is set, ``act`` is
``model.predict`` itself.

QR-DQN and Maskable PPO need sb3-contrib (``pip install sb3-contrib`` or ``ee-gym[contrib]``).
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.logger import configure as configure_logger
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

from ee_gym.envs import ConsistentEEVectorEnv, ObservationEncoder, SB3VecEnv
from ee_gym.observations import check_obs_mode, get_obs_mode
from ee_gym.policy import ExitPolicy, TrainingBudget
from ee_gym.rewards import REWARDS
from ee_gym.scalars import check_tensorboard
from ee_gym.validation import ConfigError, check_int, check_optional_int

try:
    import sb3_contrib
except ImportError:  # the contrib policies below are removed at the end of the module
    sb3_contrib = None

CONTRIB_POLICIES = ("QRDQNPolicy", "MaskablePPOPolicy")


class MaskableSB3VecEnv(SB3VecEnv):
    """The SB3 bridge plus ``action_masks()``: CONTINUE is forbidden at the last layer."""

    def action_masks(self) -> np.ndarray:
        """[num_envs, 2] booleans, column 0 = CONTINUE, column 1 = EXIT."""
        masks = np.ones((self.num_envs, 2), dtype=bool)
        masks[:, 0] = self.env.layer < self.env.num_layers
        return masks

    # sb3-contrib asks a VecEnv for masks per sub-env, through has_attr and env_method
    def has_attr(self, attr_name: str) -> bool:
        return attr_name == "action_masks" or super().has_attr(attr_name)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs):
        if method_name == "action_masks":
            return list(self.action_masks()[self._get_indices(indices)])
        return super().env_method(method_name, *method_args, indices=indices, **method_kwargs)


class SB3Policy(ExitPolicy):
    """An exit policy trained by an SB3 algorithm (``algorithm``) on the vector env.

    ``total_timesteps`` (>= 1) and ``seed`` are what ``learn`` uses when not given; ``num_envs`` is how
    many inputs run in parallel while training (None: the class's ``num_envs``); ``obs_mode`` what the
    policy reads (None: "state+layer"); every other keyword goes to the algorithm's constructor,
    over ``default_kwargs`` (``agents.make`` refuses keywords that constructor does not take).
    """

    name: ClassVar[str] = "sb3"
    obs_mode: ClassVar[str] = "state+layer"
    learns: ClassVar[bool] = True
    algorithm: ClassVar[type[BaseAlgorithm]]
    #: the algorithm's constructor arguments unless the user gives others
    default_kwargs: ClassVar[dict[str, Any]] = {}
    #: parallel inputs while training
    num_envs: ClassVar[int] = 64
    vec_env_class: ClassVar[type[SB3VecEnv]] = SB3VecEnv
    sweeps_threshold: ClassVar[bool] = True
    #: the search a comparison runs on its validation slice (benchmarks.tuning): observations,
    #: twice the steps, a larger learning rate, a wider network
    candidates: ClassVar[tuple[tuple[dict, dict], ...]] = (
        ({}, {}),
        ({"obs_mode": "stats"}, {}),
        ({"obs_mode": "full"}, {}),
        ({"total_timesteps": 200_000}, {}),
        ({"learning_rate": 3e-4}, {}),
        ({"policy_kwargs": {"net_arch": [256, 256]}}, {}),
    )
    #: an actor-critic's score is its EXIT probability; argmax of two actions = p(EXIT) > 0.5
    default_threshold: ClassVar[float] = 0.5
    score_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)

    def __init__(
        self,
        total_timesteps: int = 100_000,
        seed: int | None = 0,
        num_envs: int | None = None,
        obs_mode: str | None = None,
        **algo_kwargs: Any,
    ):
        self.total_timesteps = check_int("total_timesteps", total_timesteps, minimum=1)
        self.seed = check_optional_int("seed", seed, minimum=0)
        self.num_envs = check_optional_int("num_envs", num_envs, minimum=1) or type(self).num_envs
        self.obs_mode = check_obs_mode(obs_mode or type(self).obs_mode)
        self.algo_kwargs = copy.deepcopy(algo_kwargs)  # the caller's dicts stay the caller's
        self.model: BaseAlgorithm | None = None

    @classmethod
    def accepted_arguments(cls) -> list[str]:
        """This class's own arguments and the algorithm's constructor arguments (less policy, env)."""
        own = ["total_timesteps", "seed", "num_envs", "obs_mode"]
        algorithm = inspect.signature(cls.algorithm.__init__).parameters
        return own + [name for name in algorithm if name not in ("self", "policy", "env", *own)]

    def get_params(self) -> dict[str, Any]:
        return {
            "total_timesteps": self.total_timesteps,
            "seed": self.seed,
            "num_envs": self.num_envs,
            "obs_mode": self.obs_mode,
            **self.algo_kwargs,
        }

    def fit(self, env: ConsistentEEVectorEnv, budget: TrainingBudget) -> None:
        """Train a new model on ``env``'s table (rebuilt with ``num_envs`` inputs if it has others).

        ``budget`` (:class:`~ee_gym.policy.TrainingBudget`): ``total_timesteps`` and ``seed`` (the
        constructor's when None), ``progress`` (False); the epoch-based fields are not read (the
        algorithm's own settings, given to the constructor, say how it updates)."""
        if budget.loss_weights is not None:
            raise ConfigError(
                f"{self.name} takes its reward from the env: loss_weights is REINFORCE's; build the env on "
                "table.class_balanced() instead"
            )
        seed = budget.get("seed", self.seed)
        venv = self.vec_env_class(self._training_env(env))
        policy = "MultiInputPolicy" if get_obs_mode(self.obs_mode).is_dict else "MlpPolicy"
        # a deep copy: SB3 writes into the policy_kwargs it is given (A2C adds its optimizer class),
        # which would change this policy's params and the class's candidates
        kwargs = copy.deepcopy({"device": "cpu", **self.default_kwargs, **self.algo_kwargs})
        self.model = self.algorithm(policy, venv, seed=seed, **kwargs)
        # TensorBoard when asked (the budget's folder, else SB3's own tensorboard_log= argument);
        # otherwise a logger that writes nothing: SB3's default makes an empty /tmp/SB3-<date> folder
        folder = budget.get("tensorboard_log", None) or self.algo_kwargs.get("tensorboard_log")
        if folder is not None:
            check_tensorboard("tensorboard_log", folder)
            run = os.path.join(str(folder), f"{self.name}_seed{seed}")
            self.model.set_logger(configure_logger(run, ["tensorboard"]))
        else:
            self.model.set_logger(Logger(folder=None, output_formats=[]))
        self._learned_on(env, fresh=True)  # a new model: it fits this table's (L, d, K) only
        self.model.learn(
            budget.get("total_timesteps", self.total_timesteps), progress_bar=budget.get("progress", False)
        )

    def _training_env(self, env: ConsistentEEVectorEnv) -> ConsistentEEVectorEnv:
        """``env`` itself when it fits, else a new vector env with the same table, reward and price."""
        fits = env.num_envs == self.num_envs and env.encoder.mode == self.obs_mode and env.copy
        if fits and getattr(env, "autoreset_mode", AutoresetMode.SAME_STEP) == AutoresetMode.SAME_STEP:
            return env
        reward = next(name for name, fn in REWARDS.items() if fn is env.reward_fn)
        return ConsistentEEVectorEnv(
            self.num_envs,
            table=env.table,
            split=env.split,
            reward=reward,
            alpha=env.alpha,
            obs_mode=self.obs_mode,
            final_obs=False,  # episodes end by termination only: SB3 never reads the exit's obs
        )

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """``model.predict``; with a threshold set (``with_threshold``) and ``deterministic``:
        EXIT where ``exit_scores`` exceeds it."""
        if deterministic and self.exit_threshold is not None:
            return (self.exit_scores(obs) > self.exit_threshold).astype(np.int64)
        return self._predict(obs, deterministic).astype(np.int64)

    def exit_scores(self, obs: Any) -> np.ndarray:
        """The score ``act`` compares with a threshold, per observation row (float64, the shape
        ``model.predict``'s actions have): p(EXIT) here, Q(EXIT) - Q(CONTINUE) for the DQNs."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no model yet: call learn() or load_policy()")
        policy = self.model.policy
        policy.set_training_mode(False)
        tensor, vectorized = policy.obs_to_tensor(obs)
        with torch.no_grad():
            scores = self._scores(tensor, obs).double().cpu().numpy().reshape(-1)
        return scores if vectorized else scores[0]

    def _scores(self, tensor: Any, obs: Any) -> torch.Tensor:
        """[B] scores of a batch already made tensors (``obs``: the same batch as given)."""
        return self.model.policy.get_distribution(tensor).distribution.probs[:, 1]

    def _predict(self, obs: Any, deterministic: bool) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no model yet: call learn() or load_policy()")
        return self.model.predict(obs, deterministic=deterministic)[0]

    def _save_weights(self, folder: Path) -> None:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no model to save: call learn() first")
        self.model.save(folder / "model.zip")

    def _load_weights(self, folder: Path) -> None:
        self.model = self.algorithm.load(folder / "model.zip", device="cpu")

    def _check_loaded_shapes(self, shapes: dict[str, Any]) -> str | None:
        problem = super()._check_loaded_shapes(shapes)
        space = ObservationEncoder(
            shapes["obs_mode"], shapes["num_layers"], shapes["hidden_size"], shapes["num_labels"]
        ).space
        if problem is None and self.model.observation_space != space:
            problem = (
                f"the model reads observations {self.model.observation_space}, the shapes record {space}"
            )
        return problem


class PPOPolicy(SB3Policy):
    """PPO: the most reliable of these learners on this env (see the defaults' comments)."""

    name = "ppo"
    algorithm = PPO
    default_kwargs = {
        "gamma": 1.0,  # one reward at the exit: no discount (the paper's setting)
        "gae_lambda": 1.0,  # returns are the exit reward itself; episodes are at most L steps
        "n_steps": 8,  # x 64 inputs = 512 steps per update: many short episodes, frequent updates
        "batch_size": 256,
        "n_epochs": 4,
        "learning_rate": 1e-3,
        "ent_coef": 0.01,  # a little exploration; the reward is sparse
    }


class A2CPolicy(SB3Policy):
    """A2C (synchronous advantage actor-critic)."""

    name = "a2c"
    algorithm = A2C
    default_kwargs = {"gamma": 1.0, "gae_lambda": 1.0, "n_steps": 8, "learning_rate": 1e-3, "ent_coef": 0.01}


class DQNPolicy(SB3Policy):
    """DQN: Q(s, CONTINUE) against Q(s, EXIT); the exit's reward is the target of EXIT."""

    name = "dqn"
    algorithm = DQN
    num_envs = 16
    default_kwargs = {
        "gamma": 1.0,
        "learning_rate": 1e-3,
        "buffer_size": 50_000,
        "learning_starts": 1_000,  # a few hundred episodes of random exits before the first update
        "batch_size": 128,
        "train_freq": 1,  # one update per 16 transitions
        "target_update_interval": 250,  # value must flow back over up to L steps: refresh often
        "exploration_fraction": 0.1,
        "exploration_final_eps": 0.02,
    }
    #: the score is a Q-value margin: unbounded, greedy at 0, so a sweep reads a table's scores
    default_threshold = 0.0
    score_range = None

    def _scores(self, tensor: Any, obs: Any) -> torch.Tensor:
        q = self._q_values(tensor)
        return q[:, 1] - q[:, 0]

    def _q_values(self, tensor: Any) -> torch.Tensor:
        """[B, 2] Q(s, CONTINUE), Q(s, EXIT)."""
        return self.model.policy.q_net(tensor)


class QRDQNPolicy(DQNPolicy):
    """QR-DQN (sb3-contrib): DQN learning the distribution of returns."""

    name = "qrdqn"
    algorithm = sb3_contrib.QRDQN if sb3_contrib else None
    #: 25 quantiles instead of 200: the loss is quadratic in them (40x faster here, as good)
    default_kwargs = {**DQNPolicy.default_kwargs, "policy_kwargs": {"n_quantiles": 25}}
    candidates = (
        *SB3Policy.candidates[:-1],
        ({"policy_kwargs": {"n_quantiles": 25, "net_arch": [256, 256]}}, {}),  # keeps the 25 quantiles
    )

    def _q_values(self, tensor: Any) -> torch.Tensor:
        return self.model.policy.quantile_net(tensor).mean(dim=1)  # the mean of the quantiles, as predict


class MaskablePPOPolicy(PPOPolicy):
    """Maskable PPO (sb3-contrib): CONTINUE is masked at the last layer, where the env exits anyway.

    At inference the mask is read from the observation's layer one-hot (``state+layer`` and
    ``state+confidence``: its last value is 1 at the last layer); other observation modes act without
    a mask.
    """

    name = "maskable-ppo"
    algorithm = sb3_contrib.MaskablePPO if sb3_contrib else None
    vec_env_class = MaskableSB3VecEnv

    def _predict(self, obs: Any, deterministic: bool) -> np.ndarray:
        masks = self._masks(obs)
        if self.model is None or masks is None:
            return super()._predict(obs, deterministic)
        return self.model.predict(obs, deterministic=deterministic, action_masks=masks)[0]

    def _scores(self, tensor: Any, obs: Any) -> torch.Tensor:
        masks = self._masks(obs)  # p(EXIT) = 1 at the last layer, as the masked predict
        if masks is not None:
            masks = masks.reshape(-1, 2)
        return self.model.policy.get_distribution(tensor, action_masks=masks).distribution.probs[:, 1]

    def _masks(self, obs: Any) -> np.ndarray | None:
        """[..., 2] action masks read off the layer one-hot (CONTINUE off at the last layer); None
        for observation modes without one."""
        if not get_obs_mode(self.obs_mode).has_layer_one_hot:
            return None
        last = np.asarray(obs)[..., -1] == 1.0
        return np.stack([~last, np.ones_like(last)], axis=-1)


if sb3_contrib is None:
    del QRDQNPolicy, MaskablePPOPolicy

    def __getattr__(name: str) -> Any:
        if name in CONTRIB_POLICIES:
            raise ImportError(f"{name} needs sb3-contrib: pip install sb3-contrib (or ee-gym[contrib])")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
