"""Training scalars for TensorBoard, when asked.

JSON lines (``metrics.jsonl``, a learner's ``history``) stay the record of every run; a folder given
as ``tensorboard=`` (``--tensorboard DIR``; the optional ``tensorboard`` extra) also gets TensorBoard
event files: stage 1's loss and per-layer dev metric, stage 3's losses, reward and mean exit layer,
REINFORCE's reward, loss, mean exit layer and exit histogram per epoch. Stable-baselines3 learners
write theirs through SB3's own logger into the same folder. Each writer tags its scalars with its
stage (``stage1/...``, ``stage3/...``, ``reinforce/...``), so one folder can hold a whole run.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from ee_gym.validation import ConfigError

TENSORBOARD_FIX = "install the extra: pip install 'ee-gym[tensorboard]' (or pip install tensorboard)"


def tensorboard_field() -> Any:
    """The ``tensorboard`` setting of a config dataclass (one declaration for every stage): a folder
    for event files, or None (JSON lines only)."""
    return field(default=None, metadata={"help": "a folder for TensorBoard event files of the training scalars "
                                                 "(the tensorboard extra)"})  # fmt: skip


def check_tensorboard(name: str, folder: str | os.PathLike | None) -> str | None:
    """``folder`` as a string, after checking (before any work starts) that it can be one and that
    the tensorboard package is installed; None passes through (no event files)."""
    if folder is None:
        return None
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise ConfigError(f"{name} must be a folder for TensorBoard event files, got {folder!r}")
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(
            f"{name}={str(folder)!r} is a file, not a folder: give a folder for the event files"
        )
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"{name}={str(folder)!r} writes TensorBoard event files, but tensorboard is missing: "
                          f"{TENSORBOARD_FIX}")  # fmt: skip
    return str(folder)


class ScalarLog:
    """Where one trainer sends its scalars: event files in ``folder`` under tags ``<prefix>/<name>``,
    or nowhere when ``folder`` is None (every call is then a no-op)."""

    def __init__(self, folder: str | os.PathLike | None, prefix: str):
        self.prefix = prefix
        self.writer = None
        if folder is not None:
            check_tensorboard("tensorboard", folder)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Every numeric entry of ``values`` (others, such as a rollout name, are skipped)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.prefix}/{name}", float(value), step)

    def layers(self, name: str, values: Sequence[float], step: int) -> None:
        """One scalar per exit layer: ``<prefix>/<name>/layer_01`` ..."""
        if self.writer is None:
            return
        for layer, value in enumerate(values, start=1):
            self.writer.add_scalar(f"{self.prefix}/{name}/layer_{layer:02d}", float(value), step)

    def exit_histogram(self, exit_layers: np.ndarray, num_layers: int, step: int) -> None:
        """The exit layers (1..L) of an epoch, one bin per layer."""
        if self.writer is None or len(exit_layers) == 0:
            return
        bins = np.arange(0.5, num_layers + 1.5)
        self.writer.add_histogram(f"{self.prefix}/exit_layer", np.asarray(exit_layers), step, bins=bins)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
