"""ConsistentEE-<Task>-v0: one input per episode, one layer per step.

reset() shows layer 1 of an input; each step takes 0 (CONTINUE) or 1 (EXIT). The episode ends at the
first EXIT or at layer L, whatever the action there, and pays its one reward then (ee_gym.rewards).
Inputs are drawn with the env's seeded generator on the training split (or a slice of it, such as
``train[90%:]``), walked in order on other splits, or chosen with ``reset(options={"index": i})``.

The walk of an ordered split (``dev``): the first reset takes input 0 and every later ``reset()``
the next one, wrapping after N-1; ``reset(seed=...)`` starts the walk again at input 0, and a reset
with an ``index`` option takes that input and leaves the walk where it was. The vector env walks the
same order (``ee_gym.envs.vector``).

Every keyword is checked before anything is loaded (no stage-1 training, no cache building for a
setting that cannot be right): a bad value raises :class:`~ee_gym.validation.ConfigError` (a
ValueError) naming the setting. At run time: a bad action or reset argument raises ConfigError,
``options={"index": i}`` outside 0..N-1 :class:`InputIndexError` (a ConfigError and an IndexError),
and a step after the episode ended :class:`EpisodeOverError`.

Two sources for the layers (:mod:`ee_gym.envs.base`): ``mode="cached"`` replays the per-layer
cache (:class:`~ee_gym.envs.base.TableSource`; the env keeps the table, not the model that made it);
``mode="live"`` runs the multi-exit model one layer at a time
(:class:`~ee_gym.envs.live.LiveEncoderSource`), so exiting early really skips the remaining layers.
This module imports neither torch nor the model code: they load when an env needs a model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ee_gym.envs.base import (
    CONTINUE,
    EXIT,
    MODES,
    EpisodeOverError,
    InputIndexError,
    LayerEpisodeEnv,
    LayerSource,
    TableSource,
    check_action,
    check_index,
    check_mode,
    check_options,
    check_render_mode,
    check_seed,
    draws_at_random,
)
from ee_gym.envs.table import ExitTable
from ee_gym.observations import OBS_MODES, PROBE_SCORES, check_mode_fits_heads, check_obs_mode, get_obs_mode
from ee_gym.protocols import env_split, get_protocol
from ee_gym.rewards import check_alpha, default_alpha, get_reward
from ee_gym.tasks import check_split, resolve_task
from ee_gym.validation import ConfigError, check_int, check_optional_int

if TYPE_CHECKING:
    from ee_gym.multiexit import MultiExitModel

__all__ = [
    "CONTINUE",
    "EXIT",
    "MODES",
    "ConsistentEEEnv",
    "EpisodeOverError",
    "InputIndexError",
    "LayerEpisodeEnv",
    "check_action",
    "check_env_settings",
    "check_index",
    "check_mode",
    "check_options",
    "check_seed",
    "draws_at_random",
]


def check_env_settings(
    *,
    task: Any,
    split: Any,
    reward: Any,
    alpha: Any,
    obs_mode: Any,
    max_inputs: Any,
    max_length: Any,
    mode: Any,
    model: Any,
    backbone: Any,
    table: ExitTable | None,
    task_spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the classification envs' keywords before anything is loaded (a config file at most: the
    backbone's, for ``max_length``'s upper bound). Returns the checked values: ``spec`` (None with a
    ``table``), ``split``, ``reward_fn``, ``alpha``, ``max_inputs``, ``max_length``."""
    check_mode(mode)
    reward_fn = get_reward(reward)
    alpha = check_alpha(alpha)
    # a generation-only mode: served over a token table that carries what it reads (the token env's)
    served = table is not None and PROBE_SCORES in getattr(table, "derived", {})
    if get_obs_mode(check_obs_mode(obs_mode)).generation_only and not served:
        raise ConfigError(
            f"observation mode {obs_mode!r} is for generation (ConsistentEE-XSum-v0) only; the "
            f"classification envs serve {', '.join(OBS_MODES)}"
        )
    max_inputs = check_optional_int("max_inputs", max_inputs, minimum=1)
    spec = None if table is not None else resolve_task(task, task_spec)
    check_mode_fits_heads(obs_mode, table.num_labels if table is not None else spec.num_labels)
    split = check_split(split, spec)
    if max_length is not None:
        if table is None:
            from ee_gym.backbones import DEFAULT_BACKBONE, check_max_length  # reads the backbone's config

            max_length = check_max_length(
                model if model is not None else backbone or DEFAULT_BACKBONE, max_length
            )
        else:
            max_length = check_int("max_length", max_length, minimum=2)
    return dict(
        spec=spec,
        split=split,
        reward_fn=reward_fn,
        alpha=alpha,
        max_inputs=max_inputs,
        max_length=max_length,
    )


class ConsistentEEEnv(LayerEpisodeEnv):
    """Early exit as a Gymnasium env (see the module docstring).

    Args:
        task: a registered task name (``rte``, ``sst2``, ... or your own).
        split: which split's inputs episodes draw from (``train``, ``dev``, or a slice such as
            ``train[90%:]``, see :func:`ee_gym.tasks.load_split`).
        model: a :class:`MultiExitModel` or a checkpoint folder; default: stage 1 of ``backbone`` on
            ``task``, trained on first use and reused afterwards.
        backbone: the backbone stage 1 starts from when ``model`` is not given (default
            ``ee_gym.backbones.DEFAULT_BACKBONE``).
        reward: ``hardness`` (ConsistentEE), ``plain``, ``ce`` or ``accuracy``.
        alpha: price of one layer, a number >= 0; default ``ee_gym.rewards.default_alpha(task, L)``.
        obs_mode: ``state``, ``state+layer``, ``state+confidence``, ``stats`` or ``full``
            (ee_gym.envs.observations).
        data_dir, cache_dir: where the data and the cache are (default: ``$EE_GYM_DATA``, and a
            folder under ``$EE_GYM_HOME`` named by the model's fingerprint).
        max_inputs: use only the first N inputs of the split (N >= 1).
        max_length: tokens per input, 2 up to the backbone's positions (default: the task's
            stage-1 setting).
        mode: ``cached`` or ``live``.
        render_mode: ``ansi`` for a text line per step.
        table: an :class:`ExitTable` to replay instead of a cache (synthetic tests and agents).
        task_spec: a user task's spec as plain data (set by the env id, see
            :func:`resolve_task`), to rebuild the task in a process that does not know it.

    Episodes on an ordered split walk it as the module docstring says: ``reset()`` takes the next
    input, ``reset(seed=...)`` starts again at input 0.
    """

    def __init__(
        self,
        task: str = "rte",
        split: str | None = None,  # None: the protocol's policy split (prepare.env_split)
        *,
        protocol: str | None = None,  # None: the default, "paper" (ee_gym.protocols)
        model: MultiExitModel | str | os.PathLike | None = None,
        backbone: str | None = None,
        reward: str = "hardness",
        alpha: float | None = None,
        obs_mode: str = "state+layer",
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_inputs: int | None = None,
        max_length: int | None = None,
        mode: str = "cached",
        render_mode: str | None = None,
        progress: bool = True,
        table: ExitTable | None = None,
        task_spec: dict | None = None,
    ):
        # Every keyword first: nothing below (stage 1, the cache) starts for a setting that cannot be right.
        split = env_split(split, protocol, model, table)
        checked = check_env_settings(
            task=task,
            split=split,
            reward=reward,
            alpha=alpha,
            obs_mode=obs_mode,
            max_inputs=max_inputs,
            max_length=max_length,
            mode=mode,
            model=model,
            backbone=backbone,
            table=table,
            task_spec=task_spec,
        )
        check_render_mode(render_mode)
        if table is not None and mode == "live":
            raise ConfigError("live mode runs a model: pass model=..., not table=...")
        if mode == "live" and protocol is not None and get_protocol(protocol).cross_fit and split == "train":
            raise ConfigError(
                f"live mode runs one model, but under {protocol!r} the policy split's rows come from "
                "fold models (ee_gym.crossfit): use mode='cached', or another split or protocol"
            )
        split, alpha, max_inputs, max_length = (
            checked[k] for k in ("split", "alpha", "max_inputs", "max_length")
        )
        self.reward_fn = checked["reward_fn"]
        self.task = checked["spec"].name if table is None else table.task
        self.split, self.mode, self.render_mode, self.reward_name = split, mode, render_mode, reward
        self.max_length = max_length or 0

        source: LayerSource
        if table is None and mode == "live":
            from ee_gym.backbones import DEFAULT_BACKBONE
            from ee_gym.envs.live import LiveEncoderSource
            from ee_gym.envs.prepare import default_max_length, load_model

            loaded = load_model(
                self.task, model=model, backbone=backbone or DEFAULT_BACKBONE, data_dir=data_dir,
                progress=progress, protocol=protocol,
            )  # fmt: skip
            self.max_length = max_length or default_max_length(self.task, loaded)
            source = LiveEncoderSource(loaded, self.task, split, data_dir, max_inputs, self.max_length)
        elif (
            table is None
        ):  # the table is all a cached env keeps: no model (a pickled env carries the table only)
            from ee_gym.envs.prepare import default_max_length, env_table

            loaded, table = env_table(
                self.task, split, protocol=protocol, model=model, backbone=backbone, data_dir=data_dir,
                cache_dir=cache_dir, max_inputs=max_inputs, max_length=max_length, progress=progress,
            )  # fmt: skip
            self.max_length = max_length or default_max_length(self.task, loaded)
        if table is not None:
            source = TableSource(table)
        self.table = table
        self._live = None if mode == "cached" else source
        self.model = None if mode == "cached" else source.model  # live mode runs it
        self.alpha = default_alpha(self.task, source.num_layers) if alpha is None else alpha
        self._init_episodes(source, obs_mode)


def __getattr__(name: str):
    if name == "_LiveInputs":  # the former name of the live source
        from ee_gym.envs.live import LiveEncoderSource

        return LiveEncoderSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
