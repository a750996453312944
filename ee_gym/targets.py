"""What an exit head's output means: a class (classification) or a number (regression).

The one place for the arithmetic that differs between the two task kinds (``TaskSpec.kind``):

================  ================================  ==========================================
                  classification (K classes)        regression (one output)
================  ================================  ==========================================
prediction        argmax_k z_l                      z_l (the head's single output)
loss              cross-entropy                     squared error (z_l - y)^2
right             prediction == label               |prediction - label| <= tolerance
================  ================================  ==========================================

The loss takes cross-entropy's place everywhere it is read: stage 1's depth-weighted loss, the
hardness reward (``R = -loss - alpha * t * (1 - m / L)``), stage 3's loss at the policy's exit. The
memorized layer m(x) (:mod:`ee_gym.hardness`) is the smallest l from which every head is right,
with "right" as above, so for regression it is the smallest l from which every head stays within
the task's tolerance of the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ee_gym.probabilities import log_softmax


def head_predictions(logits: np.ndarray) -> np.ndarray:
    """Predictions [...] from head outputs [..., K]: the value of a one-output (regression) head as
    float32, else the label id of the largest logit."""
    logits = np.asarray(logits)
    return logits[..., 0].astype(np.float32) if logits.shape[-1] == 1 else logits.argmax(-1)


@dataclass(frozen=True)
class Target:
    """A task's kind as the heads see it: ``tolerance`` None for classification, else regression."""

    tolerance: float | None = None

    @property
    def regression(self) -> bool:
        return self.tolerance is not None

    @classmethod
    def of_task(cls, task: Any) -> Target:
        """The target of a task name or :class:`~ee_gym.tasks.TaskSpec` (classification for a name
        no task is registered under, as for the tables tests make)."""
        from ee_gym.tasks import UnknownTaskError, get_task

        try:
            spec = get_task(task)
        except (UnknownTaskError, TypeError):
            return cls()
        return cls(spec.tolerance if spec.is_regression else None)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Predictions [...] from head outputs [..., K]: label ids (int64) or values (float32)."""
        logits = np.asarray(logits)
        if self.regression and logits.shape[-1] != 1:
            raise ValueError(f"a regression head has one output, these have {logits.shape[-1]}")
        return head_predictions(logits)

    def losses(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[N, L] float64: each head's loss against its input's label (labels [N])."""
        logits = np.asarray(logits, dtype=np.float64)
        labels = np.asarray(labels)
        if self.regression:
            return (logits[..., 0] - labels[:, None].astype(np.float64)) ** 2
        return -np.take_along_axis(log_softmax(logits), labels.astype(np.int64)[:, None, None], axis=-1)[
            ..., 0
        ]

    def correct(self, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Whether each prediction [N, ...] is right for its input's label [N] (bool, same shape)."""
        predictions = np.asarray(predictions)
        labels = np.asarray(labels).reshape(-1, *([1] * (predictions.ndim - 1)))
        if self.regression:
            return np.abs(predictions.astype(np.float64) - labels.astype(np.float64)) <= self.tolerance
        return predictions == labels

    def balanced_weights(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        """[N] float64: N / (K n_y) for each input of class y (sklearn's "balanced"; mean 1 over the
        inputs), so that each class's inputs weigh the same in total. Classification only."""
        if self.regression:
            raise ValueError("class-balanced loss weights need classes; a regression task has none")
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
        present = int((counts > 0).sum())
        return len(labels) / (present * counts[labels])

    def label_dtype(self) -> type:
        return np.float32 if self.regression else np.int64
