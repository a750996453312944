"""The sizes every per-layer array set shares (a cache on disk, a table in memory).

In its own light module (numpy only) so that :mod:`ee_gym.cache` and the env tables
(:mod:`ee_gym.envs.table`) share one definition without the tables importing the cache builder,
which pulls in torch.
"""

from __future__ import annotations

import numpy as np


class ExitShapes:
    """Sizes read off per-layer arrays: ``states`` [N, L, d], ``logits`` [N, L, K], ``labels`` [N]."""

    states: np.ndarray
    logits: np.ndarray
    labels: np.ndarray

    @property
    def num_inputs(self) -> int:
        return self.labels.shape[0]

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    @property
    def num_labels(self) -> int:
        return self.logits.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]
