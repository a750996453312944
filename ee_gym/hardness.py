"""The memorized layer m(x): how hard an input is for the stage-1 model (docs/method.md, "The memorized layer").

m(x) is the smallest layer l (1-based) such that every head from l to L predicts the gold label
(regression: stays within the task's tolerance of it, :mod:`ee_gym.targets`); m(x) = L when the last
head is wrong. Small m: easy input; m = L: hard input.
"""

from __future__ import annotations

import numpy as np

from ee_gym.targets import Target


def memorized_layer(predictions: np.ndarray, labels: np.ndarray, target: Target | None = None) -> np.ndarray:
    """m(x) for each row, from per-layer predictions [N, L] and gold labels [N]; int64 in 1..L.

    ``target`` says what "right" is (:class:`~ee_gym.targets.Target`; default classification:
    the prediction equals the label; regression: within the task's tolerance of it)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 2 or labels.shape != predictions.shape[:1]:
        raise ValueError(
            f"expected predictions [N, L] and labels [N], got {predictions.shape} and {labels.shape}"
        )
    num_layers = predictions.shape[1]
    correct = (target or Target()).correct(predictions, labels)
    # Length of the run of correct heads that ends at layer L.
    suffix_correct = np.logical_and.accumulate(correct[:, ::-1], axis=1).sum(axis=1)
    return np.where(suffix_correct > 0, num_layers - suffix_correct + 1, num_layers).astype(np.int64)


def memorized_layer_from_logits(
    logits: np.ndarray, labels: np.ndarray, target: Target | None = None
) -> np.ndarray:
    """m(x) from per-layer head outputs [N, L, K] (K = 1 for regression)."""
    target = target or Target()
    return memorized_layer(target.predictions(logits), labels, target)
