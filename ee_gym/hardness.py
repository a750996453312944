"""The memorized layer m(x): how hard an input is for the stage-1 model (docs/method.md, "The memorized layer").

m(x) is the smallest layer l (1-based) such that every head from l to L predicts the gold label;
m(x) = L when the last head is wrong. Small m: easy input; m = L: hard input.
"""

from __future__ import annotations

import numpy as np


def memorized_layer(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """m(x) for each row, from per-layer predictions [N, L] and gold labels [N]; int64 in 1..L."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 2 or labels.shape != predictions.shape[:1]:
        raise ValueError(
            f"expected predictions [N, L] and labels [N], got {predictions.shape} and {labels.shape}"
        )
    num_layers = predictions.shape[1]
    correct = predictions == labels[:, None]
    # Length of the run of correct heads that ends at layer L.
    suffix_correct = np.logical_and.accumulate(correct[:, ::-1], axis=1).sum(axis=1)
    return np.where(suffix_correct > 0, num_layers - suffix_correct + 1, num_layers).astype(np.int64)


def memorized_layer_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """m(x) from per-layer logits [N, L, K]."""
    return memorized_layer(np.asarray(logits).argmax(-1), labels)
