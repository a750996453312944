"""Saving and loading a learner whose weights are one torch module, ``self.net``.

REINFORCE and learned-exit keep their networks the same way: the module's tensors in one safetensors
file, the training history (one record per epoch) in ``history.json``. The shape that rebuilds the
module travels in the policy's params (``policy.json``), so the module exists before the weights load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import load_file, save_file

from ee_gym.files import read_json

HISTORY_FILE = "history.json"


class NetworkWeights:
    """Mixin for an :class:`~ee_gym.policy.ExitPolicy` with ``self.net`` (a torch module or None) and
    ``self.history`` (a list of JSON records); set ``weights_file`` and ``network_word``."""

    weights_file: ClassVar[str] = "policy.safetensors"
    network_word: ClassVar[str] = "network"  # what the module is called in error messages
    net: Any
    history: list

    def _save_weights(self, folder: Path) -> None:
        if self.net is None:
            raise RuntimeError(
                f"nothing to save: the policy has no {self.network_word} yet (learn or bind it first)"
            )
        tensors = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        save_file(tensors, str(folder / self.weights_file))
        (folder / HISTORY_FILE).write_text(json.dumps(self.history))

    def _load_weights(self, folder: Path) -> None:
        if self.net is None:
            raise RuntimeError(f"{folder} records no {self.network_word} shape (state_size, num_layers)")
        self.net.load_state_dict(load_file(str(folder / self.weights_file)))
        if (folder / HISTORY_FILE).is_file():
            self.history = read_json(
                folder / HISTORY_FILE, "delete it (it only records training) or save again"
            )
