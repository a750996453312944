"""One env over a layer source: the episodes, rewards, rendering and errors every ConsistentEE env shares.

An episode is one item (an input, a generated token), a step one layer, the reward paid once at the
exit. What differs between the envs is only where the layers come from, a :class:`LayerSource`:

* :class:`TableSource` replays a precomputed table (a classification :class:`~ee_gym.envs.ExitTable`,
  or generation's token table through :class:`TokenTableSource`);
* the live sources run a model as the episode goes (``ee_gym.envs.live.LiveEncoderSource`` for an
  encoder, ``ee_gym.envs.generation.LiveDecoderSource`` for a decoder).

:class:`LayerEpisodeEnv` does the rest. This module imports neither torch nor a model, so that an env's
keywords are checked, and a table env runs, without them; a cached env holds its table, not the model
that made it (a pickled env carries the table only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from ee_gym.observations import ObservationEncoder
from ee_gym.probabilities import softmax
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


def check_render_mode(render_mode: Any) -> str | None:
    if render_mode not in (None, "ansi"):
        raise ConfigError(f"unknown render_mode {render_mode!r}; this env offers 'ansi'")
    return render_mode


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


def draws_at_random(split: str) -> bool:
    """Whether an env draws inputs at random from ``split``: yes for the training split and its
    slices (``"train"``, ``"train[90%:]"``), no (walks in order) for the others."""
    return str(split).strip().lower().startswith("train")


def exit_record(
    index: int,
    layer: int,
    prediction: int | float,
    label: int | float,
    memorized: int,
    cross_entropy: float,
    correct: bool | None = None,
) -> dict[str, Any]:
    """The info of an exit step: the fields of the vector env's ``final_info``, as plain Python values.

    ``correct`` None means prediction == label (label ids); a regression source passes its own (within
    the task's tolerance), and ``cross_entropy`` is then the exit's squared error (ee_gym.targets)."""
    return {
        "index": index,
        "exit_layer": layer,
        "prediction": prediction,
        "label": label,
        "correct": bool(prediction == label) if correct is None else bool(correct),
        "memorized_layer": memorized,
        "cross_entropy": cross_entropy,
    }


class LayerSource:
    """Where an env's layers come from: its sizes, and per (item, layer) the observation, the exit's
    outcome and a line of text. Hooks :meth:`begin`, :meth:`advance` and :meth:`end` let a live source
    run its model as the episode goes; :meth:`pick_index` lets one choose items its own way."""

    num_layers: int
    hidden_size: int
    num_labels: int
    num_inputs: int
    item_name: str = "inputs"

    def bind(self, encoder: ObservationEncoder) -> None:
        """The env's observation encoder, given once before the first episode."""
        self.encoder = encoder

    def pick_index(self, options: Mapping | None, reseeded: bool, default: Callable[[], int]) -> int:
        """The item of a new episode; ``default()`` is the env's own choice (index option, seeded draw
        or next in order)."""
        return default()

    def begin(self, index: int) -> None:
        """A new episode on item ``index`` starts at layer 1."""

    def advance(self, layer: int) -> None:
        """The episode moved to ``layer``."""

    def end(self, layer: int) -> None:
        """The episode ended at ``layer`` (before :meth:`exit_info` reports it)."""

    def reset_info(self) -> dict[str, Any]:
        """What reset() adds to its info."""
        return {}

    def observation(self, index: int, layer: int) -> Any:
        raise NotImplementedError

    def exit_info(self, index: int, layer: int) -> dict[str, Any]:
        """index, exit_layer, prediction, label, correct, memorized_layer, cross_entropy."""
        raise NotImplementedError

    def describe(self, index: int, layer: int) -> str:
        """The render line of (item, layer), up to the action."""
        raise NotImplementedError


class TableSource(LayerSource):
    """A precomputed per-(item, layer) table: every step is an array lookup."""

    def __init__(self, table: Any, item_name: str = "inputs"):
        self.table, self.item_name = table, item_name
        self.num_layers, self.hidden_size = table.num_layers, table.hidden_size
        self.num_labels, self.num_inputs = table.num_labels, table.num_inputs

    def observation(self, index: int, layer: int) -> Any:
        return self.encoder.at(self.table, index, layer)

    def exit_info(self, index: int, layer: int) -> dict[str, Any]:
        table, column = self.table, layer - 1
        return exit_record(
            index,
            layer,
            table.predictions[index, column].item(),  # an int label id, or a float for regression
            table.labels[index].item(),
            int(table.memorized[index]),
            float(table.cross_entropy[index, column]),
            bool(table.correct[index, column]),
        )

    def describe(self, index: int, layer: int) -> str:
        if self.num_labels == 1:  # a regression head: its value
            return (
                f"input {index:5d} layer {layer:2d}/{self.num_layers}: predicts "
                f"{float(self.table.logits[index, layer - 1, 0]):.3f}"
            )
        probs = softmax(self.table.logits[index, layer - 1])
        return (
            f"input {index:5d} layer {layer:2d}/{self.num_layers}: predicts "
            f"{int(probs.argmax())} (p={probs.max():.3f})"
        )


class TokenTableSource(TableSource):
    """A token table (generation): the same lookups; the render line shows the top-2 gap and target."""

    def __init__(self, table: Any):
        super().__init__(table, item_name="tokens")

    def describe(self, index: int, layer: int) -> str:
        table = self.table
        prediction, label = int(table.predictions[index, layer - 1]), int(table.labels[index])
        gap = float(table.top2_gap[index, layer - 1])
        return (
            f"token {index:6d} layer {layer:2d}/{self.num_layers}: predicts {prediction} "
            f"(gap={gap:.3f}, target {label})"
        )


class LayerEpisodeEnv(gym.Env):
    """The episode logic every ConsistentEE env shares, over a :class:`LayerSource`: one item (an
    input, a token) per episode, one layer per step, one reward at the exit.

    Subclasses check their keywords, make the source and call :meth:`_init_episodes` with it and the
    observation mode; the reward (``reward_fn``, ``alpha``), ``split`` and ``render_mode`` are set
    before.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 30}
    item_name = "inputs"  # what one episode is about, for error messages

    def _init_episodes(self, source: LayerSource, obs_mode: str) -> None:
        self.source = source
        self.item_name = source.item_name
        self.num_layers, self.num_inputs = source.num_layers, source.num_inputs
        if self.num_inputs < 1:
            raise ConfigError(
                f"the split {self.split!r} has no {self.item_name}: an episode needs at least one "
                "(check the data files, the split's slice and max_inputs)"
            )
        self.encoder = ObservationEncoder(obs_mode, source.num_layers, source.hidden_size, source.num_labels)
        source.bind(self.encoder)
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
        reseeded = seed is not None
        self._done = True  # whatever happens while picking, the episode under way is abandoned
        index = self.source.pick_index(options, reseeded, lambda: self._pick_index(options, reseeded))
        self._index, self._layer, self._done = index, 1, False
        self.source.begin(index)
        self._trace = []
        return self._observation(), {"index": index, "layer": 1, **self.source.reset_info()}

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
            self.source.advance(self._layer)
            return self._observation(), 0.0, False, False, {"layer": self._layer}
        self._done = True
        self.source.end(self._layer)
        info = self.source.exit_info(self._index, self._layer)
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

    # -- the env's own choices ---------------------------------------------------------------
    def _pick_index(self, options: Mapping | None, reseeded: bool) -> int:
        """The item of the new episode: ``options["index"]``, else a seeded draw on training splits,
        else the next in order. ``reseeded``: reset() was given a seed."""
        if options and "index" in options:
            return check_index(options["index"], self.num_inputs, self.item_name)
        if draws_at_random(self.split):
            return int(self.np_random.integers(self.num_inputs))
        index = self._next_in_order
        self._next_in_order = (index + 1) % self.num_inputs
        return index

    def _observation(self):
        return self.source.observation(self._index, self._layer)

    def _trace_line(self, action: int) -> str:
        return f"{self.source.describe(self._index, self._layer)} -> {self._exit_word(action)}"

    def _exit_word(self, action: int) -> str:
        return "EXIT" if action == EXIT or self._layer == self.num_layers else "continue"
