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
from ee_gym.probabilities import softmax
from ee_gym.targets import Target
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
        self.target = Target.of_task(task)
        self._memorized: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.split)

    @torch.no_grad()
    def begin(self, index: int) -> None:
        self.index = index
        self.label = self.split.labels[index].item()  # a label id, or a value for regression
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
            predictions = self.target.predictions(self.model(**self._batch).logits[0].float().cpu().numpy())
            label = np.array([self.label], dtype=self.target.label_dtype())
            self._memorized[self.index] = int(memorized_layer(predictions[None], label, self.target)[0])
        return self._memorized[self.index]

    # -- what the env reads ---------------------------------------------------------------------
    def observation(self, index: int, layer: int) -> Any:
        state = self.state if self.encoder.uses_state else None
        return self.encoder.single(state, self.logits)

    def exit_info(self, index: int, layer: int) -> dict[str, Any]:
        logits, label = self._logits[-1][None, None], np.array([self.label], dtype=self.target.label_dtype())
        prediction = self.target.predictions(logits)  # [1, 1]
        loss = float(self.target.losses(logits, label)[0, 0])
        correct = bool(self.target.correct(prediction, label)[0, 0])
        return exit_record(index, layer, prediction[0, 0].item(), self.label, self.memorized(), loss, correct)

    def describe(self, index: int, layer: int) -> str:
        if self.num_labels == 1:  # a regression head: its value
            return f"input {index:5d} layer {layer:2d}/{self.num_layers}: predicts {float(self._logits[-1][0]):.3f}"
        probs = softmax(self._logits[-1])
        return (
            f"input {index:5d} layer {layer:2d}/{self.num_layers}: predicts "
            f"{int(probs.argmax())} (p={probs.max():.3f})"
        )
