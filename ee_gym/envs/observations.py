"""Observation modes: what an exit policy sees at layer l.

    state             s_l, the pooled state (what the paper's per-layer policy sees)   Box [-1, 1]^d
    state+layer       s_l followed by a one-hot of l (one network for all layers)      Box [-1, 1]^(d+L)
    state+confidence  s_l, what exit l says, one-hot of l                           Box [-1, 1]^(d+C+L)
    stats             the head's view, enough for every classic rule (below)          Box [0, 1]^S
    full              {"state": s_l, "stats": the stats vector}                        Dict

``state+confidence`` adds one number from exit l's head to the state: its confidence, the top-1 minus
top-2 softmax probability g (CALM's signal), as 2g - 1 repeated C = CONFIDENCE_WIDTH times. The copies
give that one number weight against the d state entries when the policy's first layer is initialised
(on the XSum token table, 8 copies against 1 raised REINFORCE's held-out token agreement at 1.5x layer
speed-up from 0.739 to 0.761). It reads the head's full softmax, as the ``stats`` mode does, but only the
gap, so it also serves tables that keep no logits (generation's token tables keep the gap).

The stats vector, S = K + L + L*K + L values in [0, 1]:
    probs            p_l, the head's softmax at layer l                    (K)
    layer            one-hot of l                                          (L)
    pred_history     one-hot of argmax p_j for j = 1..l, zeros after l     (L x K)
    entropy_history  H(p_j) / log K for j = 1..l, zeros after l            (L)
:class:`StatsView` reads those parts back, for rules and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

from ee_gym.envs.table import ExitTable, normalized_entropy, softmax
from ee_gym.validation import ConfigError

OBS_MODES = ("state", "state+layer", "state+confidence", "stats", "full")
#: the flat modes that end with the layer one-hot (what per-layer networks and action masks read)
LAYER_ONE_HOT_MODES = ("state+layer", "state+confidence")
#: joined observation tables larger than this are not precomputed (``ObservationEncoder.batch``)
PRECOMPUTE_LIMIT_BYTES = 2**30
#: C, the copies of the head's confidence in a ``state+confidence`` observation (module docstring)
CONFIDENCE_WIDTH = 8


def check_obs_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`OBS_MODES`, else ConfigError listing them."""
    if not isinstance(mode, str) or mode not in OBS_MODES:
        raise ConfigError(f"unknown observation mode {mode!r}; choose one of {', '.join(OBS_MODES)}")
    return mode


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """p(1st) - p(2nd) of the softmax of ``logits`` [..., K] -> [...] float32 (0 when K = 1)."""
    probs = softmax(np.asarray(logits, dtype=np.float32))
    if probs.shape[-1] < 2:
        return np.zeros(probs.shape[:-1], dtype=np.float32)
    top2 = -np.partition(-probs, 1, axis=-1)[..., :2]
    return (top2[..., 0] - top2[..., 1]).astype(np.float32)


def table_confidence(table) -> np.ndarray:
    """[N, L] the top-2 gap of every exit of ``table``: a generation table's own ``top2_gap``, else
    computed once from the logits and kept in ``table.derived``."""
    gap = getattr(table, "top2_gap", None)
    if gap is not None:
        return gap
    if "top2_gap" not in table.derived:
        table.derived["top2_gap"] = top2_gap(table.logits)
    return table.derived["top2_gap"]


def stats_size(num_layers: int, num_labels: int) -> int:
    return num_labels + num_layers + num_layers * num_labels + num_layers


def stats_features(logits: np.ndarray, num_layers: int) -> np.ndarray:
    """The stats vector at every layer of a logits prefix: [N, l, K] -> [N, l, S] float32."""
    n, depth, k = logits.shape
    probs = softmax(logits.astype(np.float32))
    one_hot = np.eye(k, dtype=np.float32)[logits.argmax(-1)]  # the prediction the env scores
    entropy = normalized_entropy(probs).astype(np.float32)  # [N, l]
    out = np.zeros((n, depth, stats_size(num_layers, k)), dtype=np.float32)
    view = StatsView(out, num_layers, k)
    view.probs[:] = probs
    for layer in range(depth):
        view.layer[:, layer, layer] = 1.0
        view.pred_history[:, layer, : layer + 1] = one_hot[:, : layer + 1]
        view.entropy_history[:, layer, : layer + 1] = entropy[:, : layer + 1]
    return out


def _last_stats(logits: np.ndarray, num_layers: int) -> np.ndarray:
    """``stats_features(logits, num_layers)[:, -1]`` without building the earlier layers' vectors."""
    n, depth, k = logits.shape
    probs = softmax(logits.astype(np.float32))  # [N, l, K], the same operations as stats_features
    out = np.zeros((n, stats_size(num_layers, k)), dtype=np.float32)
    view = StatsView(out, num_layers, k)
    view.probs[:] = probs[:, -1]
    view.layer[:, depth - 1] = 1.0
    view.pred_history[:, :depth] = np.eye(k, dtype=np.float32)[logits.argmax(-1)]
    view.entropy_history[:, :depth] = normalized_entropy(probs).astype(np.float32)
    return out


class StatsView:
    """Named views into stats vectors (any leading shape)."""

    def __init__(self, stats: np.ndarray, num_layers: int, num_labels: int):
        k, big_l = num_labels, num_layers
        lead = stats.shape[:-1]
        self.probs = stats[..., :k]
        self.layer = stats[..., k : k + big_l]
        self.pred_history = stats[..., k + big_l : k + big_l + big_l * k].reshape(*lead, big_l, k)
        self.entropy_history = stats[..., k + big_l + big_l * k :]

    @property
    def layer_number(self) -> np.ndarray:
        """l, 1-based."""
        return self.layer.argmax(-1) + 1


def gather(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[:] = source[rows] without a temporary when the dtypes agree."""
    if source.dtype == out.dtype:
        # mode="clip" writes straight into out (mode="raise" buffers); rows are valid by construction.
        np.take(source, rows, axis=0, out=out, mode="clip")
    else:
        out[:] = source[rows]


@dataclass
class ObservationEncoder:
    """Builds observations of one mode, one at a time (single env) or by batch (vector env)."""

    mode: str
    num_layers: int
    hidden_size: int
    num_labels: int

    def __post_init__(self) -> None:
        check_obs_mode(self.mode)
        d, big_l, s = self.hidden_size, self.num_layers, stats_size(self.num_layers, self.num_labels)
        state = spaces.Box(-1.0, 1.0, (d,), np.float32)
        stats = spaces.Box(0.0, 1.0, (s,), np.float32)
        self.space: spaces.Space = {
            "state": state,
            "state+layer": spaces.Box(-1.0, 1.0, (d + big_l,), np.float32),
            "state+confidence": spaces.Box(-1.0, 1.0, (d + CONFIDENCE_WIDTH + big_l,), np.float32),
            "stats": stats,
            "full": spaces.Dict({"state": state, "stats": stats}),
        }[self.mode]

    @property
    def uses_state(self) -> bool:
        return self.mode != "stats"

    @property
    def uses_stats(self) -> bool:
        return self.mode in ("stats", "full")

    @property
    def uses_confidence(self) -> bool:
        return self.mode == "state+confidence"

    @property
    def feature_size(self) -> int:
        """Entries before the layer one-hot in the flat modes: what a per-layer network reads."""
        return self.hidden_size + (CONFIDENCE_WIDTH if self.uses_confidence else 0)

    def join(self, states: np.ndarray, layer: int, confidence: np.ndarray | None = None) -> np.ndarray:
        """Observations [B, ...] of the modes that read no logits vector, from states s_l [B, d] at
        layer ``layer`` and, in ``state+confidence``, exit l's top-2 gaps [B]."""
        states = np.asarray(states, dtype=np.float32)
        if self.mode == "state":
            return states.copy()  # callers may keep observations
        if self.uses_confidence and confidence is None:
            raise ValueError("observation mode 'state+confidence' needs the exit's confidence (top-2 gap)")
        d, f = self.hidden_size, self.feature_size
        out = np.zeros((states.shape[0], f + self.num_layers), dtype=np.float32)
        out[:, :d] = states
        if self.uses_confidence:
            out[:, d:f] = 2.0 * np.asarray(confidence, dtype=np.float32).reshape(-1, 1) - 1.0
        out[:, f + layer - 1] = 1.0
        return out

    # -- one observation from the episode so far (single env, cached or live) ------------------
    def single(self, state: np.ndarray | None, logits_so_far: np.ndarray):
        """Observation at layer l = len(logits_so_far) from s_l and the logits of layers 1..l."""
        layer = logits_so_far.shape[0]
        if not self.uses_stats:
            confidence = top2_gap(logits_so_far[-1]) if self.uses_confidence else None
            return self.from_state(state, layer, confidence)
        stats = stats_features(logits_so_far[None], self.num_layers)[0, -1]
        if self.mode == "stats":
            return stats
        return {"state": np.array(state, dtype=np.float32), "stats": stats}

    def from_state(self, state: np.ndarray, layer: int, confidence: float | None = None) -> np.ndarray:
        """Observation at layer ``layer`` from s_l (and, in ``state+confidence``, exit l's top-2 gap),
        in the modes that read no logits vector: what the token env shows in live mode."""
        if self.uses_stats:
            raise ValueError(f"observation mode {self.mode!r} reads the logits: use single()")
        gap = None if confidence is None else np.array([confidence], dtype=np.float32)
        return self.join(np.asarray(state)[None], layer, gap)[0]

    # -- a batch of live rows, all at the same layer (batched inference) ---------------------------
    def from_outputs(self, states: np.ndarray | None, logits_so_far: np.ndarray):
        """Observations of B rows at layer l = logits_so_far.shape[1], from s_l [B, d] and the logits
        of layers 1..l [B, l, K]: the batched :meth:`single`, equal to stacking it row by row.

        ``states`` may be None in the ``stats`` mode, which does not read them.
        """
        logits_so_far = np.asarray(logits_so_far)
        if logits_so_far.ndim != 3:
            raise ValueError(f"logits_so_far must be [B, l, K], got shape {logits_so_far.shape}")
        batch, layer, _ = logits_so_far.shape
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer {layer} is outside 1..{self.num_layers}")
        if self.uses_stats:
            stats = _last_stats(logits_so_far, self.num_layers)
        if self.mode == "stats":
            return stats
        states = np.asarray(states, dtype=np.float32)
        if states.shape != (batch, self.hidden_size):
            raise ValueError(f"states must be [{batch}, {self.hidden_size}], got shape {states.shape}")
        if self.mode == "full":
            return {"state": states.copy(), "stats": stats}
        confidence = top2_gap(logits_so_far[:, -1]) if self.uses_confidence else None
        return self.join(states, layer, confidence)

    # -- a batch from the table (vector env) -----------------------------------------------------
    def allocate(self, batch: int):
        """Preallocated output buffers for ``batch`` observations."""
        if isinstance(self.space, spaces.Dict):
            return {key: np.zeros((batch, *sub.shape), np.float32) for key, sub in self.space.items()}
        return np.zeros((batch, *self.space.shape), np.float32)

    def batch(self, table: ExitTable, index: np.ndarray, layer: np.ndarray, out) -> None:
        """Write the observations of inputs ``index`` at layers ``layer`` (1-based) into ``out``."""
        rows = index * self.num_layers + (layer - 1)  # into the [N * L, ...] flattened tables
        if self.mode == "state":
            gather(self._flat_states(table), rows, out)
        elif self.mode in LAYER_ONE_HOT_MODES:
            joined = self._flat_joined(table)
            if joined is not None:
                gather(joined, rows, out)
            else:  # too big to precompute: states, then the confidence and the one-hot
                d, f = self.hidden_size, self.feature_size
                gather(self._flat_states(table), rows, out[:, :d])
                out[:, d:] = 0.0
                if self.uses_confidence:
                    out[:, d:f] = 2.0 * table_confidence(table).reshape(-1)[rows, None] - 1.0
                out[np.arange(len(rows)), f + layer - 1] = 1.0
        elif self.mode == "stats":
            gather(self._flat_stats(table), rows, out)
        else:
            gather(self._flat_states(table), rows, out["state"])
            gather(self._flat_stats(table), rows, out["stats"])

    def _flat_states(self, table: ExitTable) -> np.ndarray:
        states = table.states
        return states.reshape(-1, states.shape[-1])

    def at(self, table: ExitTable, index: int, layer: int):
        """One observation from the table (the single env in cached mode)."""
        out = self.allocate(1)
        self.batch(table, np.array([index]), np.array([layer]), out)
        if isinstance(out, dict):
            return {key: value[0] for key, value in out.items()}
        return out[0]

    def _flat_joined(self, table: ExitTable) -> np.ndarray | None:
        """[N * L, F + L]: every observation of this mode, precomputed so that a step is one gather.

        None when that table would exceed 1 GiB; ``batch`` then joins the parts itself.
        """
        n, big_l, d = table.states.shape
        f = self.feature_size
        if n * big_l * (f + big_l) * 4 > PRECOMPUTE_LIMIT_BYTES:
            return None
        if self.mode not in table.derived:
            joined = np.zeros((n, big_l, f + big_l), dtype=np.float32)
            joined[..., :d] = table.states
            if self.uses_confidence:
                joined[..., d:f] = 2.0 * table_confidence(table)[..., None] - 1.0
            joined[..., f:] = np.eye(big_l, dtype=np.float32)
            table.derived[self.mode] = joined.reshape(n * big_l, f + big_l)
        return table.derived[self.mode]

    def _flat_stats(self, table: ExitTable) -> np.ndarray:
        if "stats" not in table.derived:  # computed on first use, once per table
            stats = stats_features(table.logits, self.num_layers)
            table.derived["stats"] = stats.reshape(-1, stats.shape[-1])
        return table.derived["stats"]
