"""What an env reads for each (input, layer), held in memory and derived once from a cache.

The cache stores states and logits; the env also needs, at every (input, layer), the head's
probabilities, its prediction, its cross-entropy against the label and whether it is right. They are
computed here once, so that a step is an array lookup.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ee_gym.probabilities import log_softmax, normalized_entropy, softmax
from ee_gym.shapes import ExitShapes
from ee_gym.targets import Target

if TYPE_CHECKING:  # the cache module pulls in torch; a table is read without it
    from ee_gym.cache import ExitCache

__all__ = ["ExitTable", "log_softmax", "normalized_entropy", "softmax"]


@dataclass(eq=False)  # identity equality: tables hold arrays (and EnvSpecs compare their kwargs)
class ExitTable(ExitShapes):
    """Per-(input, layer) arrays for one split: N inputs, L layers, d state size, K classes (K = 1
    for a regression task, whose labels are real numbers: ``target``, read off ``task``)."""

    states: np.ndarray  # [N, L, d] pooled states, float32 or float16
    logits: np.ndarray  # [N, L, K] float32
    labels: np.ndarray  # [N] int64 (regression: float32)
    memorized: np.ndarray  # [N] int64 memorized layer, 1..L
    task: str = "custom"
    split: str = "train"
    #: tables derived for observation modes, built on first use and shared by every env on this table
    derived: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    #: for a cross-fitted table, its folds and fold models (ee_gym.crossfit.CrossFitTable.summary)
    cross_fit: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, num_layers, k = self.logits.shape
        if self.states.shape[:2] != (n, num_layers) or self.labels.shape != (n,):
            raise ValueError(
                f"inconsistent shapes: states {self.states.shape}, logits {self.logits.shape}, "
                f"labels {self.labels.shape}"
            )
        self.target = Target.of_task(self.task)
        self.logits = np.ascontiguousarray(self.logits, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=self.target.label_dtype())
        self.memorized = np.asarray(self.memorized, dtype=np.int64)
        # regression heads have no distribution: probabilities are a classification reading
        self.probs = None if self.target.regression else softmax(self.logits)
        self.predictions = self.target.predictions(self.logits)
        self.correct = self.target.correct(self.predictions, self.labels)
        # the exit's loss: cross-entropy, or squared error for regression (what the rewards pay)
        self.cross_entropy = self.target.losses(self.logits, self.labels)

    def with_loss_weights(self, weights: np.ndarray) -> ExitTable:
        """This table with each input's exit losses (what the rewards pay) scaled by ``weights`` [N];
        every other array, and the derived observations, shared."""
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.num_inputs,):
            raise ValueError(f"one weight per input: {self.num_inputs}, got shape {weights.shape}")
        weighted = copy.copy(self)
        weighted.cross_entropy = self.cross_entropy * weights[:, None]
        return weighted

    def class_balanced(self) -> ExitTable:
        """:meth:`with_loss_weights` at N / (K n_y) per input of class y (``Target.balanced_weights``)."""
        return self.with_loss_weights(self.target.balanced_weights(self.labels, self.num_labels))

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

    @classmethod
    def concatenate(cls, tables: list[ExitTable], split: str) -> ExitTable:
        """One table holding the rows of ``tables`` in order (same layers, labels and state size)."""
        shapes = {(t.num_layers, t.num_labels, t.hidden_size) for t in tables}
        if len(shapes) != 1:
            raise ValueError(f"cannot join tables of different shapes (L, K, d): {sorted(shapes)}")
        return cls(
            states=np.concatenate([t.states for t in tables]),
            logits=np.concatenate([t.logits for t in tables]),
            labels=np.concatenate([t.labels for t in tables]),
            memorized=np.concatenate([t.memorized for t in tables]),
            task=tables[0].task,
            split=split,
        )

    def head(self, n: int) -> ExitTable:
        """The first ``n`` rows (a new table; the derived arrays are rebuilt on use)."""
        return self.select(np.arange(min(n, self.num_inputs)))

    def select(self, rows: np.ndarray, split: str | None = None) -> ExitTable:
        """The rows ``rows`` (integer positions) as a new table, named ``split`` (default: this one's)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ExitTable(
            self.states[rows], self.logits[rows], self.labels[rows], self.memorized[rows], self.task,
            self.split if split is None else split, cross_fit=self.cross_fit,
        )  # fmt: skip
