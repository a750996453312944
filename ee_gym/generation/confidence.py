"""A learned confidence probe: CALM's third confidence measure, a tiny classifier on the hidden state.

For every exit layer l < L, a logistic regression (``width=0``: d -> 1) or a small MLP (d -> width ->
1) reads the observation tanh(s_l / c) of the token env (the table's ``states``) and predicts whether
exit l's top-1 token is the full model's. It is trained with binary cross-entropy on a token table
(never the evaluation articles) and costs d (or d x width) multiply-adds per decision, against the
vocabulary x d of exit l's softmax: on SmolLM2-135M 576 against 28 million.

It serves two ways (:mod:`ee_gym.generation.policies`): as a rule, exit where the predicted
probability passes a threshold placed on the table (:class:`~ee_gym.generation.policies.ProbeExit`),
and as the confidence feature of the ``state+probe`` observation mode, so that ConsistentEE's
policy sees a confidence that is cheap to compute at deployment.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

PROBE_CONFIG = "confidence_probe.json"
PROBE_WEIGHTS = "confidence_probe.safetensors"


@dataclass
class ProbeTraining:
    """How a probe is fitted on a token table."""

    width: int = 0  # 0: logistic regression per layer; else a hidden layer of this width
    epochs: int = 20
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    seed: int = 0


class ConfidenceProbe(nn.Module):
    """Per-layer P(exit l's top-1 is the full model's token | tanh(s_l / c)), layers 1..L-1."""

    def __init__(self, num_layers: int, hidden_size: int, width: int = 0):
        super().__init__()
        self.num_layers, self.hidden_size, self.width = int(num_layers), int(hidden_size), int(width)
        exits = self.num_layers - 1  # layer L always exits: nothing to predict there
        if self.width:
            self.w1 = nn.Parameter(torch.randn(exits, hidden_size, width) / hidden_size**0.5)
            self.b1 = nn.Parameter(torch.zeros(exits, width))
            self.w2 = nn.Parameter(torch.zeros(exits, width))
        else:
            self.w2 = nn.Parameter(torch.zeros(exits, hidden_size))
        self.b2 = nn.Parameter(torch.zeros(exits))

    def layer_logits(self, observations: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits [B] of exit ``layer`` (1..L-1) for observations [B, d]."""
        if not 1 <= layer < self.num_layers:
            raise IndexError(f"a probe predicts exits 1..{self.num_layers - 1}, not {layer}")
        i = layer - 1
        x = observations.float()
        if self.width:
            x = torch.relu(x @ self.w1[i] + self.b1[i])
        return x @ self.w2[i] + self.b2[i]

    @torch.no_grad()
    def scores(self, observations: torch.Tensor, layer: int) -> torch.Tensor:
        """Predicted probabilities [B] that exit ``layer`` is right (1.0 at layer L, which always exits)."""
        if layer == self.num_layers:
            return torch.ones(observations.shape[0])
        return torch.sigmoid(self.layer_logits(observations, layer))

    def numpy_scores(self, observations: np.ndarray, layer: int) -> np.ndarray:
        """:meth:`scores` in numpy for observations [B, d] float32: the live decision's path, where a
        handful of torch calls per layer would cost more than the d multiply-adds themselves."""
        if layer == self.num_layers:
            return np.ones(observations.shape[0], dtype=np.float32)
        if not 1 <= layer < self.num_layers:
            raise IndexError(f"a probe predicts exits 1..{self.num_layers - 1}, not {layer}")
        weights, i = self._numpy_weights(), layer - 1
        x = observations
        if self.width:
            x = np.maximum(x @ weights["w1"][i] + weights["b1"][i], np.float32(0))
        logits = x @ weights["w2"][i] + weights["b2"][i]
        return np.float32(1) / (np.float32(1) + np.exp(-logits))

    def _numpy_weights(self) -> dict[str, np.ndarray]:
        """The parameters as numpy arrays, copied again whenever training or loading changed them."""
        version = (
            self.w2._version,
            self.b2._version,
            *((self.w1._version, self.b1._version) if self.width else ()),
        )
        cached = getattr(self, "_numpy_cache", None)
        if cached is None or cached[0] != version:
            arrays = {name: p.detach().float().cpu().numpy().copy() for name, p in self.named_parameters()}
            cached = self._numpy_cache = (version, arrays)
        return cached[1]

    def score(self, observation: np.ndarray, layer: int) -> float:
        """:meth:`scores` of one observation [d]."""
        return float(self.scores(torch.as_tensor(np.asarray(observation, dtype=np.float32))[None], layer)[0])

    def table_logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits [N, L-1] of every exit for a table's states [N, L, d] (layer L's row unused)."""
        x = states[:, :-1].float()
        if self.width:
            x = torch.relu(torch.einsum("nld,ldw->nlw", x, self.w1) + self.b1)
        return torch.einsum("nlw,lw->nl", x, self.w2) + self.b2

    @torch.no_grad()
    def table_scores(self, table, batch_size: int = 1024) -> np.ndarray:
        """[N, L] predicted probabilities of every exit of a token table (1.0 at layer L)."""
        n = table.num_inputs
        out = np.ones((n, self.num_layers), dtype=np.float32)
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            logits = self.table_logits(torch.from_numpy(np.asarray(table.states[rows], dtype=np.float32)))
            out[rows, :-1] = torch.sigmoid(logits).numpy()
        return out

    # -- on disk -----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "width": self.width,
                  "metadata": metadata or {}}  # fmt: skip
        (folder / PROBE_CONFIG).write_text(json.dumps(record, indent=2))
        save_file(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / PROBE_WEIGHTS)
        )
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ConfidenceProbe:
        folder = Path(folder)
        if not (folder / PROBE_CONFIG).is_file():
            raise FileNotFoundError(
                f"{folder} holds no confidence probe (no {PROBE_CONFIG}): fit one with "
                "ee_gym.generation.confidence.fit_probe(table) and save it with probe.save(folder)"
            )
        record = json.loads((folder / PROBE_CONFIG).read_text())
        probe = cls(record["num_layers"], record["hidden_size"], record["width"])
        probe.load_state_dict(load_file(str(folder / PROBE_WEIGHTS)))
        probe.metadata = record.get("metadata", {})
        return probe.eval()


def fit_probe(table, config: ProbeTraining | None = None) -> tuple[ConfidenceProbe, list[dict]]:
    """Fit a :class:`ConfidenceProbe` on a token table's states and ``correct`` (BCE over every token
    and exit 1..L-1, Adam, minibatches of tokens); returns it and the mean loss of each epoch."""
    config = config or ProbeTraining()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    states = torch.from_numpy(np.asarray(table.states, dtype=np.float32))
    targets = torch.from_numpy(np.asarray(table.correct, dtype=np.float32)[:, :-1])
    probe = ConfidenceProbe(table.num_layers, table.hidden_size, config.width)
    optimizer = torch.optim.AdamW(
        probe.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = nn.BCEWithLogitsLoss()
    history = []
    for epoch in range(config.epochs):
        order = torch.randperm(states.shape[0], generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            loss = loss_fn(probe.table_logits(states[rows]), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        history.append({"epoch": epoch + 1, "loss": total / len(order)})
    probe.metadata = {"training": asdict(config), "tokens": int(states.shape[0])}
    return probe.eval(), history


def reads_probe(obs_mode: str, probe: object = None) -> bool:
    """Whether ``obs_mode`` reads a confidence probe (``state+probe``); a ConfigError when a ``probe``
    is given to a mode that would ignore it."""
    from ee_gym.observations import get_obs_mode
    from ee_gym.validation import ConfigError

    reads = get_obs_mode(obs_mode).confidence_signal == "probe"
    if probe is not None and not reads:
        raise ConfigError(f"probe= is read by obs_mode 'state+probe' only, not {obs_mode!r}")
    return reads


def with_probe(table, probe: ConfidenceProbe | str | os.PathLike | None = None):
    """(a view of ``table`` whose ``state+probe`` observations read ``probe``, the probe): what the
    token env does for that mode. ``probe`` is a :class:`ConfidenceProbe`, a folder it was saved to,
    or None: fitted here on the table itself (seconds; the policy's own training tokens, never the
    evaluation articles). The view shares the table's arrays and has its own ``derived``, so envs on
    one table with different probes never read each other's scores."""
    import dataclasses

    from ee_gym.observations import PROBE_SCORES

    if probe is None:
        probe, _ = fit_probe(table)
    elif not isinstance(probe, ConfidenceProbe):
        probe = ConfidenceProbe.load(probe)
    if (probe.num_layers, probe.hidden_size) != (table.num_layers, table.hidden_size):
        raise ValueError(
            f"the probe reads {probe.num_layers} layers x {probe.hidden_size}, the table has "
            f"{table.num_layers} x {table.hidden_size}: fit one on this decoder's table (fit_probe)"
        )
    view = dataclasses.replace(table, derived={})
    view.derived[PROBE_SCORES] = probe.table_scores(table)
    return view, probe
