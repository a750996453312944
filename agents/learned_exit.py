"""``learned-exit``: BERxiT's learning-to-exit module (Xin et al., EACL 2021), the supervised learned baseline.

BERxiT trains a small predictor of "is exit l's prediction right?" and exits at the first layer whose
predicted correctness passes a threshold. It needs no reward, no layer price and no exploration: it is
the learned baseline an RL exit policy (ConsistentEE's REINFORCE, PPO, ...) should beat, and it is
rule-like in that its accuracy / speed-up curve comes from sweeping one threshold (:meth:`sweep`)
over one trained predictor, as a confidence rule's does.

The predictor, c(s_l, l) = sigmoid(w . s_l + b_l): **one linear layer + sigmoid shared across
layers**, reading the ``state+layer`` observation [s_l, one-hot(l)], so the one-hot gives each layer
its own bias b_l and the weights on s_l are shared. BERxiT's LTE module is shared across layers too;
we keep the shared variant because (a) a per-layer predictor sees only N rows per layer (249 inputs on
RTE's held-out split) and d + 1 weights each, which overfits where the shared one sees N * L rows,
and (b) the pooled states of consecutive layers live in similar spaces, which is what lets one
linear map read them all. The one-hot adds what the shared weights cannot: that later heads are
right more often.

Training (:meth:`LearnedExit.fit`): binary cross-entropy against ``table.correct`` over every
(input, layer) pair of the env's table (the policy split), Adam on seeded mini-batches of inputs
(all L layers of each), vectorised. The env's reward and alpha are not read: what is learned does
not depend on a layer price, the threshold alone sets the trade-off.

Acting: EXIT at layer l when c(s_l, l) >= ``threshold`` (0.5 by default: "more likely right than
not", the natural reading of a probability), and at the last layer whatever it says. The decision
is deterministic; ``deterministic=False`` gives the same answer (there is nothing to sample).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agents.weights import HISTORY_FILE, NetworkWeights  # noqa: F401 (HISTORY_FILE: re-exported)
from ee_gym.envs import ExitTable, ObservationEncoder
from ee_gym.observations import LAYER_ONE_HOT_MODES
from ee_gym.policy import ExitPolicy, TrainingBudget
from ee_gym.validation import ConfigError, check_choice, check_float, check_int, check_optional_int

WEIGHTS_FILE = "learned_exit.safetensors"
#: the default training length: at least this many epochs, and at least this many Adam updates
MIN_EPOCHS, MIN_UPDATES = 10, 500
#: the thresholds :meth:`LearnedExit.sweep` visits, earliest exits first (a low bar exits early);
#: dense near both ends, where a weak model's predicted correctness sits on hard tasks
THRESHOLDS = (
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.45,
    0.5,
    0.55,
    0.6,
    0.65,
    0.7,
    0.75,
    0.8,
    0.85,
    0.9,
    0.95,
    0.98,
    0.99,
)


class CorrectnessPredictor(nn.Module):
    """c(s_l, l) = sigmoid(w . s_l + b_l): one linear layer over [features of s_l, one-hot(l)].

    ``forward`` takes the observation rows themselves; :meth:`table_logits` computes the same logits
    from a table's states and layer numbers without building the one-hot rows.
    """

    def __init__(self, state_size: int, num_layers: int):
        super().__init__()
        self.state_size, self.num_layers = state_size, num_layers
        self.linear = nn.Linear(state_size + num_layers, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Correctness logits [B] of observations [B, state_size + num_layers]."""
        return self.linear(obs).squeeze(-1)


def check_threshold(value: Any) -> float:
    """A predicted-correctness threshold in [0, 1], else ConfigError (outside it, it always or never exits)."""
    try:
        return check_float("learned-exit threshold", value, minimum=0.0, maximum=1.0)
    except ConfigError as error:
        raise ConfigError(f"{error}: it is compared with a predicted probability of being right") from None


class LearnedExit(NetworkWeights, ExitPolicy):
    """BERxiT's learning-to-exit predictor (see the module docstring).

    Args:
        threshold: exit once the predicted correctness reaches it (0.5).
        seed: seeds the weights' initialisation and the mini-batch shuffles.
        state_size, num_layers: the predictor's shape; taken from the env on ``learn``/``bind`` when None.
        obs_mode: a mode with the layer one-hot (``"state+layer"``, the default, BERxiT's input; or
            ``"state+confidence"``, which adds exit l's top-2 gap to what the linear layer reads).
    """

    weights_file: ClassVar[str] = WEIGHTS_FILE
    network_word: ClassVar[str] = "predictor"

    name: ClassVar[str] = "learned-exit"
    obs_mode: str = "state+layer"
    learns: ClassVar[bool] = True
    priced: ClassVar[bool] = False  # the reward and alpha are not read: the threshold sets the trade-off
    candidates: ClassVar[tuple[tuple[dict, dict], ...]] = (
        ({}, {}),
        ({"obs_mode": "state+confidence"}, {}),
        ({}, {"epochs": 50}),
    )
    # the core's threshold sweep (ee_gym.evaluation.evaluate_sweep) reads the predicted correctness
    sweeps_threshold: ClassVar[bool] = True
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __init__(
        self,
        threshold: float = 0.5,
        seed: int = 0,
        state_size: int | None = None,
        num_layers: int | None = None,
        obs_mode: str = "state+layer",
    ):
        self.threshold = check_threshold(threshold)
        self.default_threshold = self.threshold  # the protocol's name for this policy's own rule
        self.seed = check_int("seed", seed, minimum=0)
        self.obs_mode = check_choice("learned-exit obs_mode", obs_mode, LAYER_ONE_HOT_MODES)
        state_size = check_optional_int("state_size", state_size, minimum=1)
        num_layers = check_optional_int("num_layers", num_layers, minimum=1)
        self.net: CorrectnessPredictor | None = None
        #: one record per training epoch: loss, accuracy (of the correctness predictions), seconds
        self.history: list[dict[str, float]] = []
        self._seed(seed)
        if state_size is not None and num_layers is not None:
            self._build(state_size, num_layers)

    @classmethod
    def sweep(cls, num_layers: int = 12, num_labels: int = 2) -> list[dict[str, Any]]:
        """Keyword arguments tracing the accuracy / speed-up curve, earliest exits first.

        Only the threshold changes, and it is read by ``act`` alone: one trained predictor serves
        every point (:meth:`with_threshold`), so a sweep costs one ``learn``."""
        return [{"threshold": t} for t in THRESHOLDS]

    def with_threshold(self, threshold: float | None) -> LearnedExit:
        """This trained predictor exiting at another threshold (the weights are shared, not copied);
        the protocol's :meth:`~ee_gym.policy.ExitPolicy.with_threshold`, with the threshold kept in
        [0, 1] and as the copy's own ``threshold`` (so its saved params say it)."""
        other = copy.copy(self)
        if threshold is not None:
            other.threshold = other.default_threshold = check_threshold(threshold)
        other.exit_threshold = None
        return other

    def exit_scores(self, obs: Any) -> np.ndarray:
        """The predicted correctness c_l of each row: what ``act`` compares with the threshold."""
        return self.exit_probs(obs)[0].astype(np.float64).reshape(-1)

    # -- building ---------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        """Seed every random draw of this policy without touching torch's or numpy's global state."""
        self._torch_rng = torch.Generator().manual_seed(seed)
        self._init_seed = seed

    def _build(self, state_size: int, num_layers: int) -> None:
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global generator
            torch.manual_seed(self._init_seed)
            self.net = CorrectnessPredictor(int(state_size), int(num_layers))

    def _encoder(self, table: ExitTable) -> ObservationEncoder:
        return ObservationEncoder(self.obs_mode, table.num_layers, table.hidden_size, table.num_labels)

    # -- acting -----------------------------------------------------------------------------------
    def exit_probs(self, obs: Any) -> tuple[np.ndarray, np.ndarray]:
        """(c_l, l): the predicted correctness and the layer (1-based) of a batch of observations.

        Named as :meth:`agents.reinforce.Reinforce.exit_probs`, so that a threshold sweep reads both
        learners alike: both exit at the first layer whose number passes the threshold."""
        if self.net is None:
            raise RuntimeError("the policy has no predictor yet: call learn(env), bind(env) or load it")
        width = self.net.state_size + self.net.num_layers
        obs = np.asarray(obs, dtype=np.float32).reshape(-1, width)
        with torch.no_grad():
            probs = torch.sigmoid(self.net(torch.from_numpy(obs))).numpy()
        return probs, obs[:, self.net.state_size :].argmax(1) + 1

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        obs = np.asarray(obs)
        probs, layers = self.exit_probs(obs)
        exits = (probs >= self.threshold_in_force) | (layers == self.net.num_layers)
        return exits.astype(np.int64).reshape(obs.shape[:-1])

    # -- learning ---------------------------------------------------------------------------------
    def fit(self, env: Any, budget: TrainingBudget) -> None:
        """Fit the predictor to ``env.table.correct`` by binary cross-entropy over every (input, layer).

        ``budget``: ``epochs`` (at least :data:`MIN_EPOCHS`, and as many more as make
        :data:`MIN_UPDATES` Adam steps: a fixed epoch count would give RTE's 249 policy inputs one
        step an epoch), ``batch_size`` (256 inputs, each with its L layers), ``learning_rate``
        (1e-2, Adam), ``seed`` (re-seeds the shuffles, not the initial weights). ``progress``,
        ``replicas``, ``rollout`` and ``total_timesteps`` are not read, nor the env's reward and
        alpha (see the module docstring).
        """
        table: ExitTable | None = getattr(env, "table", None)
        if table is None:
            raise ValueError("learned-exit trains on a cached table: the env has none (live mode?)")
        batch_size, lr = budget.get("batch_size", 256), budget.get("learning_rate", 1e-2)
        steps_per_epoch = math.ceil(table.num_inputs / batch_size)
        epochs = budget.get("epochs", max(MIN_EPOCHS, math.ceil(MIN_UPDATES / steps_per_epoch)))
        if budget.seed is not None:
            self._seed(budget.seed)
        self._learned_on(env, fresh=self.net is None)  # records (L, d, K), or checks a trained net's
        net = self._ensure_network(table)
        encoder = self._encoder(table)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        n, num_layers = table.num_inputs, table.num_layers
        targets = torch.from_numpy(table.correct.astype(np.float32))  # [N, L]
        layer_of_row = np.tile(np.arange(1, num_layers + 1), batch_size)
        buffer = encoder.allocate(batch_size * num_layers)
        for _ in range(epochs):
            began, loss_sum, right = time.perf_counter(), 0.0, 0.0
            order = torch.randperm(n, generator=self._torch_rng).numpy()
            for start in range(0, n, batch_size):
                inputs = order[start : start + batch_size]
                rows = len(inputs) * num_layers
                encoder.batch(table, np.repeat(inputs, num_layers), layer_of_row[:rows], buffer[:rows])
                logits = net(torch.from_numpy(buffer[:rows]))
                target = targets[inputs].reshape(-1)
                loss = F.binary_cross_entropy_with_logits(logits, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * rows
                right += ((logits.detach() >= 0) == (target > 0.5)).sum().item()
            count = n * num_layers
            self.history.append(
                {
                    "epoch": len(self.history) + 1,
                    "loss": loss_sum / count,
                    "accuracy": right / count,
                    "seconds": time.perf_counter() - began,
                }
            )

    # -- persistence ------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "seed": self.seed,
            "state_size": None if self.net is None else self.net.state_size,
            "num_layers": None if self.net is None else self.net.num_layers,
            "obs_mode": self.obs_mode,
        }

    def _check_loaded_shapes(self, shapes: dict[str, Any]) -> str | None:
        problem = super()._check_loaded_shapes(shapes)
        encoder = ObservationEncoder(
            self.obs_mode, shapes["num_layers"], shapes["hidden_size"], shapes["num_labels"]
        )
        expected = (encoder.feature_size, shapes["num_layers"])
        if problem is None and (self.net.state_size, self.net.num_layers) != expected:
            problem = (
                f"the predictor reads {self.net.state_size} inputs at {self.net.num_layers} layers, the "
                f"shapes record {expected[0]} ({self.obs_mode}, d={shapes['hidden_size']}) at "
                f"{expected[1]} layers"
            )
        return problem
