"""The memorized layer against hand-worked cases (docs/method.md, "The memorized layer")."""

import numpy as np
import pytest

from ee_gym.hardness import memorized_layer, memorized_layer_from_logits

L = 12


def _predictions(wrong_layers: set[int], label: int = 1) -> np.ndarray:
    return np.array([[1 - label if layer in wrong_layers else label for layer in range(1, L + 1)]])


@pytest.mark.parametrize(
    ("wrong", "expected"),
    [
        (set(), 1),  # all right -> 1
        ({1, 2, 3, 4, 5}, 6),  # wrong at layers 1-5 only -> 6
        ({4}, 5),  # wrong only at layer 4 -> 5
        ({L}, L),  # last layer wrong -> L
        (set(range(1, L + 1)), L),  # all wrong -> L
        ({L - 1}, L),  # right only at the last layer -> L
        ({1, 7}, 8),
    ],
)
def test_hand_worked_cases(wrong, expected):
    assert memorized_layer(_predictions(wrong), np.array([1])).tolist() == [expected]


def test_batched_and_from_logits():
    predictions = np.concatenate([_predictions(set()), _predictions({4}), _predictions({L})])
    labels = np.array([1, 1, 1])
    assert memorized_layer(predictions, labels).tolist() == [1, 5, L]
    logits = np.stack([1 - predictions, predictions], axis=-1).astype(np.float32)  # argmax = prediction
    assert memorized_layer_from_logits(logits, labels).tolist() == [1, 5, L]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        memorized_layer(np.zeros((3, 4)), np.zeros(2))
