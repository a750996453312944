"""What an exit decision costs, declared and measured.

Early exit saves time only if deciding is cheap next to the layers it skips. On SmolLM2-135M the LM
head (49,152 x 576 weights) reads as many weights as about 8 decoder layers, so a rule that reads
exit l's full softmax after every layer can cost more than it saves. Every exit rule therefore
declares what it reads at a layer (``reads``, one of :data:`READS`), and :class:`DecisionTimer`
measures, during real decoding, the seconds spent in decisions (the rule and every signal it asks
the :class:`~ee_gym.generation.view.LayerView` for) against the seconds spent in the layers between
them, in the same run, so the two are comparable on a noisy machine. A decision is counted at
every layer the rule is asked from its ``min_layer`` on: for a rule that probes every k-th layer that
is the cost per layer it adds, and ``probe_us`` the cost of one probe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ee_gym.generation.view import ExitFn, LayerView

#: what a decision at one layer reads, cheapest first
READS = ("nothing", "state", "candidates", "softmax")


def reads_of(exit_fn: ExitFn | None) -> str:
    """The ``reads`` an exit rule declares (``nothing`` for full depth, ``unknown`` if it declares none)."""
    if exit_fn is None:
        return "nothing"
    return str(getattr(exit_fn, "reads", "unknown"))


@dataclass
class DecisionCost:
    """Per-layer seconds of decisions and of layers, measured in one decoding run."""

    decisions: int  # decisions timed (one per layer asked, per step)
    decision_seconds: float
    layers: int  # layer calls timed (between two decisions of one step)
    layer_seconds: float
    probes: int | None = None  # decisions that read a signal (None: the rule does not say)

    @property
    def decision_us(self) -> float:
        """Microseconds per decision."""
        return 1e6 * self.decision_seconds / self.decisions if self.decisions else float("nan")

    @property
    def layer_us(self) -> float:
        """Microseconds per decoder layer (its attention and MLP, at this batch size)."""
        return 1e6 * self.layer_seconds / self.layers if self.layers else float("nan")

    @property
    def fraction_of_layer(self) -> float:
        """A decision's time over one layer's."""
        return self.decision_us / self.layer_us if self.layers and self.decisions else float("nan")

    @property
    def probe_us(self) -> float:
        """Microseconds per decision that read a signal (a rule probing every k-th layer answers the
        others with one comparison): all decision time over the probes."""
        if not self.probes:
            return self.decision_us
        return 1e6 * self.decision_seconds / self.probes

    def to_dict(self) -> dict[str, float]:
        return {
            "decisions": self.decisions,
            "probes": self.probes,
            "probe_us": self.probe_us,
            "decision_us": self.decision_us,
            "layer_us": self.layer_us,
            "fraction_of_layer": self.fraction_of_layer,
        }


class DecisionTimer:
    """An exit rule that times the rule it wraps: each call (the decision, with the signals it
    computes) and the gap between two calls of the same step (the layer run in between).

    The decoder calls the rule after layer l and runs layer l + 1 before the next call, so that gap is
    one layer's work (and a ``torch.where``). Decisions that return CPU tensors are complete when the
    call returns; on a GPU, call :func:`torch.cuda.synchronize` inside for exact numbers.
    """

    def __init__(self, exit_fn: ExitFn):
        self.exit_fn = exit_fn
        self.reads = reads_of(exit_fn)
        self.deployable = getattr(exit_fn, "deployable", True)
        if hasattr(exit_fn, "prepare_step"):  # the oracle looks ahead before each token
            self.prepare_step = exit_fn.prepare_step
        # layers below the rule's own guard ask it nothing real: not counted as decisions
        self.min_layer = int(getattr(exit_fn, "min_layer", 1))
        self._last: tuple[int, float] | None = None  # (layer, when its decision returned)
        self._probes = getattr(exit_fn, "probes", None)  # which layers read a signal, if the rule says
        self.cost = DecisionCost(0, 0.0, 0, 0.0, None if self._probes is None else 0)

    def __call__(self, view: LayerView) -> torch.Tensor:
        started = time.perf_counter()
        if self._last is not None and self._last[0] == view.layer - 1:
            self.cost.layers += 1
            self.cost.layer_seconds += started - self._last[1]
        decision = self.exit_fn(view)
        ended = time.perf_counter()
        if view.layer >= self.min_layer:
            self.cost.decisions += 1
            self.cost.decision_seconds += ended - started
            if self._probes is not None and self._probes(view.layer):
                self.cost.probes += 1
        self._last = (view.layer, ended)
        return decision
