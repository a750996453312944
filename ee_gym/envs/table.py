"""What an env reads for each (input, layer), held in memory and derived once from a cache.

The cache stores states and logits; the env also needs, at every (input, layer), the head's
probabilities, its prediction, its cross-entropy against the label and whether it is right. They are
computed here once, so that a step is an array lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ee_gym.probabilities import log_softmax, normalized_entropy, softmax
from ee_gym.shapes import ExitShapes

if TYPE_CHECKING:  # the cache module pulls in torch; a table is read without it
    from ee_gym.cache import ExitCache

__all__ = ["ExitTable", "log_softmax", "normalized_entropy", "softmax"]


@dataclass(eq=False)  # identity equality: tables hold arrays (and EnvSpecs compare their kwargs)
class ExitTable(ExitShapes):
    """Per-(input, layer) arrays for one split: N inputs, L layers, d state size, K classes."""

    states: np.ndarray  # [N, L, d] pooled states, float32 or float16
    logits: np.ndarray  # [N, L, K] float32
    labels: np.ndarray  # [N] int64
    memorized: np.ndarray  # [N] int64 memorized layer, 1..L
    task: str = "custom"
    split: str = "train"
    #: tables derived for observation modes, built on first use and shared by every env on this table
    derived: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, num_layers, k = self.logits.shape
        if self.states.shape[:2] != (n, num_layers) or self.labels.shape != (n,):
            raise ValueError(
                f"inconsistent shapes: states {self.states.shape}, logits {self.logits.shape}, "
                f"labels {self.labels.shape}"
            )
        self.logits = np.ascontiguousarray(self.logits, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.memorized = np.asarray(self.memorized, dtype=np.int64)
        self.probs = softmax(self.logits)
        self.predictions = self.logits.argmax(-1)
        self.correct = self.predictions == self.labels[:, None]
        self.cross_entropy = -np.take_along_axis(
            log_softmax(self.logits.astype(np.float64)), self.labels[:, None, None], axis=-1
        )[..., 0]

    @classmethod
    def from_cache(cls, cache: ExitCache) -> ExitTable:
        """Load a cache's arrays into memory (float32 states when they fit in 2 GiB)."""
        states = np.asarray(cache.states)
        if states.nbytes * (4 // states.itemsize) <= 2 * 2**30:
            states = states.astype(np.float32)
        return cls(
            states=np.ascontiguousarray(states),
            logits=np.asarray(cache.logits),
            labels=cache.labels,
            memorized=cache.memorized,
            task=cache.manifest["task"],
            split=cache.manifest["split"],
        )
