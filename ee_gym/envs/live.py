"""The live encoder source: a multi-exit model run one layer at a time, one input per episode.

``gym.make(id, mode="live")`` replays nothing: exiting early really skips the remaining layers. Kept
apart from :mod:`ee_gym.envs.classification` because it needs torch and the model, which a cached env
never loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ee_gym.batching import tokenize_examples
from ee_gym.envs.base import LayerSource, exit_record
from ee_gym.hardness import memorized_layer
from ee_gym.multiexit import MultiExitModel
from ee_gym.probabilities import log_softmax, softmax
from ee_gym.tasks import load_split


class LiveEncoderSource(LayerSource):
    """Runs the model layer by layer for one input at a time (live mode)."""

    def __init__(self, model: MultiExitModel, task: str, split: str, data_dir, max_inputs, max_length):
        self.model = model.eval()
        self.split = tokenize_examples(
            load_split(task, split, data_dir, max_inputs), model.tokenizer, max_length
        )
        self.num_layers, self.hidden_size = model.num_layers, model.hidden_size
        self.num_labels, self.num_inputs = model.num_labels, len(self.split)
        self._memorized: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.split)

    @torch.no_grad()
    def begin(self, index: int) -> None:
        self.index = index
        self.label = int(self.split.labels[index])
        batch = self.split.batch([index], self.model.tokenizer, self.model.device)
        batch.pop("labels")
        self._batch = batch
        self._state = self.model.start(**batch)
        self._states: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []
        self.advance(1)

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        self._state = self.model.advance(self._state)
        out = self.model.exit_outputs(self._state)
        self._states.append(out.states[0].float().cpu().numpy())
        self._logits.append(out.logits[0].float().cpu().numpy())

    @property
    def state(self) -> np.ndarray:
        return self._states[-1]

    @property
    def logits(self) -> np.ndarray:
        return np.stack(self._logits)

    @torch.no_grad()
    def memorized(self) -> int:
        """m(x) needs every head's prediction: one full pass per input, remembered."""
        if self.index not in self._memorized:
            logits = self.model(**self._batch).logits[0].argmax(-1).cpu().numpy()
            self._memorized[self.index] = int(memorized_layer(logits[None], np.array([self.label]))[0])
        return self._memorized[self.index]

    # -- what the env reads ---------------------------------------------------------------------
    def observation(self, index: int, layer: int) -> Any:
        state = self.state if self.encoder.uses_state else None
        return self.encoder.single(state, self.logits)

    def exit_info(self, index: int, layer: int) -> dict[str, Any]:
        logits = self._logits[-1].astype(np.float64)
        cross_entropy = float(-log_softmax(logits)[self.label])
        return exit_record(index, layer, int(logits.argmax()), self.label, self.memorized(), cross_entropy)

    def describe(self, index: int, layer: int) -> str:
        probs = softmax(self._logits[-1])
        return (
            f"input {index:5d} layer {layer:2d}/{self.num_layers}: predicts "
            f"{int(probs.argmax())} (p={probs.max():.3f})"
        )
