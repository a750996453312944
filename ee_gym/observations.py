"""Observation modes: what an exit policy sees at layer l, one small class per mode.

    state             s_l, the pooled state (what the paper's per-layer policy sees)   Box [-1, 1]^d
    state+layer       s_l followed by a one-hot of l (one network for all layers)      Box [-1, 1]^(d+L)
    state+confidence  s_l, what exit l says, one-hot of l                           Box [-1, 1]^(d+C+L)
    state+probe       s_l, a learned probe's confidence, one-hot of l (generation)  Box [-1, 1]^(d+C+L)
    stats             the head's view, enough for every classic rule (below)          Box [0, 1]^S
    full              {"state": s_l, "stats": the stats vector}                        Dict

Each mode is an :class:`ObsMode` registered once in :data:`OBS_MODE_REGISTRY` (by name; look one up
with :func:`get_obs_mode`). A mode says what it reads (``uses_state``; ``uses_stats``: the logits of
layers 1..l; ``uses_confidence``: exit l's top-2 gap), what it shows (``has_layer_one_hot``,
``is_dict``, its ``space``), and builds its observations on the two paths every consumer takes: from a
precomputed table (``gather``, the vector env and the cached single env) and from live states and
logits (``join`` / ``from_stats``, the live envs, batched inference, stage 3 and generation's
``PolicyExit``). Code that must treat modes differently asks these properties, never the name, so a
new mode is one class here. This module sits below both :mod:`ee_gym.envs` and
:mod:`ee_gym.generation` and imports neither (nor torch).

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
:class:`StatsView` reads those parts back, for rules and tests. A regression head (K = 1: one real
output z_l, no distribution) has the same layout with its values in place of the probabilities and
the one-hots (``probs`` = z_l, ``pred_history`` = z_1..z_l, ``entropy_history`` zeros), unbounded;
the ``state+confidence`` mode, which reads a softmax's top-2 gap, refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from gymnasium import spaces

from ee_gym.probabilities import normalized_entropy, softmax, top2_gap
from ee_gym.validation import ConfigError

#: joined observation tables larger than this are not precomputed (``ObsMode.gather``)
PRECOMPUTE_LIMIT_BYTES = 2**30
#: C, the copies of the head's confidence in a ``state+confidence`` observation (module docstring)
CONFIDENCE_WIDTH = 8


class Sizes(Protocol):
    """What a mode needs to know of the model or table: L, d and K."""

    num_layers: int
    hidden_size: int
    num_labels: int


class LayerTable(Protocol):
    """What a mode reads of a table: ``states`` [N, L, d], ``logits`` [N, L, K] (stats modes) or
    ``top2_gap`` [N, L] (token tables), and ``derived``, a dict for what is computed once per table."""

    states: np.ndarray
    derived: dict[str, np.ndarray]


# -- the stats vector --------------------------------------------------------------------------------
def stats_size(num_layers: int, num_labels: int) -> int:
    return num_labels + num_layers + num_layers * num_labels + num_layers


def stats_features(logits: np.ndarray, num_layers: int) -> np.ndarray:
    """The stats vector at every layer of a logits prefix: [N, l, K] -> [N, l, S] float32."""
    n, depth, k = logits.shape
    if k == 1:  # regression: the values stand in for the probabilities and the one-hots
        probs = one_hot = logits.astype(np.float32)
        entropy = np.zeros((n, depth), dtype=np.float32)
    else:
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


def last_stats(logits: np.ndarray, num_layers: int) -> np.ndarray:
    """``stats_features(logits, num_layers)[:, -1]`` without building the earlier layers' vectors."""
    n, depth, k = logits.shape
    out = np.zeros((n, stats_size(num_layers, k)), dtype=np.float32)
    view = StatsView(out, num_layers, k)
    view.layer[:, depth - 1] = 1.0
    if k == 1:  # regression, as in stats_features
        values = logits.astype(np.float32)
        view.probs[:], view.pred_history[:, :depth] = values[:, -1], values
        return out
    probs = softmax(logits.astype(np.float32))  # [N, l, K], the same operations as stats_features
    view.probs[:] = probs[:, -1]
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


# -- table reads, computed once per table --------------------------------------------------------------
def gather(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[:] = source[rows] without a temporary when the dtypes agree."""
    if source.dtype == out.dtype:
        # mode="clip" writes straight into out (mode="raise" buffers); rows are valid by construction.
        np.take(source, rows, axis=0, out=out, mode="clip")
    else:
        out[:] = source[rows]


def table_confidence(table: LayerTable) -> np.ndarray:
    """[N, L] the top-2 gap of every exit of ``table``: a generation table's own ``top2_gap``, else
    computed once from the logits and kept in ``table.derived``."""
    gap = getattr(table, "top2_gap", None)
    if gap is not None:
        return gap
    if "top2_gap" not in table.derived:
        table.derived["top2_gap"] = top2_gap(table.logits)
    return table.derived["top2_gap"]


def flat_states(table: LayerTable) -> np.ndarray:
    """[N * L, d]: the states, one row per (input, layer)."""
    return table.states.reshape(-1, table.states.shape[-1])


def flat_stats(table: LayerTable, num_layers: int) -> np.ndarray:
    """[N * L, S]: the stats vector of every (input, layer), computed on first use, once per table."""
    if "stats" not in table.derived:
        stats = stats_features(table.logits, num_layers)
        table.derived["stats"] = stats.reshape(-1, stats.shape[-1])
    return table.derived["stats"]


# -- the modes -------------------------------------------------------------------------------------
class ObsMode:
    """One observation mode: what it reads, its space, and its two paths (table and live)."""

    name: ClassVar[str]
    #: reads s_l
    uses_state: ClassVar[bool] = True
    #: reads the logits of layers 1..l (so tables without logits, such as token tables, cannot serve it)
    uses_stats: ClassVar[bool] = False
    #: reads a confidence feature of exit l (``confidence_signal`` says which)
    uses_confidence: ClassVar[bool] = False
    #: where that feature comes from: "top2_gap" (exit l's softmax, a vocabulary-sized product) or
    #: "probe" (a learned probe on the state, ee_gym.generation.confidence: d multiply-adds)
    confidence_signal: ClassVar[str | None] = None
    #: a flat vector ending with the one-hot of l (what per-layer networks and action masks read)
    has_layer_one_hot: ClassVar[bool] = False
    #: a gymnasium Dict observation (SB3's MultiInputPolicy)
    is_dict: ClassVar[bool] = False
    #: served by the token env only (the classification envs refuse it)
    generation_only: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<observation mode {self.name!r}>"

    def feature_size(self, hidden_size: int) -> int:
        """Entries before the layer one-hot in the flat modes: what a per-layer network reads."""
        return hidden_size + (CONFIDENCE_WIDTH if self.uses_confidence else 0)

    def space(self, sizes: Sizes) -> spaces.Space:
        raise NotImplementedError

    def join(self, sizes: Sizes, states: np.ndarray, layer: int, confidence: np.ndarray | None) -> np.ndarray:
        """Live path of the modes that read no logits vector: observations [B, ...] from s_l [B, d]."""
        raise ValueError(f"observation mode {self.name!r} reads the logits: use single()")

    def from_stats(self, states: np.ndarray | None, stats: np.ndarray) -> Any:
        """Live path of the modes that read the logits: the observation from s_l and the stats vector."""
        raise NotImplementedError

    def gather(self, sizes: Sizes, table: LayerTable, rows: np.ndarray, layer: np.ndarray, out: Any) -> None:
        """Table path: write the observations of flat rows ``rows`` (input * L + layer - 1) into ``out``."""
        raise NotImplementedError


class StateMode(ObsMode):
    name = "state"

    def space(self, sizes: Sizes) -> spaces.Space:
        return spaces.Box(-1.0, 1.0, (sizes.hidden_size,), np.float32)

    def join(self, sizes: Sizes, states: np.ndarray, layer: int, confidence: np.ndarray | None) -> np.ndarray:
        return np.array(states, dtype=np.float32)  # a copy: callers may keep observations

    def gather(self, sizes: Sizes, table: LayerTable, rows: np.ndarray, layer: np.ndarray, out: Any) -> None:
        gather(flat_states(table), rows, out)


class StateLayerMode(ObsMode):
    """s_l, then (in :class:`StateConfidenceMode`) exit l's confidence, then the one-hot of l."""

    name = "state+layer"
    has_layer_one_hot = True

    def space(self, sizes: Sizes) -> spaces.Space:
        size = self.feature_size(sizes.hidden_size) + sizes.num_layers
        return spaces.Box(-1.0, 1.0, (size,), np.float32)

    def join(self, sizes: Sizes, states: np.ndarray, layer: int, confidence: np.ndarray | None) -> np.ndarray:
        states = np.asarray(states, dtype=np.float32)
        if self.uses_confidence and confidence is None:
            raise ValueError(f"observation mode {self.name!r} needs the exit's confidence (top-2 gap)")
        d, f = sizes.hidden_size, self.feature_size(sizes.hidden_size)
        out = np.zeros((states.shape[0], f + sizes.num_layers), dtype=np.float32)
        out[:, :d] = states
        if self.uses_confidence:
            out[:, d:f] = 2.0 * np.asarray(confidence, dtype=np.float32).reshape(-1, 1) - 1.0
        out[:, f + layer - 1] = 1.0
        return out

    def gather(self, sizes: Sizes, table: LayerTable, rows: np.ndarray, layer: np.ndarray, out: Any) -> None:
        joined = self._joined(table)
        if joined is not None:
            gather(joined, rows, out)
            return
        # too big to precompute: states, then the confidence and the one-hot
        d, f = sizes.hidden_size, self.feature_size(sizes.hidden_size)
        gather(flat_states(table), rows, out[:, :d])
        out[:, d:] = 0.0
        if self.uses_confidence:
            out[:, d:f] = 2.0 * self.table_signal(table).reshape(-1)[rows, None] - 1.0
        out[np.arange(len(rows)), f + layer - 1] = 1.0

    def table_signal(self, table: LayerTable) -> np.ndarray:
        """[N, L] the confidence feature of every exit of ``table``, in [0, 1]."""
        if self.confidence_signal != "probe":
            return table_confidence(table)
        if PROBE_SCORES not in table.derived:
            raise ConfigError(
                f"observation mode {self.name!r} reads a confidence probe's scores, and this table has "
                "none: only the token env serves it, given probe=... (ee_gym.generation.confidence)"
            )
        return table.derived[PROBE_SCORES]

    def _joined(self, table: LayerTable) -> np.ndarray | None:
        """[N * L, F + L]: every observation of this mode, precomputed so that a step is one gather.

        None when that table would exceed :data:`PRECOMPUTE_LIMIT_BYTES`; ``gather`` then joins the
        parts itself.
        """
        n, big_l, d = table.states.shape
        f = self.feature_size(d)
        if n * big_l * (f + big_l) * 4 > PRECOMPUTE_LIMIT_BYTES:
            return None
        if self.name not in table.derived:
            joined = np.zeros((n, big_l, f + big_l), dtype=np.float32)
            joined[..., :d] = table.states
            if self.uses_confidence:
                joined[..., d:f] = 2.0 * self.table_signal(table)[..., None] - 1.0
            joined[..., f:] = np.eye(big_l, dtype=np.float32)
            table.derived[self.name] = joined.reshape(n * big_l, f + big_l)
        return table.derived[self.name]


class StateConfidenceMode(StateLayerMode):
    name = "state+confidence"
    uses_confidence = True
    confidence_signal = "top2_gap"


class StateProbeMode(StateLayerMode):
    """``state+confidence`` with the confidence of a learned probe on the state instead of exit l's
    softmax: cheap to compute at deployment (generation only: the probe is fitted on a token table)."""

    name = "state+probe"
    uses_confidence = True
    confidence_signal = "probe"
    generation_only = True


class StatsMode(ObsMode):
    name = "stats"
    uses_state = False
    uses_stats = True

    def space(self, sizes: Sizes) -> spaces.Space:
        shape = (stats_size(sizes.num_layers, sizes.num_labels),)
        if sizes.num_labels == 1:  # a regression head's values: any float32 (finite bounds for the checkers)
            top = np.finfo(np.float32).max
            return spaces.Box(-top, top, shape, np.float32)
        return spaces.Box(0.0, 1.0, shape, np.float32)

    def from_stats(self, states: np.ndarray | None, stats: np.ndarray) -> np.ndarray:
        return stats

    def gather(self, sizes: Sizes, table: LayerTable, rows: np.ndarray, layer: np.ndarray, out: Any) -> None:
        gather(flat_stats(table, sizes.num_layers), rows, out)


class FullMode(ObsMode):
    name = "full"
    uses_stats = True
    is_dict = True

    def space(self, sizes: Sizes) -> spaces.Space:
        return spaces.Dict({"state": StateMode().space(sizes), "stats": StatsMode().space(sizes)})

    def from_stats(self, states: np.ndarray | None, stats: np.ndarray) -> dict[str, np.ndarray]:
        return {"state": np.array(states, dtype=np.float32), "stats": stats}

    def gather(self, sizes: Sizes, table: LayerTable, rows: np.ndarray, layer: np.ndarray, out: Any) -> None:
        gather(flat_states(table), rows, out["state"])
        gather(flat_stats(table, sizes.num_layers), rows, out["stats"])


#: every observation mode, by name: the one place modes are registered
OBS_MODE_REGISTRY: dict[str, ObsMode] = {
    mode.name: mode
    for mode in (
        StateMode(),
        StateLayerMode(),
        StateConfidenceMode(),
        StateProbeMode(),
        StatsMode(),
        FullMode(),
    )
}
#: the modes of the classification envs, in the order the docs list them
OBS_MODES: tuple[str, ...] = tuple(n for n, m in OBS_MODE_REGISTRY.items() if not m.generation_only)
#: the flat modes that end with the layer one-hot (what per-layer networks and action masks read)
LAYER_ONE_HOT_MODES: tuple[str, ...] = tuple(n for n, m in OBS_MODE_REGISTRY.items() if m.has_layer_one_hot)
#: the modes a table without logits serves (generation's token tables, live decoders)
STATE_OBS_MODES: tuple[str, ...] = tuple(n for n, m in OBS_MODE_REGISTRY.items() if not m.uses_stats)
#: where a table keeps a confidence probe's [N, L] scores (``table.derived``), for ``state+probe``
PROBE_SCORES = "probe_scores"


def get_obs_mode(mode: str | ObsMode) -> ObsMode:
    """The :class:`ObsMode` of a name (or the mode itself), else ConfigError listing the names."""
    if isinstance(mode, ObsMode):
        return mode
    if not isinstance(mode, str) or mode not in OBS_MODE_REGISTRY:
        raise ConfigError(f"unknown observation mode {mode!r}; choose one of {', '.join(OBS_MODE_REGISTRY)}")
    return OBS_MODE_REGISTRY[mode]


def check_obs_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`OBS_MODES`, else ConfigError listing them."""
    get_obs_mode(mode)
    return mode


def check_mode_fits_heads(mode: str | ObsMode, num_labels: int) -> None:
    """ConfigError when ``mode`` reads a softmax that heads of ``num_labels`` outputs lack (one output:
    a regression task's heads, which have no top-2 gap)."""
    kind = get_obs_mode(mode)
    if num_labels == 1 and kind.confidence_signal == "top2_gap":
        raise ConfigError(
            f"observation mode {kind.name!r} reads exit l's softmax (its top-2 gap), and these heads have "
            "one output (a regression task): use 'state', 'state+layer', 'stats' or 'full'"
        )


def modes_where(**wanted: bool) -> tuple[str, ...]:
    """Names of the modes whose properties match, e.g. ``modes_where(has_layer_one_hot=True)``."""
    return tuple(
        n for n, m in OBS_MODE_REGISTRY.items() if all(getattr(m, k) == v for k, v in wanted.items())
    )


# -- the encoder: one mode at given sizes ------------------------------------------------------------
@dataclass
class ObservationEncoder:
    """Builds observations of one mode at given sizes, one at a time (single env) or by batch (vector
    env, inference). ``mode`` stays the name; ``kind`` is the :class:`ObsMode`, whose properties
    (``uses_state``, ``uses_confidence``, ``has_layer_one_hot``, ...) the encoder passes through."""

    mode: str
    num_layers: int
    hidden_size: int
    num_labels: int

    def __post_init__(self) -> None:
        self.kind: ObsMode = get_obs_mode(self.mode)
        self.mode = self.kind.name
        check_mode_fits_heads(self.kind, self.num_labels)
        self.space: spaces.Space = self.kind.space(self)
        # what the mode reads and shows, for callers that hold the encoder (ObsMode says what each means)
        self.uses_state, self.uses_stats = self.kind.uses_state, self.kind.uses_stats
        self.uses_confidence, self.has_layer_one_hot = self.kind.uses_confidence, self.kind.has_layer_one_hot

    @property
    def feature_size(self) -> int:
        """Entries before the layer one-hot in the flat modes: what a per-layer network reads."""
        return self.kind.feature_size(self.hidden_size)

    def join(self, states: np.ndarray, layer: int, confidence: np.ndarray | None = None) -> np.ndarray:
        """Observations [B, ...] of the modes that read no logits vector, from states s_l [B, d] at
        layer ``layer`` and, in ``state+confidence``, exit l's top-2 gaps [B]."""
        return self.kind.join(self, states, layer, confidence)

    # -- one observation from the episode so far (single env, cached or live) ------------------
    def single(self, state: np.ndarray | None, logits_so_far: np.ndarray):
        """Observation at layer l = len(logits_so_far) from s_l and the logits of layers 1..l."""
        layer = logits_so_far.shape[0]
        if not self.uses_stats:
            confidence = top2_gap(logits_so_far[-1]) if self.uses_confidence else None
            return self.from_state(state, layer, confidence)
        stats = stats_features(logits_so_far[None], self.num_layers)[0, -1]
        return self.kind.from_stats(state, stats)

    def from_state(self, state: np.ndarray, layer: int, confidence: float | None = None) -> np.ndarray:
        """Observation at layer ``layer`` from s_l (and, in ``state+confidence``, exit l's top-2 gap),
        in the modes that read no logits vector: what the token env shows in live mode."""
        gap = None if confidence is None else np.array([confidence], dtype=np.float32)
        return self.kind.join(self, np.asarray(state)[None], layer, gap)[0]

    # -- a batch of live rows, all at the same layer (batched inference) ---------------------------
    def from_outputs(self, states: np.ndarray | None, logits_so_far: np.ndarray):
        """Observations of B rows at layer l = logits_so_far.shape[1], from s_l [B, d] and the logits
        of layers 1..l [B, l, K]: the batched :meth:`single`, equal to stacking it row by row.

        ``states`` may be None in the modes that do not read them (``uses_state`` False).
        """
        logits_so_far = np.asarray(logits_so_far)
        if logits_so_far.ndim != 3:
            raise ValueError(f"logits_so_far must be [B, l, K], got shape {logits_so_far.shape}")
        batch, layer, _ = logits_so_far.shape
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer {layer} is outside 1..{self.num_layers}")
        if self.uses_state:
            states = np.asarray(states, dtype=np.float32)
            if states.shape != (batch, self.hidden_size):
                raise ValueError(f"states must be [{batch}, {self.hidden_size}], got shape {states.shape}")
        if self.uses_stats:
            return self.kind.from_stats(states, last_stats(logits_so_far, self.num_layers))
        confidence = top2_gap(logits_so_far[:, -1]) if self.uses_confidence else None
        return self.kind.join(self, states, layer, confidence)

    # -- a batch from the table (vector env) -----------------------------------------------------
    def allocate(self, batch: int):
        """Preallocated output buffers for ``batch`` observations."""
        if isinstance(self.space, spaces.Dict):
            return {key: np.zeros((batch, *sub.shape), np.float32) for key, sub in self.space.items()}
        return np.zeros((batch, *self.space.shape), np.float32)

    def batch(self, table: LayerTable, index: np.ndarray, layer: np.ndarray, out) -> None:
        """Write the observations of inputs ``index`` at layers ``layer`` (1-based) into ``out``."""
        rows = index * self.num_layers + (layer - 1)  # into the [N * L, ...] flattened tables
        self.kind.gather(self, table, rows, layer, out)

    def at(self, table: LayerTable, index: int, layer: int):
        """One observation from the table (the single env in cached mode)."""
        out = self.allocate(1)
        self.batch(table, np.array([index]), np.array([layer]), out)
        if isinstance(out, dict):
            return {key: value[0] for key, value in out.items()}
        return out[0]
