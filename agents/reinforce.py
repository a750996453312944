"""REINFORCE: ConsistentEE's own exit-policy learner (docs/method.md, "Stage 2"), on the native vector env.

One small network per layer, pi_l(s_l) = sigmoid(W2 gelu(W1 s_l)) with W1: d -> 32 and W2: 32 -> 1,
gives the probability of EXIT at layer l. Training follows docs/method.md ("Stage 2"):

* each batch of B inputs (a seeded shuffle of the table, every epoch) is replicated K times and
  played in one :class:`~ee_gym.envs.ConsistentEEVectorEnv` of B*K sub-envs, reset onto those inputs;
  every row plays until its first exit (at most L steps); rows that exited are masked out, the new
  episodes the env starts for them (SAME_STEP autoreset) are ignored;
* log pi(tau) = sum_{l<t} log(1 - p_l) + log p_t; an input forced out at L by the env after the
  policy said CONTINUE adds log(1 - p_L) instead (:func:`trajectory_log_prob`);
* the reward is the env's own (``env.reward_fn``, ``env.alpha``), paid once at the exit; the baseline
  b(x) is the mean reward of the K replicas of the same input (:func:`group_baseline`); no discount,
  no entropy bonus; loss = -mean (R - b(x)) log pi(tau); Adam.

Two rollout modes (``rollout=``):

* ``"sample"``: actions drawn from Bernoulli(p_l), the textbook form of REINFORCE.
* ``"threshold"``: the authors' code: exit when p_l > 0.5, as at inference, the replicas differing
  only by dropout. A cached env replays frozen states, so there is no backbone dropout to make the
  replicas differ: in this mode dropout (``dropout``, 0.1) is applied to the policy's input state
  during training, which is then the only source of exploration.

Inference (``act`` with ``deterministic=True``, what ``agents.evaluate`` uses) is the paper's rule in
both modes: exit at the first layer with p_l > 0.5, else at L. The 0.5 is a decision threshold like a
rule's: ``policy.with_threshold(tau)`` exits where p_l > tau instead, so one trained policy traces a
curve of metric against cost (``ee_gym.evaluation.evaluate_sweep``); the exit probabilities are the
scores (``exit_scores``).

Default: ``rollout="sample"``: on a synthetic table it reached the oracle in 3 epochs on every seed,
where ``"threshold"`` needed 20, and on RTE ``"threshold"`` did not learn at all (every replica of an
input took the same path, so every advantage was 0). The measurements:
``benchmarks/results/reinforce/README.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special
from torch import nn
from tqdm.auto import tqdm

from agents.weights import HISTORY_FILE, NetworkWeights  # noqa: F401 (HISTORY_FILE: re-exported)
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable, ObservationEncoder
from ee_gym.observations import LAYER_ONE_HOT_MODES, OBS_MODE_REGISTRY
from ee_gym.policy import ROLLOUTS, ExitPolicy, TrainingBudget, decides_at
from ee_gym.runner import NetworkExits, model_env_stand_in
from ee_gym.scalars import ScalarLog
from ee_gym.validation import ConfigError, check_float, check_int, check_optional_int

WEIGHTS_FILE = "policy.safetensors"


def check_rollout(rollout: str) -> str:
    """``rollout`` when it is one of :data:`ROLLOUTS`, else ConfigError."""
    if not isinstance(rollout, str) or rollout not in ROLLOUTS:
        raise ConfigError(f"unknown rollout {rollout!r}; choose one of {', '.join(ROLLOUTS)}")
    return rollout


# -- the network ------------------------------------------------------------------------------------
class PerLayerPolicy(nn.Module):
    """pi_l(s) = sigmoid(W2 gelu(W1 s)), one network per layer; ``forward`` returns the logits.

    Rows are grouped by layer, so a batch costs one small matmul per layer present in it (in a
    training rollout every active row is at the same layer: one matmul per step).
    """

    def __init__(self, state_size: int, num_layers: int, hidden_size: int = 32):
        super().__init__()
        self.state_size, self.num_layers, self.hidden_size = state_size, num_layers, hidden_size
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(state_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))
            for _ in range(num_layers)
        )

    def numpy_logits(self, states: np.ndarray, layer: int) -> np.ndarray:
        """Exit logits [B] of float32 states [B, d] at one layer (1-based), in numpy: what acting
        calls, without torch's per-operation dispatch, which costs a tiny network more than its
        arithmetic does (on SmolLM2 a decision through torch measured a third of a decoder layer).
        The arrays are views of the parameters, so training updates show through."""
        w1, b1, w2, b2 = self._numpy_views(layer)
        hidden = states @ w1.T + b1
        hidden = 0.5 * hidden * (1.0 + special.erf(hidden * np.float32(1 / np.sqrt(2))))  # exact GELU
        return hidden @ w2 + b2

    def _numpy_views(self, layer: int) -> tuple[np.ndarray, ...]:
        """(W1 [h, d], b1 [h], w2 [h], b2 [1]) of a layer's network as numpy views, kept while the
        first weight's storage is the same (a copied, moved or reloaded network gets fresh views)."""
        cache = self.__dict__.setdefault("_views", {})
        entry = cache.get(layer)
        # walking the module for its parameters costs more than the decision's arithmetic: keep them,
        # and check only that their storage is still the one the views read (the weights move together)
        if entry is None or entry[0].data_ptr() != entry[1]:
            w1, b1, w2, b2 = (p.detach().numpy() for p in self.layers[layer - 1].parameters())
            first = self.layers[layer - 1][0].weight
            entry = cache[layer] = (first, first.data_ptr(), (w1, b1, w2[0], b2))
        return entry[2]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self.__dict__.pop("_views", None)  # assign=True replaces the parameters the views were kept for
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, states: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """Exit logits [B] of states [B, d] at layers [B] (1-based)."""
        first = int(layers[0]) if layers.numel() else 0
        if first and bool((layers == first).all()):  # one layer (decoding, rollouts): no grouping cost
            return self.layers[first - 1](states).squeeze(-1)
        out = states.new_zeros(states.shape[0])
        for layer in torch.unique(layers).tolist():
            rows = torch.nonzero(layers == layer).squeeze(1)
            out = out.index_put((rows,), self.layers[layer - 1](states[rows]).squeeze(-1))
        return out


# -- the two formulas of the policy gradient -------------------------------------------------------
def trajectory_log_prob(
    logits: torch.Tensor,
    exit_layer: torch.Tensor,
    exit_chosen: torch.Tensor,
    min_layer: int = 1,
    every: int = 1,
) -> torch.Tensor:
    """log pi(tau) of each row: sum_{min_layer<=l<t} log(1 - p_l) + log p_t, with p_l = sigmoid(logits[:, l-1]).

    logits: [N, L] exit logits (entries after the exit are ignored); exit_layer: [N] t in 1..L;
    exit_chosen: [N] bool, False for a row the env forced out at L after the policy said CONTINUE:
    such a row adds log(1 - p_L) instead of log p_L. Layers below ``min_layer``, and those between its
    probes (every ``every``-th from ``min_layer``), continue whatever the policy says, so they are no
    decision of the policy and add nothing.
    """
    layers = torch.arange(1, logits.shape[1] + 1, device=logits.device)[None, :]
    exit_layer = exit_layer.to(logits.device)[:, None]
    log_continue, log_exit = F.logsigmoid(-logits), F.logsigmoid(logits)
    at_exit = torch.where(exit_chosen.to(logits.device)[:, None].bool(), log_exit, log_continue)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    before = torch.where(
        (layers < exit_layer) & decides_at(layers, min_layer, every), log_continue, zero
    ).sum(1)
    return before + torch.where(layers == exit_layer, at_exit, zero).sum(1)


def group_baseline(rewards: torch.Tensor, replicas: int) -> torch.Tensor:
    """b(x) for each row: the mean reward of the ``replicas`` consecutive rows of the same input."""
    return rewards.view(-1, replicas).mean(1).repeat_interleave(replicas)


@dataclass
class _Trajectories:
    """What :meth:`Reinforce.joint_loss` reads of a rollout (stage 3 passes its own)."""

    policy_logits: torch.Tensor  # [N, L]
    exit_layer: torch.Tensor  # [N]
    exit_chosen: torch.Tensor  # [N]


@dataclass
class Rollout:
    """What one training rollout returns, one row per (input, replica)."""

    logits: torch.Tensor  # [N, L] exit logits with their graph (zeros after the exit)
    exit_layer: np.ndarray  # [N] 1..L
    exit_chosen: np.ndarray  # [N] bool, False when forced out at L
    rewards: np.ndarray  # [N]
    correct: np.ndarray  # [N] bool


# -- the policy ---------------------------------------------------------------------------------------
class Reinforce(NetworkWeights, ExitPolicy):
    """ConsistentEE's per-layer policies trained by REINFORCE (see the module docstring).

    Args:
        hidden_size: width of each per-layer network (32 in the paper).
        dropout: dropout on the policy's input state in training, ``"threshold"`` rollouts only.
        rollout: ``"sample"`` (Bernoulli actions, the default) or ``"threshold"`` (p > 0.5 + dropout).
        seed: seeds the weights' initialisation, the shuffles, the samples and the dropout masks.
        state_size, num_layers: the network's shape; taken from the env on ``learn``/``bind`` when None.
        obs_mode: ``"state+layer"`` (the paper: each layer's network reads s_l) or
            ``"state+confidence"`` (s_l and what exit l's head says, ``ee_gym.envs.observations``).
        min_layer: no exit before this layer (1: none forbidden). Below it the policy continues
            whatever its network says, in training and in ``act``; a guard for decoders, where a shallow
            exit's propagated keys and values derail later tokens (``benchmarks/results/xsum-finetuned-heads``).
        every: decide only at layers min_layer, min_layer + every, ... (1: each layer from min_layer),
            continuing in between, in training and in ``act`` alike: a decoder then pays for one
            decision per ``every`` layers (``benchmarks/results/xsum``).
    """

    weights_file: ClassVar[str] = WEIGHTS_FILE
    network_word: ClassVar[str] = "network"

    name: ClassVar[str] = "reinforce"
    # the search a comparison runs on its validation slice (benchmarks.tuning): the defaults take 2
    # epochs, few updates on a small policy split; longer, faster, wider, or with the top-2 gap
    candidates: ClassVar[tuple[tuple[dict, dict], ...]] = (
        ({}, {}),
        ({}, {"epochs": 10}),
        ({}, {"epochs": 30}),
        ({}, {"epochs": 10, "learning_rate": 1e-3}),
        ({"hidden_size": 128}, {"epochs": 10}),
        ({"obs_mode": "state+confidence"}, {"epochs": 10}),
        ({}, {"epochs": 10, "loss_weights": "balanced"}),  # for class-balanced metrics (CoLA's Matthews)
    )
    obs_mode: str = "state+layer"
    learns: ClassVar[bool] = True
    trains_jointly: ClassVar[bool] = True
    sweeps_threshold: ClassVar[bool] = True
    default_threshold: ClassVar[float] = 0.5  # the paper's p_l > 0.5
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __init__(
        self,
        hidden_size: int = 32,
        dropout: float = 0.1,
        rollout: str = "sample",
        seed: int = 0,
        state_size: int | None = None,
        num_layers: int | None = None,
        obs_mode: str = "state+layer",
        min_layer: int = 1,
        every: int = 1,
    ):
        check_rollout(rollout)
        kind = OBS_MODE_REGISTRY.get(obs_mode) if isinstance(obs_mode, str) else None
        if kind is None or not kind.has_layer_one_hot:  # per-layer networks read the layer one-hot
            raise ConfigError(
                f"REINFORCE reads obs_mode {' or '.join(LAYER_ONE_HOT_MODES)}, not {obs_mode!r}"
            )
        min_layer = check_int("min_layer", min_layer)
        if min_layer < 1:
            raise ConfigError(
                f"min_layer must be 1 or more (1: exits allowed from the first layer), got {min_layer}"
            )
        every = check_int("every", every, minimum=1)
        hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        # dropout 1 drops every input (and divides by 1 - p = 0): the loss would be NaN
        dropout = check_float("dropout", dropout, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        seed = check_int("seed", seed, minimum=0)
        state_size = check_optional_int("state_size", state_size, minimum=1)
        num_layers = check_optional_int("num_layers", num_layers, minimum=1)
        self.obs_mode, self.min_layer, self.every = obs_mode, min_layer, every
        self.hidden_size, self.dropout, self.rollout, self.seed = hidden_size, dropout, rollout, seed
        self.net: PerLayerPolicy | None = None
        #: one record per training epoch: mean_reward, mean_exit_layer, accuracy, loss, seconds
        self.history: list[dict[str, float]] = []
        self._seed(seed)
        if state_size is not None and num_layers is not None:
            self._build(state_size, num_layers)

    # -- seeding, in one place ------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        """Seed every random draw of this policy without touching torch's or numpy's global state."""
        self._np_rng = np.random.default_rng(seed)
        self._torch_rng = torch.Generator().manual_seed(seed)
        self._init_seed = seed

    def _build(self, state_size: int, num_layers: int) -> None:
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global generator
            torch.manual_seed(self._init_seed)
            self.net = PerLayerPolicy(int(state_size), int(num_layers), self.hidden_size)

    def _ensure_network(self, table: ExitTable) -> PerLayerPolicy:
        if self.min_layer > table.num_layers:
            raise ValueError(
                f"min_layer {self.min_layer} is beyond the env's last layer ({table.num_layers})"
            )
        return super()._ensure_network(table)

    # -- acting -----------------------------------------------------------------------------------
    def exit_probs(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_l, l) for a batch of observations of this policy's ``obs_mode``."""
        if self.net is None:
            raise RuntimeError("the policy has no network yet: call learn(env), bind(env) or load it")
        obs = np.asarray(obs, dtype=np.float32).reshape(-1, self.net.state_size + self.net.num_layers)
        layers = obs[:, self.net.state_size :].argmax(1) + 1
        if len(layers) and (layers == layers[0]).all():  # one layer (decoding): the numpy path
            logits = self.net.numpy_logits(obs[:, : self.net.state_size], int(layers[0]))
            return special.expit(logits).astype(np.float32), layers
        with torch.no_grad():
            logits = self.net(torch.from_numpy(obs[:, : self.net.state_size]), torch.from_numpy(layers))
        return torch.sigmoid(logits).numpy(), layers

    def exit_scores(self, obs: Any) -> np.ndarray:
        """p_l of each row: deterministic ``act`` exits where it exceeds ``threshold_in_force``."""
        return self.exit_probs(obs)[0].astype(np.float64)

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """EXIT where p_l > the threshold in force (0.5 unless ``with_threshold``), or a Bernoulli(p_l)
        draw when not ``deterministic``; only at the layers it probes (``min_layer`` on, every
        ``every``-th), always at the last layer."""
        probs, layers = self.exit_probs(obs)
        if deterministic:
            exits = probs > self.threshold_in_force
        else:
            exits = torch.bernoulli(torch.from_numpy(probs), generator=self._torch_rng).numpy() > 0
        exits &= decides_at(layers, self.min_layer, self.every)
        return (exits | (layers == self.net.num_layers)).astype(np.int64)

    def exits_at_layer(self, features: np.ndarray, layer: int) -> np.ndarray:
        """Deterministic ``act`` of B rows that are all at ``layer``, from their features [B, F] (the
        observation without its layer one-hot, which only picks the layer's network): the same
        decisions, bool [B], without building the observation. A decoder asks after every layer of
        every token, so a decision should cost a few numpy calls (``ee_gym.generation.PolicyExit``)."""
        if self.net is None:
            raise RuntimeError("the policy has no network yet: call learn(env), bind(env) or load it")
        rows = len(features)
        if layer >= self.net.num_layers:
            return np.ones(rows, dtype=bool)
        if not decides_at(layer, self.min_layer, self.every):
            return np.zeros(rows, dtype=bool)
        logits, threshold = self.net.numpy_logits(features, layer), self.threshold_in_force
        if 0.0 < threshold < 1.0:  # p > t where logit > logit(t): no sigmoid (equal but at float rounding)
            return logits > math.log(threshold / (1.0 - threshold))
        return special.expit(logits).astype(np.float32) > threshold  # as act compares them

    # -- learning ---------------------------------------------------------------------------------
    def fit(self, env: Any, budget: TrainingBudget) -> None:
        """Train on the table, reward and alpha of ``env`` (any env with ``table``, ``reward_fn``, ``alpha``).

        ``budget`` (:class:`~ee_gym.policy.TrainingBudget`): ``epochs`` (2), ``batch_size`` (32),
        ``replicas`` (8), ``learning_rate`` (3e-4), ``rollout`` and ``seed`` (the constructor's),
        ``progress`` (True), ``loss_weights`` (None; ``"balanced"`` pays each input's loss times
        N / (K n_y)); a given seed re-seeds the policy's random draws (not its weights, which
        are initialised once). ``total_timesteps`` is not read.
        """
        rollout = check_rollout(budget.get("rollout", self.rollout))
        epochs, batch_size = budget.get("epochs", 2), budget.get("batch_size", 32)
        replicas, lr = budget.get("replicas", 8), budget.get("learning_rate", 3e-4)
        if budget.seed is not None:
            self._seed(budget.seed)
        table: ExitTable = getattr(env, "table", None)
        if table is None:
            raise ValueError("REINFORCE trains on a cached table: the env has none (live mode?)")
        self._learned_on(env, fresh=self.net is None)  # records (L, d, K), or checks a trained net's
        if budget.get("loss_weights", None) == "balanced":  # every class weighs the same in the reward
            table = table.class_balanced()
        net = self._ensure_network(table)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        envs: dict[int, ConsistentEEVectorEnv] = {}  # one vector env per batch size (the last is short)
        n = table.num_inputs
        progress = budget.get("progress", True)
        bar = tqdm(total=epochs * math.ceil(n / batch_size), desc="reinforce", disable=not progress)
        scalars = ScalarLog(budget.get("tensorboard_log", None), "reinforce")
        for epoch in range(epochs):
            start_time, totals = time.perf_counter(), np.zeros(5)  # reward, layer, correct, loss, rows
            exits = []  # the epoch's exit layers, for the histogram
            order = self._np_rng.permutation(n)
            for start in range(0, n, batch_size):
                inputs = order[start : start + batch_size]
                rows = len(inputs) * replicas
                if rows not in envs:
                    envs[rows] = self._training_env(env, table, rows)
                out = self._rollout(envs[rows], np.repeat(inputs, replicas), rollout)
                rewards = torch.as_tensor(out.rewards, dtype=torch.float32)
                loss = self.joint_loss(
                    _Trajectories(
                        out.logits, torch.from_numpy(out.exit_layer), torch.from_numpy(out.exit_chosen)
                    ),
                    rewards,
                    replicas,
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                exits.append(out.exit_layer)
                totals += (
                    out.rewards.sum(),
                    out.exit_layer.sum(),
                    out.correct.sum(),
                    loss.item() * rows,
                    rows,
                )
                bar.update(1)
                bar.set_postfix(
                    epoch=epoch + 1, reward=f"{out.rewards.mean():.3f}", layer=f"{out.exit_layer.mean():.2f}"
                )
            reward, layer, correct, loss_sum, count = totals
            self.history.append(
                {
                    "epoch": len(self.history) + 1,
                    "rollout": rollout,
                    "mean_reward": reward / count,
                    "mean_exit_layer": layer / count,
                    "accuracy": correct / count,
                    "loss": loss_sum / count,
                    "seconds": time.perf_counter() - start_time,
                }
            )
            scalars.scalars(self.history[-1], self.history[-1]["epoch"])
            scalars.exit_histogram(np.concatenate(exits), table.num_layers, self.history[-1]["epoch"])
        bar.close()
        scalars.close()

    # -- the decisions and the loss, shared by stage 2 (tables) and stage 3 (the live model) --------
    def _exits(
        self, replicas: int, rollout: str, generator: torch.Generator, dropout: float, **live: Any
    ) -> NetworkExits:
        """The one place this policy decides exits in training: its network, min_layer and every."""
        return NetworkExits(
            self.net,
            replicas,
            rollout,
            generator,
            self.min_layer,
            dropout if rollout == "threshold" else 0.0,
            every=self.every,
            **live,
        )

    def joint_module(self, model: Any) -> PerLayerPolicy:
        """The per-layer networks, built for ``model``'s sizes (or checked against them): stage 3
        trains them with the model."""
        self.bind(model_env_stand_in(model))
        return self.net

    def joint_decider(
        self,
        model: Any,
        replicas: int = 1,
        generator: torch.Generator | None = None,
        rollout: str | None = None,
    ) -> NetworkExits:
        """Stage 3's decider: ``replicas`` trajectories per input on the live model, reading what
        the network reads on tables (s_l, and exit l's confidence in ``state+confidence``, built by
        the envs' own encoder), with no exit below ``min_layer``. No input dropout: in stage 3 the
        backbone's dropout makes separate replicas differ."""
        self.joint_module(model)
        encoder = ObservationEncoder(self.obs_mode, model.num_layers, model.hidden_size, model.num_labels)
        if encoder.uses_confidence:
            size = encoder.feature_size

            def features(view: Any) -> torch.Tensor:
                states = view.states.detach().float().cpu().numpy()
                obs = encoder.from_outputs(states, view.history)[:, :size]
                return torch.from_numpy(obs).to(view.states.device)

            live = {"features": features, "reads_history": True}
        else:
            live = {}
        return self._exits(replicas, check_rollout(rollout or self.rollout), generator, 0.0, **live)

    def joint_loss(self, rollout: Any, rewards: torch.Tensor, group: int) -> torch.Tensor:
        """-mean (R - b(x)) log pi(tau), b(x) the mean reward of the ``group`` trajectories of an
        input; the loss of stage 2 and of stage 3 alike."""
        logits = rollout.policy_logits
        advantage = rewards.to(logits.device) - group_baseline(rewards.to(logits.device), group)
        log_prob = trajectory_log_prob(
            logits, rollout.exit_layer, rollout.exit_chosen, self.min_layer, self.every
        )
        return -(advantage * log_prob).mean()

    def _training_env(self, env: Any, table: ExitTable, num_envs: int) -> ConsistentEEVectorEnv:
        """A vector env over ``env``'s table with ``env``'s reward function and alpha."""
        train_env = ConsistentEEVectorEnv(
            num_envs, table=table, split=table.split, obs_mode=self.obs_mode, alpha=env.alpha, final_obs=False
        )
        train_env.reward_fn = env.reward_fn  # the env's own reward, named or custom
        train_env.reset(seed=int(self._np_rng.integers(2**31)))  # seeds its (ignored) autoreset draws
        return train_env

    def _rollout(self, env: ConsistentEEVectorEnv, index: np.ndarray, rollout: str) -> Rollout:
        """Play every row of ``env`` from ``index`` until its first exit; keep the exit logits' graph."""
        net = self.net
        n, num_layers, d = len(index), env.num_layers, net.state_size
        exits = self._exits(1, rollout, self._torch_rng, self.dropout)
        obs, _ = env.reset(options={"index": index})
        active = np.ones(n, dtype=bool)
        exit_layer, exit_chosen = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
        rewards, correct = np.zeros(n), np.zeros(n, dtype=bool)
        columns = []
        for layer in range(1, num_layers + 1):
            rows = np.flatnonzero(active)
            chosen, logits = exits.decide(layer, torch.from_numpy(obs[rows, :d]))
            actions = np.zeros(n, dtype=np.int64)  # rows already out act on ignored new episodes
            actions[rows] = chosen[:, 0].numpy()
            column = torch.zeros(n)
            columns.append(column if logits is None else column.index_put((torch.from_numpy(rows),), logits))
            obs, reward, exited, _, info = env.step(actions)
            newly = exited & active
            if newly.any():  # info holds "final_info" only on steps where some row exited
                final = info["final_info"]
                exit_layer[newly], correct[newly] = final["exit_layer"][newly], final["correct"][newly]
                rewards[newly], exit_chosen[newly] = reward[newly], actions[newly] == 1
            active &= ~exited
            if not active.any():
                break
        columns += [torch.zeros(n)] * (num_layers - len(columns))
        return Rollout(torch.stack(columns, 1), exit_layer, exit_chosen, rewards, correct)

    # -- persistence ------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "dropout": self.dropout,
            "rollout": self.rollout,
            "seed": self.seed,
            "state_size": None if self.net is None else self.net.state_size,
            "num_layers": None if self.net is None else self.net.num_layers,
            "obs_mode": self.obs_mode,
            "min_layer": self.min_layer,
            "every": self.every,
        }

    def _check_loaded_shapes(self, shapes: dict[str, Any]) -> str | None:
        problem = super()._check_loaded_shapes(shapes)
        encoder = ObservationEncoder(
            self.obs_mode, shapes["num_layers"], shapes["hidden_size"], shapes["num_labels"]
        )
        if problem is None and (self.net.state_size, self.net.num_layers) != (
            encoder.feature_size,
            shapes["num_layers"],
        ):
            problem = (
                f"the network reads {self.net.state_size} inputs at {self.net.num_layers} layers, the shapes "
                f"record {encoder.feature_size} ({self.obs_mode}, d={shapes['hidden_size']}) at "
                f"{shapes['num_layers']} layers"
            )
        return problem
