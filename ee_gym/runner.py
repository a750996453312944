"""One layer-by-layer runner for a live multi-exit model, and the deciders that drive it.

Batched inference (:mod:`ee_gym.inference`), stage 3's rollouts with gradients (:mod:`ee_gym.joint`)
and the policies held fixed in stage 3 all run a batch the same way, so it is written once here:
embed, then at each layer advance, pool, run the exit head, ask the decider which rows exit, record
each exit (layer, head logits, whether the policy chose it) and drop the rows that have left with
``MultiExitModel.select`` (which also trims padding no remaining row needs). A row still running at
layer L exits there. Before, inference, stage-3 learners and stage-3 held agents each had their own
copy of this loop, and REINFORCE's decisions were written once for the table and once for the live
model; a setting honoured in one (``min_layer``) was missing in the other.

A decider (:class:`Decider`) answers ``replicas`` trajectories per row: stage 3 gives each input K
trajectories that share one forward pass (they differ by their exit draws only, so the model runs
once per input, up to the last of its replicas' exits). Two deciders cover every policy:

* :class:`ActingExits`: any policy's ``act`` on the observation its envs would give (built by
  :meth:`ObservationEncoder.from_outputs`, as the envs build it row by row); inference, and every
  policy held fixed in stage 3.
* :class:`NetworkExits`: a per-layer exit network ``net(features, layers) -> logits`` with Bernoulli
  draws (``"sample"``) or the authors' p > 0.5 (``"threshold"``), no exit below ``min_layer``; the
  REINFORCE policy uses its :meth:`NetworkExits.decide` for its table rollouts (stage 2) and the
  whole decider live (stage 3), so both stages decide in one place.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ee_gym.multiexit import MultiExitModel
from ee_gym.observations import ObservationEncoder
from ee_gym.policy import ROLLOUTS, decides_at

__all__ = [
    "ActingExits",
    "Decider",
    "LayerRun",
    "LayerView",
    "NetworkExits",
    "model_env_stand_in",
    "run_layers",
]


@dataclass
class LayerView:
    """What a decider sees at one layer, for the rows still in the batch."""

    layer: int  # 1..L
    states: torch.Tensor  # [b, d] pooled s_l, with its graph when gradients are on
    logits: torch.Tensor  # [b, K] exit l's head logits
    history: np.ndarray | None  # [b, l, K] head logits of layers 1..l; only for deciders that read them


class Decider(Protocol):
    """Who decides the exits: ``replicas`` trajectories per row."""

    replicas: int
    #: True: the runner copies every layer's head logits to the CPU for :attr:`LayerView.history`
    reads_history: bool

    def __call__(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exit flags [b, replicas] bool, the policy's exit logits [b] with their graph, or None)."""


@dataclass
class LayerRun:
    """One row per (input, replica), replica-minor: row i * K + k is replica k of input i."""

    exit_layer: torch.Tensor  # [N] int64, 1..L
    exit_chosen: torch.Tensor  # [N] bool, False when forced out at L (or for full depth)
    exit_logits: torch.Tensor  # [N, K] the head logits at each trajectory's exit, with their graph
    policy_logits: torch.Tensor | None  # [N, L] the decider's exit logits (0 where none), or None
    replicas: int = 1


def run_layers(
    model: MultiExitModel, batch: dict[str, torch.Tensor], decide: Decider | None = None
) -> LayerRun:
    """Run ``batch`` (model inputs) layer by layer until every trajectory has exited.

    ``decide`` None: full depth, every row to layer L (only the last head runs). Gradients flow as
    the caller's mode says (``torch.inference_mode`` for inference): the exit logits carry the graph
    of the layers each row ran, and nothing above its exit runs for it.
    """
    n, num_layers, device = batch["input_ids"].shape[0], model.num_layers, model.device
    k = 1 if decide is None else decide.replicas
    state = model.start(**batch)
    alive = torch.arange(n, device=device)  # original row of each row still in the batch
    running = torch.ones(n, k, dtype=torch.bool, device=device)  # trajectories not yet exited
    exit_layer = torch.zeros(n, k, dtype=torch.long, device=device)
    exit_chosen = torch.zeros(n, k, dtype=torch.bool, device=device)
    exit_logits = None
    # head logits of layers 1..l, copied to the CPU only for deciders that read them (a per-layer
    # device-to-host copy the REINFORCE networks do not need)
    reads = decide is not None and decide.reads_history
    history = np.zeros((n, num_layers, model.num_labels), dtype=np.float32) if reads else None
    columns: list[torch.Tensor | None] = []
    for layer in range(1, num_layers + 1):
        state = model.advance(state)
        last = layer == num_layers
        if decide is None and not last:
            continue  # full depth needs only the last head
        out = model.exit_outputs(state)  # pool, then exit l's head
        states, head_logits = out.states, out.logits
        if exit_logits is None:
            exit_logits = torch.zeros(n, k, model.num_labels, dtype=head_logits.dtype, device=device)
        if history is not None:
            history[:, layer - 1] = head_logits.detach().float().cpu().numpy()
        if decide is None:
            chosen, policy_logits = torch.zeros(len(alive), k, dtype=torch.bool, device=device), None
        else:
            view = LayerView(layer, states, head_logits, None if history is None else history[:, :layer])
            chosen, policy_logits = decide(view)
            chosen = torch.as_tensor(chosen, device=device).reshape(len(alive), k).bool()
        columns.append(
            None
            if policy_logits is None
            else torch.zeros(n, dtype=policy_logits.dtype, device=device).index_put((alive,), policy_logits)
        )
        leaving = running[alive] & (chosen | last)
        if leaving.any():
            row, replica = leaving.nonzero(as_tuple=True)
            rows = alive[row]
            exit_logits = exit_logits.index_put((rows, replica), head_logits[row])
            exit_layer[rows, replica] = layer
            exit_chosen[rows, replica] = chosen[row, replica]
            running[rows, replica] = False
        still = running[alive].any(1)
        if last or not still.any():
            break
        if not still.all():
            state = model.select(state, still)
            alive = alive[still]
            if history is not None:
                history = history[still.cpu().numpy()]
    policy_logits = None
    if any(column is not None for column in columns):
        columns += [None] * (num_layers - len(columns))
        zeros = torch.zeros(n, device=device)
        stacked = torch.stack([zeros if c is None else c for c in columns], 1)
        policy_logits = stacked.repeat_interleave(k, 0)
    return LayerRun(
        exit_layer.reshape(-1),
        exit_chosen.reshape(-1),
        exit_logits.reshape(n * k, -1),
        policy_logits,
        k,
    )


# -- the two deciders ---------------------------------------------------------------------------
class ActingExits:
    """Any policy's ``act`` on the observation its envs would give: inference, and policies held
    fixed in stage 3. ``encoder``: the observations of the policy's mode for the model's sizes."""

    replicas = 1
    reads_history = True  # observations are built from the head logits of layers 1..l

    def __init__(self, policy: Any, encoder: ObservationEncoder, deterministic: bool = True):
        self.policy, self.encoder, self.deterministic = policy, encoder, deterministic

    def __call__(self, view: LayerView) -> tuple[torch.Tensor, None]:
        states = view.states.detach().float().cpu().numpy() if self.encoder.uses_state else None
        obs = self.encoder.from_outputs(states, view.history)
        exits = np.asarray(self.policy.act(obs, deterministic=self.deterministic)).reshape(-1) == 1
        if len(exits) != len(view.states):
            raise ValueError(f"the policy answered {len(exits)} actions for {len(view.states)} rows")
        return torch.from_numpy(exits)[:, None], None


class NetworkExits:
    """A per-layer exit network ``net(features [b, f], layers [b]) -> exit logits [b]``, K trajectories.

    ``rollout="sample"``: each replica draws its own Bernoulli(p_l) from ``generator``;
    ``"threshold"``: all exit when p_l > 0.5, and ``dropout`` (the authors' source of exploration on
    a frozen table) masks the network's input. Below ``min_layer``, and between the layers it probes
    (every ``every``-th from ``min_layer``), no network runs and no row exits.
    ``features(view)``: what the network reads (default: the detached pooled state);
    ``reads_history``: whether ``features`` needs :attr:`LayerView.history`.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        replicas: int = 1,
        rollout: str = "sample",
        generator: torch.Generator | None = None,
        min_layer: int = 1,
        dropout: float = 0.0,
        features: Callable[[LayerView], torch.Tensor] | None = None,
        reads_history: bool = False,
        every: int = 1,
    ):
        if rollout not in ROLLOUTS:
            raise ValueError(f"unknown rollout {rollout!r}; choose one of {', '.join(ROLLOUTS)}")
        self.net, self.replicas, self.rollout, self.generator = net, replicas, rollout, generator
        self.min_layer, self.dropout, self.every = min_layer, dropout, every
        self.features = features or (lambda view: view.states)
        self.reads_history = reads_history

    def decide(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exit flags [b, replicas] bool, exit logits [b] with the network's graph) at ``layer``;
        where it decides nothing (below ``min_layer``, between probes): no exit and no logits (None)."""
        b = len(features)
        if not decides_at(layer, self.min_layer, self.every):  # every row continues, no network runs
            return torch.zeros(b, self.replicas, dtype=torch.bool, device=features.device), None
        features = features.detach()  # the policy's loss never reaches what it reads
        if self.rollout == "threshold" and self.dropout > 0:  # replicas differ only by dropout
            keep = torch.rand(features.shape, generator=self.generator) >= self.dropout
            features = features * keep.to(features.device) / (1.0 - self.dropout)
        logits = self.net(features, torch.full((b,), layer, device=features.device))
        probs = torch.sigmoid(logits.detach()).float().cpu()[:, None].expand(-1, self.replicas)
        if self.rollout == "sample":
            chosen = torch.bernoulli(probs.contiguous(), generator=self.generator) > 0
        else:
            chosen = probs > 0.5
        return chosen.to(features.device), logits

    def __call__(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.decide(view.layer, self.features(view))


def model_env_stand_in(model: MultiExitModel) -> types.SimpleNamespace:
    """What ``policy.bind`` reads from a vector env, for ``model``: its sizes, and nothing else.

    ``num_layers``, ``num_labels``, ``hidden_size`` at the top and under ``table`` (as on
    :class:`~ee_gym.envs.ConsistentEEVectorEnv` and its :class:`~ee_gym.envs.ExitTable`).
    """
    sizes = dict(num_layers=model.num_layers, num_labels=model.num_labels, hidden_size=model.hidden_size)
    return types.SimpleNamespace(**sizes, table=types.SimpleNamespace(**sizes))
