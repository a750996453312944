"""Batched early-exit inference: run a batch layer by layer and drop the rows that have exited.

docs/method.md, "Stage 2" (inference): an input exits at the first layer its policy says EXIT (the paper's policy:
p_l > 0.5), else at layer L. The authors support batch size 1 only; here a whole batch runs layer by
layer (:func:`ee_gym.runner.run_layers`, the loop stage 3 runs too) and, after each layer, the rows
that exit are recorded and removed from the batch with ``MultiExitModel.select`` (which also trims
the padding no remaining row needs), so later layers run on fewer and often shorter rows. Inputs are sorted by length into batches (and put back in their
order at the end), so that a batch pads little to begin with.

The policy is any deployable exit policy (:class:`ee_gym.policy.ExitPolicy`; ``agents`` has a rule,
REINFORCE, SB3 learners, ...): each
layer it receives one batch observation of its ``obs_mode`` for the rows still running, built by
:meth:`ObservationEncoder.from_outputs` exactly as the envs build them one row at a time, and answers
0 (CONTINUE) or 1 (EXIT) per row. ``policy=None`` runs every input to layer L.

``ExitPolicy.bind`` expects the vector env a policy will act in; the rules read ``env.num_layers`` and
``env.table.num_labels`` from it, REINFORCE ``env.table.hidden_size`` and ``env.table.num_layers``.
There is no env here: policies are bound to :func:`~ee_gym.runner.model_env_stand_in`, a light object
exposing those sizes (L, K, d) for the model. Policies that read more than sizes from their env (the
oracles, which peek at labels) are not deployable and are refused.

Results are deterministic, and batching does not change them: the same predictions and exit layers
come out at any batch size (up to floating-point ties at a decision threshold, which the kernels of
different batch shapes may round differently).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ee_gym.batching import length_sorted_batches, tokenize_examples
from ee_gym.multiexit import MultiExitModel
from ee_gym.observations import ObservationEncoder
from ee_gym.policy import make_policy, policy_names
from ee_gym.probabilities import softmax
from ee_gym.runner import ActingExits, model_env_stand_in, run_layers
from ee_gym.targets import head_predictions
from ee_gym.tasks import Examples
from ee_gym.validation import ConfigError

__all__ = [
    "PreparedBatch",
    "Predictions",
    "model_env_stand_in",
    "predict",
    "predict_batches",
    "predict_split",
    "prepare_batches",
]


@dataclass
class Predictions:
    """What :func:`predict` returns, one row per input, in the inputs' order."""

    predictions: np.ndarray  # [N] int64 label ids: argmax of the exit head (regression: float32 values)
    exit_layers: np.ndarray  # [N] int64 exit layer, 1..L
    probabilities: np.ndarray  # [N, K] float32 softmax of the exit head (regression: [N, 0], none)
    num_layers: int  # L
    seconds: float = 0.0  # wall time of the call (tokenisation included)
    labels: np.ndarray | None = None  # [N] gold label ids (predict_split)
    metrics: dict[str, float] = field(default_factory=dict)  # predict_split: task metrics + speed

    def __len__(self) -> int:
        return len(self.predictions)

    @property
    def mean_exit_layer(self) -> float:
        return float(self.exit_layers.mean()) if len(self) else float("nan")

    @property
    def speed_up(self) -> float:
        """Layer speed-up, L / mean exit layer."""
        return self.num_layers / self.mean_exit_layer if len(self) else float("nan")

    @property
    def saved_layers(self) -> float:
        """1 - mean exit layer / L (what the ConsistentEE authors print)."""
        return 1.0 - self.mean_exit_layer / self.num_layers if len(self) else float("nan")


def resolve_policy(policy: Any) -> Any:
    """``policy`` itself, or for a name (``"entropy"``) the rule the policy registry makes with its
    defaults (:func:`ee_gym.policy.make_policy`). A learner's name is refused (an untrained learner
    has nothing to act on): pass a trained one (``load_policy(folder)``, or ``policy.learn(env)``)."""
    if not isinstance(policy, str):
        return policy
    if policy not in policy_names():
        raise ConfigError(
            f"unknown policy {policy!r}: pass an exit policy (agents.make(name, ...), or "
            f"agents.load_policy(folder) for a trained one) or the name of a rule; registered names: "
            f"{', '.join(policy_names())}"
        )
    made = make_policy(policy)
    if made.learns:
        raise ConfigError(
            f"policy {policy!r} learns, and a new one has learned nothing: pass a trained policy "
            f"(agents.load_policy(folder), or agents.make({policy!r}) after policy.learn(env))"
        )
    return made


def _as_texts(name: str, texts: Any) -> list[str] | None:
    """A str is one input; other sequences are one input per item."""
    if texts is None:
        return None
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes | bytearray) or not hasattr(texts, "__iter__"):
        raise ConfigError(f"{name} must be a string or a sequence of strings, got {type(texts).__name__}")
    return list(texts)


def prepare_policy(policy: Any, model: MultiExitModel) -> ObservationEncoder | None:
    """Refuse what cannot be deployed, bind the policy to the model's sizes, make its encoder."""
    policy = resolve_policy(policy)
    if policy is None:
        return None
    if not getattr(policy, "deployable", True):
        raise ValueError(
            f"policy {getattr(policy, 'name', type(policy).__name__)!r} is not deployable: it reads what "
            "a deployed model cannot know (labels or later layers), so it cannot run inference"
        )
    policy.bind(model_env_stand_in(model))
    return ObservationEncoder(policy.obs_mode, model.num_layers, model.hidden_size, model.num_labels)


def acting_exits(policy: Any, model: MultiExitModel, deterministic: bool = True) -> ActingExits | None:
    """The runner's decider for ``policy`` on ``model`` (checked and bound by :func:`prepare_policy`);
    None for full depth (``policy=None``)."""
    policy = resolve_policy(policy)
    encoder = prepare_policy(policy, model)
    return None if encoder is None else ActingExits(policy, encoder, deterministic)


def predict(
    model: MultiExitModel,
    text_a: Sequence[str],
    text_b: Sequence[str] | None = None,
    policy: Any = None,
    batch_size: int = 32,
    max_length: int = 128,
    deterministic: bool = True,
) -> Predictions:
    """Early-exit predictions for texts (or text pairs), batch by batch, dropping rows as they exit.

    Args:
        model: a multi-exit model with a tokenizer (run in eval mode; its mode is restored after).
        text_a, text_b: the inputs; ``text_b`` for pair tasks (same length as ``text_a``). A str is
            one input (``predict(model, "a review")`` gives one prediction).
        policy: a deployable :class:`~ee_gym.policy.ExitPolicy` (bound here to the model's sizes), the
            name of a rule (``"entropy"``: ``make_policy("entropy")`` at its defaults), or None for full
            depth.
        batch_size: rows per batch at layer 1 (batches shrink as rows exit).
        max_length: tokens per input (truncated beyond).
        deterministic: passed to ``policy.act``; True is the policy's inference rule.

    The same as :func:`prepare_batches` then :func:`predict_batches`; ``seconds`` counts both.
    """
    start_time = time.perf_counter()
    policy = resolve_policy(policy)  # before any work: a bad name fails at once
    text_a, text_b = _as_texts("text_a", text_a), _as_texts("text_b", text_b)
    batches = prepare_batches(model, text_a, text_b, batch_size, max_length)
    out = predict_batches(model, batches, len(text_a), policy, deterministic)
    out.seconds = time.perf_counter() - start_time
    return out


@dataclass
class PreparedBatch:
    rows: np.ndarray  # input index of each row
    inputs: dict[str, torch.Tensor]  # padded model inputs, on the model's device


def prepare_batches(
    model: MultiExitModel,
    text_a: Sequence[str],
    text_b: Sequence[str] | None = None,
    batch_size: int = 32,
    max_length: int = 128,
) -> list[PreparedBatch]:
    """Tokenise the inputs and pad them into batches of similar length (what the model reads)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass one to MultiExitModel(...)")
    text_a, text_b = _as_texts("text_a", text_a), _as_texts("text_b", text_b)
    n = len(text_a)
    if not n:
        return []
    examples = Examples(list(text_a), None if text_b is None else list(text_b), np.zeros(n, dtype=np.int64))
    split = tokenize_examples(examples, model.tokenizer, max_length)
    batches = []
    for rows in length_sorted_batches(split, batch_size):
        inputs = split.batch(rows, model.tokenizer, model.device)
        inputs.pop("labels")
        batches.append(PreparedBatch(np.asarray(rows), inputs))
    return batches


def predict_batches(
    model: MultiExitModel,
    batches: Sequence[PreparedBatch],
    num_inputs: int,
    policy: Any = None,
    deterministic: bool = True,
) -> Predictions:
    """Run prepared batches (:func:`prepare_batches`) with early exits; ``seconds``: the model's time."""
    start_time = time.perf_counter()
    decide = acting_exits(policy, model, deterministic)
    exit_layers = np.zeros(num_inputs, dtype=np.int64)
    logits = np.zeros((num_inputs, model.num_labels), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                run = run_layers(model, batch.inputs, decide)
                exit_layers[batch.rows] = run.exit_layer.cpu().numpy()
                logits[batch.rows] = run.exit_logits.float().cpu().numpy()
    finally:
        model.train(was_training)
    regression = model.num_labels == 1  # one output per head: a value, no distribution
    return Predictions(
        predictions=head_predictions(logits),
        exit_layers=exit_layers,
        probabilities=np.zeros((num_inputs, 0), np.float32)
        if regression
        else softmax(logits).astype(np.float32),
        num_layers=model.num_layers,
        seconds=time.perf_counter() - start_time,
    )


def predict_split(
    model: MultiExitModel,
    task: str,
    split: str = "dev",
    policy: Any = None,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    deterministic: bool = True,
) -> Predictions:
    """:func:`predict` on a task split, with ``labels`` and ``metrics`` filled in.

    ``metrics``: the task's metrics (:func:`ee_gym.tasks.compute_metrics`) plus ``mean_exit_layer``,
    ``speed_up`` (L / mean exit layer), ``saved_layers`` and ``seconds``. ``max_length`` defaults to
    the task's default (:func:`ee_gym.tasks.task_default`).
    """
    from ee_gym.tasks import compute_metrics, load_split, task_default

    examples = load_split(task, split, data_dir, limit)
    if max_length is None:
        max_length = task_default(task, "max_length")
    out = predict(
        model,
        examples.text_a,
        examples.text_b,
        policy=policy,
        batch_size=batch_size,
        max_length=max_length,
        deterministic=deterministic,
    )
    out.labels = examples.labels
    out.metrics = compute_metrics(task, out.predictions, examples.labels) if len(out) else {}
    out.metrics.update(
        mean_exit_layer=out.mean_exit_layer,
        speed_up=out.speed_up,
        saved_layers=out.saved_layers,
        seconds=out.seconds,
    )
    return out
