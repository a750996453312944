"""Observation modes, as the envs know them: a re-export of :mod:`ee_gym.observations`.

The modes live one level down, in :mod:`ee_gym.observations`, so that the envs and the generation
package (``PolicyExit``) share them without importing each other; this module keeps the names that
code and tests import from ``ee_gym.envs.observations``.
"""

from __future__ import annotations

from ee_gym.observations import (
    CONFIDENCE_WIDTH,
    LAYER_ONE_HOT_MODES,
    OBS_MODE_REGISTRY,
    OBS_MODES,
    PRECOMPUTE_LIMIT_BYTES,
    STATE_OBS_MODES,
    ObservationEncoder,
    ObsMode,
    StatsView,
    check_obs_mode,
    gather,
    get_obs_mode,
    last_stats,
    stats_features,
    stats_size,
    table_confidence,
    top2_gap,
)

_last_stats = last_stats  # the former private name

__all__ = [
    "CONFIDENCE_WIDTH",
    "LAYER_ONE_HOT_MODES",
    "OBS_MODES",
    "OBS_MODE_REGISTRY",
    "PRECOMPUTE_LIMIT_BYTES",
    "STATE_OBS_MODES",
    "ObsMode",
    "ObservationEncoder",
    "StatsView",
    "check_obs_mode",
    "gather",
    "get_obs_mode",
    "last_stats",
    "stats_features",
    "stats_size",
    "table_confidence",
    "top2_gap",
]
