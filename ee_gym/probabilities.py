"""Numpy probability helpers that the envs, the observation modes and the rules all read.

Kept in one light module (numpy only) so that :mod:`ee_gym.observations` and the env tables share one
definition of softmax, entropy and the top-2 gap without importing torch or each other.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """H(p) / log K in [0, 1] (natural log; FastBERT's uncertainty)."""
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(-1)
    return np.clip(entropy / np.log(probs.shape[-1]), 0.0, 1.0)


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """p(1st) - p(2nd) of the softmax of ``logits`` [..., K] -> [...] float32 (0 when K = 1)."""
    probs = softmax(np.asarray(logits, dtype=np.float32))
    if probs.shape[-1] < 2:
        return np.zeros(probs.shape[:-1], dtype=np.float32)
    top2 = -np.partition(-probs, 1, axis=-1)[..., :2]
    return (top2[..., 0] - top2[..., 1]).astype(np.float32)
