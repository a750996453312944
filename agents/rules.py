"""The classic exit rules of docs/baselines.md, as stateless policies over the ``stats`` observation.

Each rule reads only what the stats vector shows at layer l (the head's softmax p_l, the layer, the
argmax and normalized entropy of every head so far) and answers EXIT (1) or CONTINUE (0); the env
forces an exit at layer L whatever the rule says. Decoding the stats vector needs L and K: ``bind``
reads them from the env; without ``bind`` they are inferred from the vectors themselves when exactly
one (L, K) fits (see :func:`infer_dims`), and an error asks for ``bind`` otherwise.

Comparisons run in the observation's precision (float32). Each threshold must lie in its signal's
range (``maxprob`` in (0, 1], ``entropy`` >= 0, ``normentropy`` / ``top2gap`` / ``pcee`` in [0, 1],
``patience`` and ``pcee``'s patience whole numbers >= 1, ``static``'s layer a whole number >= 1):
others raise :class:`~ee_gym.validation.ConfigError`, since a threshold outside it never exits. ``sweep(num_layers)`` (a classmethod on
every rule) lists keyword arguments that trace the rule's accuracy / speed-up curve, from the
earliest-exiting setting to the latest (for PCEE: within each patience).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ee_gym.envs import ConsistentEEVectorEnv
from ee_gym.observations import StatsView, stats_size
from ee_gym.policy import ExitPolicy
from ee_gym.probabilities import normalized_entropy
from ee_gym.validation import ConfigError, check_float, check_int, check_optional_int


def _fits(stats: np.ndarray, num_layers: int, num_labels: int) -> bool:
    """Whether every row of ``stats`` [B, S] is a well-formed stats vector for (L, K)."""
    view = StatsView(stats, num_layers, num_labels)
    onehot = np.isin(view.layer, (0.0, 1.0)).all() and (view.layer.sum(-1) == 1).all()
    if not onehot or (view.probs < 0).any() or not np.allclose(view.probs.sum(-1), 1.0, atol=1e-3):
        return False
    rows, layer = np.arange(len(stats)), view.layer_number
    seen = np.arange(num_layers) < layer[:, None]  # [B, L]: layers 1..l
    history = view.pred_history
    return bool(
        np.isin(history, (0.0, 1.0)).all()
        and (history.sum(-1) == seen).all()
        and (history[rows, layer - 1].argmax(-1) == view.probs.argmax(-1)).all()
        and (view.entropy_history[~seen] == 0).all()
        and np.allclose(view.entropy_history[rows, layer - 1], normalized_entropy(view.probs), atol=1e-4)
    )


def infer_dims(stats: np.ndarray) -> tuple[int, int]:
    """(num_layers, num_labels) of a batch of stats vectors, when exactly one pair fits them.

    The width alone, S + 2 = (K + 2)(L + 1), is usually ambiguous; every candidate is checked against
    the contents (probabilities summing to 1, one-hots, history zero after l, entropy of p_l).
    """
    stats = np.asarray(stats).reshape(-1, np.shape(stats)[-1])
    width = stats.shape[-1]
    candidates = [
        ((width + 2) // (k + 2) - 1, k)
        for k in range(2, width + 1)
        if (width + 2) % (k + 2) == 0 and (width + 2) // (k + 2) >= 2
    ]
    found = [dims for dims in candidates if _fits(stats, *dims)]
    if len(found) != 1:
        raise ValueError(
            f"cannot tell the number of layers and labels from stats vectors of width {width} "
            f"(fitting (L, K): {found}); call policy.bind(env) first"
        )
    return found[0]


class StatsRule(ExitPolicy):
    """Base of the rules: decodes the stats observation and applies :meth:`exits` row-wise."""

    obs_mode = "stats"
    #: reads the head's distribution (entropy, confidence), which a regression head does not have
    classification_only: ClassVar[bool] = True

    def __init__(self) -> None:
        self.dims: tuple[int, int] | None = None  # (num_layers, num_labels), set by bind

    def bind(self, env: ConsistentEEVectorEnv) -> None:
        num_labels = env.table.num_labels
        if num_labels == 1 and self.classification_only:
            raise ConfigError(
                f"the {self.name!r} rule reads the head's softmax, and this task's heads output one number "
                "(regression): use 'static', 'patience' (PABEE's regression rule), 'learned-exit' or a learner"
            )
        self.dims = (env.num_layers, num_labels)

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        if isinstance(obs, dict):  # the "full" mode carries the stats vector too
            obs = obs["stats"]
        obs = np.asarray(obs)
        lead, width = obs.shape[:-1], obs.shape[-1]
        stats = obs.reshape(-1, width)
        num_layers, num_labels = self.dims if self.dims is not None else infer_dims(stats)
        if width != stats_size(num_layers, num_labels):
            raise ValueError(
                f"{self.name}: observations of width {width} are not stats vectors for "
                f"{num_layers} layers and {num_labels} labels"
            )
        view = StatsView(stats, num_layers, num_labels)
        return self.exits(view, view.layer_number, num_layers, num_labels).astype(np.int64).reshape(lead)

    def exits(self, view: StatsView, layer: np.ndarray, num_layers: int, num_labels: int) -> np.ndarray:
        """Boolean [B]: whether each row exits at its layer ``layer`` (1-based)."""
        raise NotImplementedError

    @classmethod
    def sweep(cls, num_layers: int = 12, num_labels: int = 2) -> list[dict[str, Any]]:
        """Keyword arguments tracing the accuracy / speed-up curve, earliest exits first, for heads
        of ``num_labels`` outputs (1: a regression task's)."""
        raise NotImplementedError


def _run_ends_at(flags: np.ndarray, layer: np.ndarray, length: int) -> np.ndarray:
    """Whether ``flags`` [B, L] (per layer 1..L) held at each of the ``length`` layers ending at ``layer``."""
    positions = (layer - 1)[:, None] - np.arange(length)  # [B, length], 0-based
    held = np.take_along_axis(flags, np.clip(positions, 0, None), axis=1)
    return (held & (positions >= 0)).all(-1)


def check_threshold(
    rule: str, value: Any, signal: str, minimum: float, maximum: float | None, open_min: bool
):
    """A rule's threshold when it lies in its signal's range, else ConfigError naming both."""
    try:
        return check_float(
            f"{rule} threshold", value, minimum=minimum, maximum=maximum, exclusive_minimum=open_min
        )
    except ConfigError as error:
        raise ConfigError(
            f"{error}: it is compared with {signal}; outside that range it never (or always) exits"
        ) from None


class _Threshold(StatsRule):
    """A rule with one ``threshold`` in the range of its signal (``signal``, ``bounds``)."""

    default: float = 0.0
    thresholds: tuple[float, ...] = ()
    #: what the threshold is compared with, and its range: (minimum, maximum or None, minimum excluded)
    signal: str = ""
    bounds: tuple[float, float | None, bool] = (0.0, 1.0, False)

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__()
        value = self.default if threshold is None else threshold
        self.threshold = check_threshold(self.name, value, self.signal, *self.bounds)

    def get_params(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    @classmethod
    def sweep(cls, num_layers: int = 12, num_labels: int = 2) -> list[dict[str, Any]]:
        return [{"threshold": t} for t in cls.thresholds]


class Static(StatsRule):
    """Every input exits at layer ``layer`` (the "BERT-kL" rows); a layer beyond L exits at L.

    ``layer=None`` (the default) means the middle layer, ceil(L / 2).
    """

    name = "static"
    classification_only = False

    def __init__(self, layer: int | None = None) -> None:
        super().__init__()
        self.layer = check_optional_int("static: layer", layer, minimum=1)

    def exits(self, view, layer, num_layers, num_labels):
        return layer >= (math.ceil(num_layers / 2) if self.layer is None else self.layer)

    def get_params(self) -> dict[str, Any]:
        return {"layer": self.layer}

    @classmethod
    def sweep(cls, num_layers: int = 12, num_labels: int = 2) -> list[dict[str, Any]]:
        return [{"layer": k} for k in range(1, num_layers + 1)]


class Entropy(_Threshold):
    """DeeBERT (Xin et al., ACL 2020): exit when H(p_l) < threshold (natural log, in nats)."""

    name = "entropy"
    default = 0.3
    signal, bounds = "the entropy H(p_l) in nats, >= 0", (0.0, None, False)
    # dense near ln 2 (a uniform binary head), where a weak model's heads sit on hard tasks
    thresholds = (0.7, 0.69, 0.68, 0.67, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01, 0.005, 0.001)

    def exits(self, view, layer, num_layers, num_labels):
        current = view.entropy_history[np.arange(len(layer)), layer - 1]  # H / log K
        return current * np.float32(math.log(num_labels)) < self.threshold


class NormalizedEntropy(_Threshold):
    """FastBERT (Liu et al., ACL 2020): exit when H(p_l) / log K < threshold."""

    name = "normentropy"
    default = 0.3
    signal, bounds = "the normalized entropy H(p_l) / log K, in [0, 1]", (0.0, 1.0, False)
    thresholds = (0.99, 0.98, 0.96, 0.93, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01)

    def exits(self, view, layer, num_layers, num_labels):
        return view.entropy_history[np.arange(len(layer)), layer - 1] < self.threshold


class MaxProb(_Threshold):
    """CALM softmax confidence (Schuster et al., NeurIPS 2022): exit when max p_l >= threshold."""

    name = "maxprob"
    default = 0.9
    signal, bounds = "max p_l, in (0, 1]", (0.0, 1.0, True)
    thresholds = (0.5, 0.52, 0.55, 0.58, 0.6, 0.65, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)

    def exits(self, view, layer, num_layers, num_labels):
        return view.probs.max(-1) >= self.threshold


class Top2Gap(_Threshold):
    """CALM top-2 gap: exit when p_l(1st) - p_l(2nd) >= threshold."""

    name = "top2gap"
    default = 0.8
    signal, bounds = "p_l(1st) - p_l(2nd), in [0, 1]", (0.0, 1.0, False)
    thresholds = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

    def exits(self, view, layer, num_layers, num_labels):
        top2 = np.partition(view.probs, -2, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0] >= self.threshold


class Patience(StatsRule):
    """PABEE (Zhou et al., NeurIPS 2020): exit once the prediction has stopped changing.

    As PABEE's counter: at each layer l >= 2 the counter grows by one when argmax p_l equals
    argmax p_{l-1} and resets to 0 otherwise; the input exits when the counter reaches ``patience``.
    So it exits at the first layer l whose prediction equals those of the ``patience`` layers before it
    (layers l - P .. l, P + 1 heads, agree): P = 1 exits at the first l >= 2 with pred_l == pred_{l-1},
    and never before layer P + 1.

    For regression (one output per head) two heads agree when their outputs differ by less than
    ``threshold`` (PABEE's regression rule, |z_l - z_{l-1}| < threshold, in label units; None:
    :attr:`default_threshold`); the threshold is read for regression only.
    """

    name = "patience"
    classification_only = False
    #: PABEE's regression thresholds swept (label units; for STS-B's 0-5 score)
    regression_thresholds = (0.5, 0.3, 0.2, 0.1, 0.05)
    default_threshold = 0.1

    def __init__(self, patience: int = 3, threshold: float | None = None) -> None:
        super().__init__()
        self.patience = check_int("patience", patience, minimum=1)
        if threshold is not None:
            threshold = check_threshold(
                "patience", threshold, "|z_l - z_(l-1)| of a regression head, > 0", 0.0, None, True
            )
        self.threshold = threshold

    def exits(self, view, layer, num_layers, num_labels):
        history = view.pred_history  # [B, L, K], zero after l
        same = np.zeros(history.shape[:2], dtype=bool)  # layer j agrees with layer j - 1 (j >= 2)
        if num_labels == 1:  # regression: the values stay within the threshold
            threshold = self.default_threshold if self.threshold is None else self.threshold
            same[:, 1:] = np.abs(history[:, 1:, 0] - history[:, :-1, 0]) < threshold
        else:
            same[:, 1:] = (history[:, 1:] * history[:, :-1]).sum(-1) > 0
        return _run_ends_at(same, layer, self.patience)

    def get_params(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            **({} if self.threshold is None else {"threshold": self.threshold}),
        }

    @classmethod
    def sweep(cls, num_layers: int = 12, num_labels: int = 2) -> list[dict[str, Any]]:
        patiences = range(1, max(num_layers, 2))
        if num_labels == 1:
            return [{"patience": p, "threshold": t} for p in patiences for t in cls.regression_thresholds]
        return [{"patience": p} for p in patiences]


class PCEE(StatsRule):
    """PCEE-BERT (Zhang et al., NAACL Findings 2022): patience over confidence.

    Exit at layer l when H(p_j) / log K < ``threshold`` for each of the ``patience`` layers
    j = l - P + 1 .. l (so never before layer P); P = 1 is FastBERT's normalized-entropy rule.
    """

    name = "pcee"

    def __init__(self, patience: int = 2, threshold: float = 0.3) -> None:
        super().__init__()
        self.patience = check_int("pcee: patience", patience, minimum=1)
        self.threshold = check_threshold(
            "pcee", threshold, "the normalized entropy H(p_l) / log K, in [0, 1]", 0.0, 1.0, False
        )

    def exits(self, view, layer, num_layers, num_labels):
        return _run_ends_at(view.entropy_history < self.threshold, layer, self.patience)

    def get_params(self) -> dict[str, Any]:
        return {"patience": self.patience, "threshold": self.threshold}

    @classmethod
    def sweep(cls, num_layers: int = 12, num_labels: int = 2) -> list[dict[str, Any]]:
        # the whole range of the normalized entropy: stopping at 0.5 (max prob 0.89 on two labels) left
        # the curve at 1.27x on a 12-layer RTE model, and the AUC's straight line to the L x anchor
        # stood in for everything faster (benchmarks/results/rte-mpnet-base)
        taus = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
        return [{"patience": p, "threshold": t} for p in (1, 2, 3) for t in taus]


# calibrated_rule lives in the core (the CLI calibrates rules too); agents.rules re-exports it
from ee_gym.evaluation import RULE_TOLERANCE, calibrated_rule  # noqa: E402, F401
