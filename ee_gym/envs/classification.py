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

Two sources for the layers: ``mode="cached"`` replays the per-layer cache; ``mode="live"`` runs the
multi-exit model one layer at a time, so exiting early really skips the remaining layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from ee_gym.backbones import DEFAULT_BACKBONE, check_max_length
from ee_gym.batching import tokenize_examples
from ee_gym.envs.observations import ObservationEncoder, check_obs_mode
from ee_gym.envs.prepare import default_max_length, env_split, load_model, load_table
from ee_gym.envs.table import ExitTable, log_softmax, softmax
from ee_gym.hardness import memorized_layer
from ee_gym.multiexit import MultiExitModel
from ee_gym.rewards import check_alpha, default_alpha, get_reward
from ee_gym.tasks import check_split, load_split, resolve_task
from ee_gym.validation import ConfigError, check_int, check_optional_int

CONTINUE, EXIT = 0, 1
MODES = ("cached", "live")


class EpisodeOverError(RuntimeError):
    """step() was called after the episode ended."""


class InputIndexError(ConfigError, IndexError):
    """``reset(options={"index": i})`` with ``i`` outside 0..N-1: a ConfigError (a bad value) and,
    as before, an IndexError."""


def check_action(action: Any) -> int:
    """The action as an int, or a clear error (ConfigError, a ValueError)."""
    try:
        value = int(action)
        valid = bool(value == action) and value in (CONTINUE, EXIT)
    except (TypeError, ValueError, OverflowError):  # None, "x", inf, nan, arrays of several
        valid = False
    if not valid:
        raise ConfigError(f"invalid action {action!r}: use 0 (CONTINUE) or 1 (EXIT)")
    return value


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a clear error."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose 'cached' or 'live'")
    return mode


def check_seed(seed: Any) -> int | None:
    """A reset seed: None or a whole number >= 0 (what numpy's generators take), else ConfigError."""
    return check_optional_int("seed", seed, minimum=0)


def check_options(options: Any) -> Mapping | None:
    """reset()'s ``options``: None or a dict (``{"index": i}``; other keys are ignored)."""
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"options must be a dict such as {{'index': 0}} or None, got {options!r}")
    return options


def check_index(index: Any, num_inputs: int, item_name: str = "inputs") -> int:
    """``options["index"]`` as an int in 0..num_inputs-1: ConfigError for what is not a whole number,
    :class:`InputIndexError` for one out of range."""
    value = check_int('options["index"]', index)
    if not 0 <= value < num_inputs:
        raise InputIndexError(
            f"index {value} out of range for {num_inputs} {item_name} (use 0..{num_inputs - 1})"
        )
    return value


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
    check_obs_mode(obs_mode)
    max_inputs = check_optional_int("max_inputs", max_inputs, minimum=1)
    spec = None if table is not None else resolve_task(task, task_spec)
    split = check_split(split, spec)
    if max_length is not None:
        if table is None:
            max_length = check_max_length(model if model is not None else backbone, max_length)
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


def draws_at_random(split: str) -> bool:
    """Whether an env draws inputs at random from ``split``: yes for the training split and its
    slices (``"train"``, ``"train[90%:]"``), no (walks in order) for the others."""
    return str(split).strip().lower().startswith("train")


class LayerEpisodeEnv(gym.Env):
    """The episode logic every ConsistentEE env shares: one item (an input, a token) per episode, one
    layer per step, one reward at the exit.

    Subclasses set ``num_layers``, ``num_inputs``, ``split``, ``alpha``, ``reward_fn``, ``encoder``
    and ``render_mode``, call :meth:`_init_episode_state`, and implement :meth:`_observation`,
    :meth:`_exit_info` and :meth:`_trace_line`; :meth:`_begin`, :meth:`_advance` and :meth:`_end`
    are hooks for envs that run a model as they go, and :meth:`_pick_index` for envs that choose
    their items another way.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 30}
    item_name = "inputs"  # what one episode is about, for error messages

    def _init_episode_state(self) -> None:
        if self.num_inputs < 1:
            raise ConfigError(
                f"the split {self.split!r} has no {self.item_name}: an episode needs at least one "
                "(check the data files, the split's slice and max_inputs)"
            )
        self.observation_space = self.encoder.space
        self.action_space = spaces.Discrete(2)
        self._index, self._layer, self._done = -1, 0, True
        self._next_in_order = 0
        self._trace: list[str] = []

    # -- Gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        seed, options = check_seed(seed), check_options(options)
        if options and "index" in options:  # checked before anything changes: a refused reset changes nothing
            check_index(options["index"], self.num_inputs, self.item_name)
        super().reset(seed=seed)
        if seed is not None:  # reset(seed=s) must be reproducible on ordered splits too
            self._next_in_order = 0
        index = self._pick_index(options, reseeded=seed is not None)
        self._index, self._layer, self._done = index, 1, False
        self._begin(index)
        self._trace = []
        return self._observation(), {"index": index, "layer": 1}

    def step(self, action):
        if self._done:
            raise EpisodeOverError(
                "step() called after the episode ended (or before reset()): call reset() first"
            )
        action = check_action(action)
        if self.render_mode == "ansi":
            self._trace.append(self._trace_line(action))
        if action == CONTINUE and self._layer < self.num_layers:
            self._layer += 1
            self._advance()
            return self._observation(), 0.0, False, False, {"layer": self._layer}
        self._done = True
        self._end()
        info = self._exit_info()
        reward = float(
            self.reward_fn(
                info["cross_entropy"],
                info["correct"],
                self._layer,
                info["memorized_layer"],
                self.num_layers,
                self.alpha,
            )
        )
        return self._observation(), reward, True, False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return "\n".join(self._trace) + "\n"
        return None

    # -- what subclasses provide -------------------------------------------------------------
    def _pick_index(self, options: dict | None, reseeded: bool) -> int:
        """The item of the new episode: ``options["index"]``, else a seeded draw on training splits,
        else the next in order. ``reseeded``: reset() was given a seed."""
        if options and "index" in options:
            return check_index(options["index"], self.num_inputs, self.item_name)
        if draws_at_random(self.split):
            return int(self.np_random.integers(self.num_inputs))
        index = self._next_in_order
        self._next_in_order = (index + 1) % self.num_inputs
        return index

    def _begin(self, index: int) -> None:
        """A new episode on item ``index`` starts at layer 1."""

    def _advance(self) -> None:
        """The episode moved to the next layer (``self._layer``)."""

    def _end(self) -> None:
        """The episode ended at layer ``self._layer`` (before :meth:`_exit_info` reports it)."""

    def _observation(self):
        raise NotImplementedError

    def _exit_info(self) -> dict[str, Any]:
        """index, exit_layer, prediction, label, correct, memorized_layer, cross_entropy."""
        raise NotImplementedError

    def _trace_line(self, action: int) -> str:
        raise NotImplementedError

    def _exit_word(self, action: int) -> str:
        return "EXIT" if action == EXIT or self._layer == self.num_layers else "continue"


class ConsistentEEEnv(LayerEpisodeEnv):
    """Early exit as a Gymnasium env (see the module docstring).

    Args:
        task: a registered task name (``rte``, ``sst2``, ... or your own).
        split: which split's inputs episodes draw from (``train``, ``dev``, or a slice such as
            ``train[90%:]``, see :func:`ee_gym.tasks.load_split`).
        model: a :class:`MultiExitModel` or a checkpoint folder; default: stage 1 of ``backbone`` on
            ``task``, trained on first use and reused afterwards.
        backbone: the backbone stage 1 starts from when ``model`` is not given.
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
        protocol: str | None = None,  # None: the default, "held-out" (ee_gym.protocols)
        model: MultiExitModel | str | os.PathLike | None = None,
        backbone: str = DEFAULT_BACKBONE,
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
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"unknown render_mode {render_mode!r}; this env offers 'ansi'")
        if table is not None and mode == "live":
            raise ConfigError("live mode runs a model: pass model=..., not table=...")
        split, alpha, max_inputs, max_length = (
            checked[k] for k in ("split", "alpha", "max_inputs", "max_length")
        )
        self.reward_fn = checked["reward_fn"]
        self.task = checked["spec"].name if table is None else table.task
        self.split, self.mode, self.render_mode, self.reward_name = split, mode, render_mode, reward
        self.max_length = max_length or 0

        self.model: MultiExitModel | None = None
        if table is None:
            self.model = load_model(
                self.task,
                model=model,
                backbone=backbone,
                data_dir=data_dir,
                progress=progress,
                protocol=protocol,
            )
            self.max_length = max_length or default_max_length(self.task, self.model)
            if mode == "cached":
                table = load_table(
                    self.model,
                    self.task,
                    split,
                    data_dir=data_dir,
                    cache_dir=cache_dir,
                    max_inputs=max_inputs,
                    max_length=self.max_length,
                    progress=progress,
                )
        self.table = table
        if mode == "live":
            self._live = _LiveInputs(self.model, self.task, split, data_dir, max_inputs, self.max_length)
            num_layers, hidden = self.model.num_layers, self.model.hidden_size
            num_labels, self.num_inputs = self.model.num_labels, len(self._live)
        else:
            num_layers, hidden, num_labels = table.num_layers, table.hidden_size, table.num_labels
            self.num_inputs = table.num_inputs

        self.num_layers = num_layers
        self.alpha = default_alpha(self.task, num_layers) if alpha is None else alpha
        self.encoder = ObservationEncoder(obs_mode, num_layers, hidden, num_labels)
        self._init_episode_state()

    def _begin(self, index: int) -> None:
        if self.mode == "live":
            self._live.begin(index)

    def _advance(self) -> None:
        if self.mode == "live":
            self._live.advance()

    # -- internals ---------------------------------------------------------------------------
    def _logits_so_far(self) -> np.ndarray:
        if self.mode == "live":
            return self._live.logits
        return self.table.logits[self._index, : self._layer]

    def _observation(self):
        if self.mode == "cached":
            return self.encoder.at(self.table, self._index, self._layer)
        state = self._live.state if self.encoder.uses_state else None
        return self.encoder.single(state, self._live.logits)

    def _exit_info(self) -> dict[str, Any]:
        logits = self._logits_so_far()[-1].astype(np.float64)
        if self.mode == "live":
            label, memorized = self._live.label, self._live.memorized()
        else:
            label, memorized = int(self.table.labels[self._index]), int(self.table.memorized[self._index])
        prediction = int(logits.argmax())
        return {
            "index": self._index,
            "exit_layer": self._layer,
            "prediction": prediction,
            "label": label,
            "correct": prediction == label,
            "memorized_layer": memorized,
            "cross_entropy": float(-log_softmax(logits)[label]),
        }

    def _trace_line(self, action: int) -> str:
        probs = softmax(self._logits_so_far()[-1])
        return (
            f"input {self._index:5d} layer {self._layer:2d}/{self.num_layers}: predicts "
            f"{int(probs.argmax())} (p={probs.max():.3f}) -> {self._exit_word(action)}"
        )


class _LiveInputs:
    """Runs the model layer by layer for one input at a time (live mode)."""

    def __init__(self, model: MultiExitModel, task: str, split: str, data_dir, max_inputs, max_length):
        self.model = model.eval()
        self.split = tokenize_examples(
            load_split(task, split, data_dir, max_inputs), model.tokenizer, max_length
        )
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
        self.advance()

    @torch.no_grad()
    def advance(self) -> None:
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
