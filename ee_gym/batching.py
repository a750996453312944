"""Tokenise a split once, then serve dynamically padded batches of it.

Training draws batches in a seeded random order; evaluation and cache building walk the split
sorted by length, so that each batch pads only to its own longest row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ee_gym.multiexit import ExitOutput, MultiExitModel
from ee_gym.tasks import Examples

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class TokenizedSplit:
    """Token ids of every row (unpadded) and the labels."""

    encodings: dict[str, list[list[int]]]
    labels: np.ndarray
    max_length: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.encodings["input_ids"]), dtype=np.int64)

    def batch(self, rows: Sequence[int], tokenizer, device: torch.device | str = "cpu") -> dict:
        """Rows ``rows`` padded to their longest, as tensors (``labels`` included)."""
        features = {k: [v[i] for i in rows] for k, v in self.encodings.items()}
        padded = tokenizer.pad(features, return_tensors="pt")
        batch = {k: padded[k].to(device) for k in _MODEL_INPUTS if k in padded}
        batch["labels"] = torch.as_tensor(self.labels[np.asarray(rows)], device=device)
        return batch


def tokenize_examples(examples: Examples, tokenizer, max_length: int) -> TokenizedSplit:
    """Tokenise (and truncate) every row of a split, without padding."""
    encodings = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_length)
    kept = {k: encodings[k] for k in _MODEL_INPUTS if k in encodings}
    labels = np.asarray(examples.labels)  # int64 label ids, or float32 values for regression
    return TokenizedSplit(kept, labels.astype(np.float32 if examples.is_regression else np.int64), max_length)


def length_sorted_batches(split: TokenizedSplit, batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of similar length (longest first, so memory peaks at once)."""
    order = np.argsort(-split.lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shuffled_batches(
    num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[np.ndarray]:
    """A seeded random order cut into batches; with several processes each takes its own share.

    The order depends only on ``seed`` so that a resumed run sees the same batches.
    """
    order = np.random.default_rng(seed).permutation(num_rows)
    step = batch_size * world_size
    batches = [order[i : i + step] for i in range(0, num_rows, step)]
    # every process must take the same number of steps (their gradients meet at each one): a last
    # batch too short to give each process a row is dropped
    return [b[rank::world_size] for b in batches if len(b) >= world_size]


@torch.no_grad()
def iter_exit_outputs(
    model: MultiExitModel, split: TokenizedSplit, batch_size: int = 64, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[np.ndarray, ExitOutput]]:
    """Every exit's state and logits for every row, batch by batch: (row indices, outputs).

    With several processes, process ``rank`` of ``world_size`` takes every ``world_size``-th batch.
    """
    was_training = model.training
    model.eval()
    try:
        for rows in length_sorted_batches(split, batch_size)[rank::world_size]:
            batch = split.batch(rows, model.tokenizer, model.device)
            batch.pop("labels")
            yield rows, model(**batch)
    finally:
        model.train(was_training)


def all_exit_logits(model: MultiExitModel, split: TokenizedSplit, batch_size: int = 64) -> np.ndarray:
    """Logits of every exit for every row, in the split's order: [N, L, K] float32."""
    logits = np.zeros((len(split), model.num_layers, model.num_labels), dtype=np.float32)
    for rows, out in iter_exit_outputs(model, split, batch_size):
        logits[rows] = out.logits.float().cpu().numpy()
    return logits
