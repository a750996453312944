"""Exit policies for generation: callables for ``MultiExitDecoder.generate(exit_fn=...)``.

Each is called after every layer l < L of the token being decoded, with the
:class:`~ee_gym.generation.decoder.LayerView` of the whole batch, and returns one bool per row (True:
the row's token exits at l; decisions for rows that already exited are ignored by the decoder):

    StaticExit(k)                 l >= k                                          ("layer-k" rows)
    ConfidenceExit(lambda)        p_l(1st) - p_l(2nd) >= lambda, p_l = softmax of exit l's logits   (CALM)
    StateSimilarityExit(lambda)   cos(h_l, h_{l-1}) >= lambda, h_0 the token's embedding            (CALM)
    ProbeExit(probe, lambda)      a learned probe's P(exit l is right | s_l) >= lambda              (CALM)
    CandidateConfidenceExit       the confidence rule over k candidate tokens (chosen once per token)
                                  (the three rules take ``min_layer``: no exit before that layer)
    PolicyExit(policy)            a learned exit policy (ConsistentEE: REINFORCE trained on the token
                                  env) acting on the state of layer l (and, in the state+confidence
                                  observation mode, exit l's top-2 gap), as the env showed it
                                  (REINFORCE's own ``min_layer`` guards it the same way)
    OracleExit()                  reference, not deployable: the first layer whose exit says the token
                                  the full model would say next (it decodes every token twice)

The rules also answer on a :class:`~ee_gym.generation.table.TokenTable` (``table_exit_layers``): the
exit each table token would take, from the same quantities the table holds, with no decoding. On the
table every token follows the full model's own history, where live decoding follows the early-exited
one, so the table predicts live behaviour only roughly; it is cheap enough to place thresholds.

Cost note: the confidence rule needs exit l's full vocabulary softmax at every layer, i.e. one LM-head
product per layer (for SmolLM2-135M the LM head reads as many weights as 8 of its layers), which
wall-clock timings show; so does a learned policy in the state+confidence mode. The similarity rule and
a learned policy in the state modes read the states only.
"""

from __future__ import annotations

import math
import types
from typing import Any, ClassVar

import numpy as np
import torch

from ee_gym.generation.confidence import ConfidenceProbe
from ee_gym.generation.decoder import DecodeState, LayerView, MultiExitDecoder, probability_gap
from ee_gym.generation.table import TokenTable, observation_scale
from ee_gym.observations import OBS_MODE_REGISTRY, STATE_OBS_MODES, ObservationEncoder
from ee_gym.policy import decides_at


def _first_exit(flags: np.ndarray, min_layer: int = 1) -> np.ndarray:
    """[N] first layer (1-based) whose flag is set among layers min_layer..L-1, else L, for flags [N, L]."""
    flags = np.asarray(flags, dtype=bool).copy()
    flags[:, : max(int(min_layer), 1) - 1] = False
    flags[:, -1] = True  # layer L exits whatever the rule says
    return flags.argmax(1) + 1


def _check_min_layer(min_layer: int) -> int:
    if int(min_layer) < 1:
        raise ValueError(
            f"min_layer must be 1 or more (1: exits allowed from the first layer), got {min_layer}"
        )
    return int(min_layer)


class ThresholdRule:
    """What the threshold rules share: exit at the first probed layer >= ``min_layer`` whose signal
    (``signal`` live, ``table_signal`` on a table) reaches ``threshold``.

    ``min_layer`` guards against shallow exits, whose propagated keys and values fill every deeper
    layer's cache from a state far from what those layers would compute (see
    ``benchmarks/results/xsum-finetuned-heads``). Below it the signal is not computed at all.
    ``every`` probes only layers min_layer, min_layer + every, ...: a costly signal read at a few
    layers instead of all (``every=1``: each layer).
    """

    def __init__(self, threshold: float, min_layer: int = 1, every: int = 1):
        self.threshold, self.min_layer = float(threshold), _check_min_layer(min_layer)
        if int(every) < 1:
            raise ValueError(f"every must be 1 or more (1: probe each layer), got {every}")
        self.every = int(every)

    def probes(self, layer: int) -> bool:
        """Whether the rule reads its signal at ``layer``."""
        return bool(decides_at(layer, self.min_layer, self.every))

    def signal(self, view: LayerView) -> torch.Tensor:
        """[B] the rule's signal at this layer."""
        raise NotImplementedError

    def table_signal(self, table: TokenTable) -> np.ndarray:
        """[N, L] the rule's signal at every layer of every table token."""
        raise NotImplementedError

    def __call__(self, view: LayerView) -> torch.Tensor:
        if not self.probes(view.layer):  # no signal where no exit is allowed or none is read
            return torch.zeros(view.batch_size, dtype=torch.bool)
        return (self.signal(view) >= self.threshold).cpu() & view.active.cpu()

    def table_exit_layers(self, table: TokenTable) -> np.ndarray:
        flags = self.table_signal(table) >= np.float32(self.threshold)
        probed = np.array([self.probes(layer) for layer in range(1, flags.shape[1] + 1)])
        return _first_exit(flags & probed, self.min_layer)

    def get_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"threshold": self.threshold}
        if self.min_layer > 1:
            params["min_layer"] = self.min_layer
        if self.every > 1:
            params["every"] = self.every
        return params


class GenerationExit:
    """Base of the generation exit policies (see the module docstring).

    ``reads`` declares what a decision at one layer reads (:data:`~ee_gym.generation.costs.READS`):
    ``nothing``, ``state`` (the hidden state; no LM-head product), ``candidates`` (exit l's logits on a
    few tokens) or ``softmax`` (exit l's full vocabulary product). The decoder runs the full head once
    per token at the exit, and at other layers only for rules that read ``softmax``.
    """

    name: ClassVar[str] = "exit"
    reads: ClassVar[str] = "state"

    def __call__(self, view: LayerView) -> torch.Tensor:
        raise NotImplementedError

    def table_exit_layers(self, table: TokenTable) -> np.ndarray:
        """[N] the exit layer (1..L) of every table token under this rule."""
        raise NotImplementedError

    def get_params(self) -> dict[str, Any]:
        return {}

    @property
    def label(self) -> str:
        """A short name with the parameters, for tables."""
        params = ", ".join(f"{k}={v}" for k, v in self.get_params().items())
        return f"{self.name}({params})" if params else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"


class StaticExit(GenerationExit):
    """Every token exits at layer ``layer`` (a layer beyond L exits at L)."""

    name = "static"
    reads = "nothing"

    def __init__(self, layer: int):
        if int(layer) < 1:
            raise ValueError(f"static: layer must be 1 or more, got {layer}")
        self.layer = int(layer)

    def __call__(self, view: LayerView) -> torch.Tensor:
        return torch.full((view.batch_size,), view.layer >= self.layer, dtype=torch.bool)

    def table_exit_layers(self, table: TokenTable) -> np.ndarray:
        return np.full(table.num_inputs, min(self.layer, table.num_layers), dtype=np.int64)

    def get_params(self) -> dict[str, Any]:
        return {"layer": self.layer}


class ConfidenceExit(ThresholdRule, GenerationExit):
    """CALM's softmax confidence: exit when p_l(1st) - p_l(2nd) >= ``threshold`` (at l >= ``min_layer``)."""

    name = "calm-confidence"
    reads = "softmax"

    def __init__(self, threshold: float = 0.9, min_layer: int = 1, every: int = 1):
        super().__init__(threshold, min_layer, every)

    def signal(self, view: LayerView) -> torch.Tensor:
        return view.confidence

    def table_signal(self, table: TokenTable) -> np.ndarray:
        return table.top2_gap


class StateSimilarityExit(ThresholdRule, GenerationExit):
    """CALM's state propagation signal: exit when cos(h_l, h_{l-1}) >= ``threshold`` (at l >=
    ``min_layer``)."""

    name = "calm-similarity"
    reads = "state"

    def __init__(self, threshold: float = 0.975, min_layer: int = 1, every: int = 1):
        super().__init__(threshold, min_layer, every)

    def signal(self, view: LayerView) -> torch.Tensor:
        return view.similarity

    def table_signal(self, table: TokenTable) -> np.ndarray:
        return table.similarity


class ProbeExit(ThresholdRule, GenerationExit):
    """CALM's learned confidence measure: exit when a :class:`~ee_gym.generation.confidence.ConfidenceProbe`
    on tanh(s_l / c) predicts that exit l is right with probability >= ``threshold`` (at l >=
    ``min_layer``). It reads the state: d multiply-adds per decision, no LM-head product."""

    name = "probe"
    reads = "state"

    def __init__(self, probe: ConfidenceProbe, decoder: MultiExitDecoder, threshold: float = 0.9,
                 min_layer: int = 1, every: int = 1):  # fmt: skip
        if (probe.num_layers, probe.hidden_size) != (decoder.num_layers, decoder.hidden_size):
            raise ValueError(
                f"the probe reads {probe.num_layers} layers x {probe.hidden_size}, the decoder has "
                f"{decoder.num_layers} x {decoder.hidden_size}: fit one on this decoder's token table"
            )
        super().__init__(threshold, min_layer, every)
        self.probe, self.scale = probe, observation_scale(decoder)

    def _scores(self, view: LayerView) -> np.ndarray:
        return self.probe.numpy_scores(view.squashed_states(self.scale), view.layer)

    def signal(self, view: LayerView) -> torch.Tensor:
        return torch.from_numpy(self._scores(view))

    def __call__(self, view: LayerView) -> torch.Tensor:  # ThresholdRule's, in numpy: no torch op per layer
        if not self.probes(view.layer):
            return torch.zeros(view.batch_size, dtype=torch.bool)
        return torch.from_numpy((self._scores(view) >= self.threshold) & view.active.cpu().numpy())

    def table_signal(self, table: TokenTable) -> np.ndarray:
        return self.probe.table_scores(table)


class CandidateConfidenceExit(ThresholdRule, GenerationExit):
    """CALM's softmax confidence over a few candidate tokens instead of the whole vocabulary: exit
    when p_l(1st) - p_l(2nd) >= ``threshold``, p_l the softmax of the LM head's rows of ``k``
    candidates applied to s_l (at l >= ``min_layer``, every ``every`` layers).

    The candidates are chosen once per token, at its first probe: the top ``k`` of a rank-``rank``
    approximation of the LM head (its truncated SVD, W ~ Q P^T) on that layer's state, V x rank
    multiply-adds. Each probe then costs k x d (for SmolLM2, k = 32: 18 thousand against the 28
    million of the full softmax). On a table, the states are read back from the squashed
    observations (atanh), which is exact but for float16 rounding near saturation: thresholds placed
    there are close to, not exactly, what live decoding reaches.
    """

    name = "candidate-confidence"
    reads = "candidates"

    def __init__(self, decoder: MultiExitDecoder, threshold: float = 0.9, min_layer: int = 1, every: int = 1,
                 k: int = 32, rank: int = 64):  # fmt: skip
        super().__init__(threshold, min_layer, every)
        if int(k) < 2 or int(rank) < 1:
            raise ValueError(
                f"candidate confidence needs k >= 2 candidates and rank >= 1, got k={k}, rank={rank}"
            )
        weight = decoder.model.get_output_embeddings().weight.detach().float()  # [V, d]
        self.k, self.rank = min(int(k), weight.shape[0]), min(int(rank), min(weight.shape))
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        self.weight = weight
        self.left = u[:, : self.rank].contiguous()  # Q [V, r]
        self.right = (vh[: self.rank].T * sigma[: self.rank]).contiguous()  # P [d, r]
        self.scale = observation_scale(decoder)
        self._candidates: torch.Tensor | None = None  # [B, k] of the token being decoded
        self._rows: np.ndarray | None = None  # [B, k, d] their LM-head rows

    def candidates(self, states: torch.Tensor) -> torch.Tensor:
        """[B, k] the top-k tokens of the low-rank head on states [B, d]."""
        return ((states.float() @ self.right) @ self.left.T).topk(self.k, dim=-1).indices

    def gap(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B] top-1 minus top-2 probability of the softmax over the candidates' logits."""
        logits = torch.einsum("bd,bkd->bk", states.float(), self.weight[candidates])
        return probability_gap(logits)

    def signal(self, view: LayerView) -> torch.Tensor:
        # numpy from the states on: per layer one [B, k] product on the token's cached candidate rows
        states = view.numpy_states
        if view.layer == self.min_layer or self._rows is None or len(self._rows) != len(states):
            self._candidates = self.candidates(torch.from_numpy(states))  # a new token: its first probe
            self._rows = self.weight[self._candidates].numpy()  # [B, k, d]
        logits = np.einsum("bd,bkd->bk", states, self._rows)
        probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        top2 = np.partition(probabilities, -2, axis=-1)[:, -2:]
        return torch.from_numpy(top2[:, 1] - top2[:, 0])

    def table_signal(self, table: TokenTable) -> np.ndarray:
        out = np.zeros(table.states.shape[:2], dtype=np.float32)
        if self.min_layer >= table.num_layers:  # no layer below L is probed
            return out
        for start in range(0, table.num_inputs, 256):
            rows = slice(start, start + 256)
            squashed = torch.from_numpy(np.asarray(table.states[rows], dtype=np.float32)).clamp(
                -0.9995, 0.9995
            )
            states = torch.atanh(squashed) * table.state_scale  # [b, L, d], the final-norm states
            picked = self.candidates(states[:, self.min_layer - 1])
            for layer in range(self.min_layer, table.num_layers):
                out[rows, layer - 1] = self.gap(states[:, layer - 1], picked).numpy()
        return out

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "k": self.k, "rank": self.rank}


class PolicyExit(GenerationExit):
    """A learned exit policy (any ``agents`` policy of obs mode ``state``, ``state+layer`` or
    ``state+confidence``, e.g. the ``Reinforce`` of ConsistentEE trained on ``ConsistentEE-XSum-v0``)
    deciding from layer l's state.

    The observation is built as the token env builds it: ``tanh(s_l / c)`` (c of
    :func:`~ee_gym.generation.table.observation_scale`, read off the decoder), then in
    ``state+confidence`` exit l's top-2 gap (which costs one LM-head product per layer, as the
    confidence rule does), then in both ``+`` modes the one-hot of l. ``deterministic=True`` is the
    paper's inference rule. Below the policy's ``min_layer`` (``agents.make("reinforce", min_layer=m)``),
    and between the layers it probes (``every=k``: every k-th from ``min_layer``), no observation is
    built: the policy would continue there anyway, so such a layer costs one comparison.
    """

    name = "consistentee"

    def __init__(
        self,
        policy: Any,
        decoder: MultiExitDecoder,
        deterministic: bool = True,
        label: str | None = None,
        probe: ConfidenceProbe | None = None,
    ):
        obs_mode = getattr(policy, "obs_mode", None)
        kind = OBS_MODE_REGISTRY.get(obs_mode) if isinstance(obs_mode, str) else None
        if kind is None or kind.uses_stats:
            raise ValueError(
                f"a generation exit policy reads the state: its obs_mode must be one of "
                f"{', '.join(STATE_OBS_MODES)}, not {obs_mode!r}"
            )
        if not getattr(policy, "deployable", True):
            raise ValueError("this policy is not deployable (it reads labels or later layers)")
        if (kind.confidence_signal == "probe") != (probe is not None):
            raise ValueError(
                "obs_mode 'state+probe' needs the probe the policy was trained with (probe=env.unwrapped.probe)"
                if probe is None
                else f"probe= is read by obs_mode 'state+probe' only, not {obs_mode!r}"
            )
        self.policy, self.obs_mode, self.deterministic, self.probe = policy, obs_mode, deterministic, probe
        self.min_layer = int(getattr(policy, "min_layer", 1))  # the policy's own guard, if it has one
        self.every = int(getattr(policy, "every", 1))  # and its probing interval
        self.num_layers, self.hidden_size = decoder.num_layers, decoder.hidden_size
        self.encoder = ObservationEncoder(obs_mode, self.num_layers, self.hidden_size, decoder.vocab_size)
        self.scale = observation_scale(decoder)
        self._label = label
        sizes = dict(num_layers=self.num_layers, num_labels=decoder.vocab_size, hidden_size=self.hidden_size)
        env = types.SimpleNamespace(**sizes, table=types.SimpleNamespace(**sizes), encoder=self.encoder)
        policy.bind(env)
        #: the policy's exits_at_layer(states, layer) where it has one and the observation is the state
        #: and the layer one-hot (deterministic): the decision without building the observation (None:
        #: act on the observation, the env's path)
        plain = deterministic and self.encoder.kind.confidence_signal is None
        self.state_path = getattr(policy, "exits_at_layer", None) if plain else None

    def probes(self, layer: int) -> bool:
        """Whether the policy reads the state at ``layer`` (the last layer exits without asking)."""
        return layer < self.num_layers and bool(decides_at(layer, self.min_layer, self.every))

    @property
    def reads(self) -> str:  # type: ignore[override]
        return "softmax" if self.encoder.kind.confidence_signal == "top2_gap" else "state"

    def observations(self, view: LayerView) -> np.ndarray:
        """The env's observations of the batch at this layer (numpy from the states on: a decision
        is a few small products, which torch's per-call overhead would dominate)."""
        squashed = view.squashed_states(self.scale)
        signal = self.encoder.kind.confidence_signal
        if signal == "top2_gap":
            confidence = view.confidence.cpu().numpy()
        elif signal == "probe":
            confidence = self.probe.numpy_scores(squashed, view.layer)
        else:
            confidence = None
        return self.encoder.join(squashed, view.layer, confidence)

    def __call__(self, view: LayerView) -> torch.Tensor:
        if not self.probes(view.layer):  # the policy would continue: spare the observation (and head product)
            return np.zeros(view.batch_size, dtype=bool)  # numpy, as the state path answers
        if self.state_path is not None:  # the state is the layer network's whole input: no observation built
            return self.state_path(view.squashed_states(self.scale), view.layer)  # numpy: see step
        actions = self.policy.act(self.observations(view), deterministic=self.deterministic)
        return torch.from_numpy(np.asarray(actions).reshape(view.batch_size) == 1)

    def get_params(self) -> dict[str, Any]:
        return {"policy": getattr(self.policy, "name", type(self.policy).__name__)}

    @property
    def label(self) -> str:
        return self._label or super().label


def set_exit_prior(policy: Any, probability: float) -> None:
    """Start every per-layer network of a REINFORCE policy (``agents.make("reinforce")``, bound or
    trained, so that it has its network) at exit probability ``probability``: the bias of each
    network's output unit is set to logit(p).

    Why generation needs it: the per-layer networks start near p_l = 0.5, so sampled episodes end in
    the first few layers (a token reaches layer 10 of 30 with probability 0.5^9 = 0.2%) and the
    rewards of the deep layers, where a decoder's exits become usable, are never seen: REINFORCE
    settles on exiting at layer 1 or 2. With p = 1/L a sampled token still reaches the last layer
    with probability (1 - 1/L)^(L-1) = 37% (L = 30), and every depth is explored.
    """
    net = getattr(policy, "net", None)
    if net is None or not hasattr(net, "layers"):
        raise ValueError("the policy has no per-layer network yet: call policy.bind(env) first")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"an exit probability is in (0, 1), got {probability}")
    with torch.no_grad():
        for layer_net in net.layers:
            layer_net[-1].bias.fill_(math.log(probability / (1.0 - probability)))


def threshold_for_speedup(
    values: np.ndarray, speedup: float, num_layers: int | None = None, min_layer: int = 1, every: int = 1
) -> float:
    """The largest threshold lambda (the most cautious) whose rule "exit at the first layer >=
    ``min_layer`` with value >= lambda" still gives at least ``speedup`` = L / mean exit layer on
    per-layer values [N, L].

    The mean exit layer grows with lambda, so a bisection over the values themselves finds it. Used to
    place the CALM rules' thresholds on the policy split's table, never on evaluation data.
    """
    values = np.asarray(values, dtype=np.float32)
    num_layers = num_layers or values.shape[1]
    if not 1 <= int(min_layer) < num_layers:
        raise ValueError(
            f"min_layer must be in 1..{num_layers - 1} (layer {num_layers} always exits), got {min_layer}"
        )
    probed = decides_at(np.arange(1, values.shape[1] + 1), int(min_layer), int(every))  # the layers read
    candidates = np.unique(values[:, int(min_layer) - 1 : -1])
    lo, hi = 0, len(candidates) - 1
    best = float(candidates[0])
    while lo <= hi:  # the largest candidate that still reaches the speed-up
        mid = (lo + hi) // 2
        mean = _first_exit((values >= candidates[mid]) & probed, min_layer).mean()
        if num_layers / mean >= speedup:
            best, lo = float(candidates[mid]), mid + 1
        else:
            hi = mid - 1
    return best


class OracleExit(GenerationExit):
    """Reference, not deployable: each token exits at the first layer >= ``min_layer`` whose head's
    top-1 is the token the full model would say next, given the text and the cache so far.

    Before each token (``prepare_step``, which the decoder calls first) it decodes the token at full
    depth on a copy of the decode state, takes the full model's greedy token, and reads the heads from
    ``min_layer`` up until each row's agrees. Every emitted token is then the full model's own choice
    for that history: what remains between this and full depth is state propagation alone (the
    skipped layers' keys and values), so it shows what perfect exit decisions reach. It costs a second
    full-depth pass and up to L - 1 LM-head products per token.
    """

    name = "oracle"
    deployable = False
    reads = "softmax"  # and a full-depth look ahead

    def __init__(self, min_layer: int = 1):
        self.min_layer = _check_min_layer(min_layer)
        self._exit_layers: torch.Tensor | None = None

    @torch.no_grad()
    def prepare_step(self, decoder: MultiExitDecoder, state: DecodeState, input_ids: torch.Tensor) -> None:
        full, hidden = decoder.step_with_states(state.clone(), input_ids)
        target = full.logits.argmax(-1)
        exit_layers = torch.full_like(target, decoder.num_layers)
        undecided = torch.ones_like(target, dtype=torch.bool)
        for layer in range(self.min_layer, decoder.num_layers):
            rows = undecided.nonzero()[:, 0]
            if rows.numel() == 0:
                break
            said = decoder.exit_logits(layer, hidden[rows, layer]).argmax(-1)
            agree = rows[said == target[rows]]
            exit_layers[agree] = layer
            undecided[agree] = False
        self._exit_layers = exit_layers

    def __call__(self, view: LayerView) -> torch.Tensor:
        if self._exit_layers is None:
            raise RuntimeError(
                "OracleExit decides in prepare_step: use it through MultiExitDecoder.step/generate"
            )
        return (view.layer >= self._exit_layers).cpu()

    def table_exit_layers(self, table: TokenTable) -> np.ndarray:
        correct = np.asarray(table.correct).copy()
        correct[:, : self.min_layer - 1] = False
        return _first_exit(correct)

    def get_params(self) -> dict[str, Any]:
        return {"min_layer": self.min_layer}
