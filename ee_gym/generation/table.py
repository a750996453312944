"""The per-token table the generation env replays: one row per generated token, one column per layer.

Built once from :class:`~ee_gym.generation.distill.TokenStates` and the decoder's exit heads. It
carries the attributes that :class:`~ee_gym.envs.ConsistentEEVectorEnv`, REINFORCE, the SB3 policies
and ``agents.evaluate`` read from a classification :class:`~ee_gym.envs.ExitTable` (``states``,
``labels``, ``predictions``, ``correct``, ``cross_entropy``, ``memorized``, ``num_layers``,
``hidden_size``, ``num_inputs``, ``num_labels``, ``task``, ``split``, ``derived``), so those run on it
unchanged: an input is a token, its label the full-depth greedy next token.

It holds no logits (a vocabulary-sized row per layer and token would not fit), so the ``stats`` and
``full`` observation modes are not available; it holds instead what the CALM rules read: the top-1 /
top-2 probability gap of every exit and the cosine similarity of consecutive layers' hidden states.

Observations must lie in the env's [-1, 1] box, and a decoder's final-norm states do not (SmolLM2's
reach 35). ``states`` therefore holds ``tanh(s_l / c)`` with c = 4 x the RMS of the final norm's
weight: the norm leaves each state with unit RMS before that weight, so typical entries map nearly
linearly and only outliers saturate. c depends on the decoder alone, so every table of one decoder,
and the policy acting on live decoding (:class:`~ee_gym.generation.policies.PolicyExit`), share it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ee_gym.generation.decoder import MultiExitDecoder
from ee_gym.generation.distill import TokenStates
from ee_gym.hardness import memorized_layer

#: observation modes a token table can serve (no logits: no ``stats`` or ``full``)
GENERATION_OBS_MODES = ("state", "state+layer", "state+confidence", "state+probe")
#: c = STATE_SCALE_FACTOR x RMS(final norm weight), see the module docstring
STATE_SCALE_FACTOR = 4.0


def observation_scale(decoder: MultiExitDecoder) -> float:
    """c of the module docstring for this decoder."""
    weight = getattr(decoder.backbone.norm, "weight", None)
    rms = 1.0 if weight is None else float(weight.detach().float().pow(2).mean().sqrt())
    return STATE_SCALE_FACTOR * rms


def squash(states: torch.Tensor | np.ndarray, scale: float):
    """tanh(s / c): the observation of final-norm states (torch or numpy, any shape)."""
    if isinstance(states, torch.Tensor):
        return torch.tanh(states.float() / scale)
    return np.tanh(np.asarray(states, dtype=np.float32) / np.float32(scale))


@dataclass
class TokenTable:
    """Per-(token, layer) arrays: N tokens, L layers, d state size, V vocabulary entries."""

    states: np.ndarray  # [N, L, d] float16, tanh(s_l / state_scale)
    labels: np.ndarray  # [N] int64, the full-depth greedy next token
    predictions: np.ndarray  # [N, L] int64, argmax of exit l
    cross_entropy: np.ndarray  # [N, L] float64, -log p_l(label)
    top2_gap: np.ndarray  # [N, L] float32, p_l(1st) - p_l(2nd)
    similarity: np.ndarray  # [N, L] float32, cos(h_l, h_{l-1})
    prompt: np.ndarray  # [N] int64, which prompt the token belongs to
    position: np.ndarray  # [N] int64, its generated position
    vocab_size: int
    state_scale: float
    task: str = "xsum"
    split: str = "train"
    #: tables derived for observation modes, built on first use and shared by every env on this table
    derived: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, num_layers = self.predictions.shape
        shapes = {
            "states": self.states.shape[:2],
            "cross_entropy": self.cross_entropy.shape,
            "top2_gap": self.top2_gap.shape,
            "similarity": self.similarity.shape,
        }
        bad = {k: v for k, v in shapes.items() if v != (n, num_layers)}
        if bad or self.labels.shape != (n,) or self.states.ndim != 3:
            raise ValueError(
                f"inconsistent shapes: predictions {(n, num_layers)}, labels {self.labels.shape}, {bad}"
            )
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.predictions = np.asarray(self.predictions, dtype=np.int64)
        self.cross_entropy = np.asarray(self.cross_entropy, dtype=np.float64)
        self.correct = self.predictions == self.labels[:, None]
        self.memorized = memorized_layer(self.predictions, self.labels)

    # -- the sizes ExitTable has ------------------------------------------------------------------
    @property
    def num_inputs(self) -> int:
        return self.labels.shape[0]

    @property
    def num_layers(self) -> int:
        return self.predictions.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    @property
    def num_labels(self) -> int:
        return int(self.vocab_size)

    @property
    def logits(self) -> np.ndarray:
        raise AttributeError(
            "a token table holds no logits (one vocabulary-sized row per token and layer would not fit): "
            f"use obs_mode {' or '.join(repr(m) for m in GENERATION_OBS_MODES)}"
        )

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        decoder: MultiExitDecoder,
        tokens: TokenStates,
        split: str = "train",
        task: str = "xsum",
        batch_size: int = 64,
        progress: bool = True,
    ) -> TokenTable:
        """Score every exit head of ``decoder`` on every token of ``tokens``."""
        if tokens.num_layers != decoder.num_layers or tokens.hidden_size != decoder.hidden_size:
            raise ValueError(
                f"token states of {tokens.num_layers} layers x {tokens.hidden_size} do not fit this decoder "
                f"({decoder.num_layers} x {decoder.hidden_size})"
            )
        n, num_layers = tokens.num_tokens, tokens.num_layers
        predictions = np.zeros((n, num_layers), dtype=np.int64)
        cross_entropy = np.zeros((n, num_layers), dtype=np.float64)
        gap = np.zeros((n, num_layers), dtype=np.float32)
        targets = torch.from_numpy(tokens.targets)
        bar = tqdm(total=n, desc=f"token table ({split})", unit="token", disable=not progress)
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            states = torch.from_numpy(tokens.states[rows]).to(decoder.device, decoder.dtype)
            for layer in range(1, num_layers + 1):
                log_probs = torch.log_softmax(decoder.head(layer)(states[:, layer - 1]).float(), -1).cpu()
                top2 = log_probs.topk(2, dim=-1)
                predictions[rows, layer - 1] = top2.indices[:, 0].numpy()
                probs = top2.values.exp()
                gap[rows, layer - 1] = (probs[:, 0] - probs[:, 1]).numpy()
                cross_entropy[rows, layer - 1] = (
                    -log_probs.gather(1, targets[rows, None])[:, 0].double().numpy()
                )
            bar.update(rows.stop - rows.start)
        bar.close()
        scale = observation_scale(decoder)
        return cls(
            states=squash(tokens.states, scale).astype(np.float16),
            labels=tokens.targets.copy(),
            predictions=predictions,
            cross_entropy=cross_entropy,
            top2_gap=gap,
            similarity=tokens.similarity.astype(np.float32),
            prompt=tokens.prompt.copy(),
            position=tokens.position.copy(),
            vocab_size=decoder.vocab_size,
            state_scale=scale,
            task=task,
            split=split,
        )

    # -- on disk ----------------------------------------------------------------------------------
    ARRAYS = (
        "states",
        "labels",
        "predictions",
        "cross_entropy",
        "top2_gap",
        "similarity",
        "prompt",
        "position",
    )

    def save(self, path: str | os.PathLike) -> Path:
        """One ``.npz`` file, written beside and renamed (never half-written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        meta = np.array([str(self.vocab_size), repr(self.state_scale), self.task, self.split])
        np.savez(tmp, meta=meta, **{name: getattr(self, name) for name in self.ARRAYS})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenTable:
        """A table written by :meth:`save`."""
        with np.load(path) as data:
            vocab, scale, task, split = data["meta"].tolist()
            arrays = {name: data[name] for name in cls.ARRAYS}
        return cls(**arrays, vocab_size=int(vocab), state_scale=float(scale), task=task, split=split)

    # -- summaries ---------------------------------------------------------------------------------
    def layer_summary(self) -> dict[str, list[float]]:
        """Per layer: mean cross-entropy, top-1 agreement with the full model, mean top-2 gap and
        mean similarity (what a reader needs to see where exits become usable)."""
        return {
            "cross_entropy": self.cross_entropy.mean(0).round(4).tolist(),
            "agreement": self.correct.mean(0).round(4).tolist(),
            "top2_gap": self.top2_gap.mean(0).round(4).tolist(),
            "similarity": self.similarity.mean(0).round(4).tolist(),
        }
