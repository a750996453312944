"""A learner whose weights are one torch module, ``self.net``: building it for a table, binding it to
an env, saving and loading it.

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
from ee_gym.observations import ObservationEncoder

HISTORY_FILE = "history.json"


class NetworkWeights:
    """Mixin for an :class:`~ee_gym.policy.ExitPolicy` with ``self.net`` (a torch module with
    ``state_size`` and ``num_layers``, or None), ``self.history`` (a list of JSON records) and
    ``_build(state_size, num_layers)``; set ``weights_file`` and ``network_word``."""

    weights_file: ClassVar[str] = "policy.safetensors"
    network_word: ClassVar[str] = "network"  # what the module is called in error messages
    net: Any
    history: list

    def _ensure_network(self, table: Any) -> Any:
        """The network for ``table``'s observations: built the first time, checked afterwards."""
        size = ObservationEncoder(
            self.obs_mode, table.num_layers, table.hidden_size, table.num_labels
        ).feature_size
        if self.net is None:
            self._build(size, table.num_layers)
        elif (self.net.state_size, self.net.num_layers) != (size, table.num_layers):
            raise ValueError(
                f"this {self.network_word} was built for {self.net.state_size} inputs, L={self.net.num_layers}; "
                f"the env gives {size} ({self.obs_mode}, d={table.hidden_size}), L={table.num_layers}"
            )
        return self.net

    def bind(self, env: Any) -> None:
        mode = getattr(getattr(env, "encoder", None), "mode", self.obs_mode)
        if mode != self.obs_mode:
            raise ValueError(
                f"this policy reads {self.obs_mode!r} observations and the env gives {mode!r}: make the "
                f"env with obs_mode={self.obs_mode!r}"
            )
        super().bind(env)  # the shapes it learned on (L, d, K), recorded the first time
        self._ensure_network(env.table)

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
