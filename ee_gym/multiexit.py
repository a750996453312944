"""The multi-exit model: a backbone with one shared pooler and one classifier head per layer.

State at layer l (docs/method.md): s_l = P(h_l), with P = tanh(Linear(summary(h_l))) shared by all layers
and summary = the first token ("cls") or the masked mean over tokens ("mean"). Head l gives
C_l(s_l), the exit's logits.

Two ways to run it:
- ``forward``: every layer, every exit at once (stage 1 training, the per-layer cache);
- ``start`` / ``advance`` / ``exit_outputs``: one layer at a time on a :class:`LayerState`, whose rows
  can be dropped with ``LayerState.select`` as inputs exit (live envs, fast batched inference);
  ``run(batch, decide)`` is that loop with an exit decider (:mod:`ee_gym.runner`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from ee_gym.backbones import (
    DEFAULT_BACKBONE,
    LayerwiseEncoder,
    default_pooling,
    load_encoder,
    load_tokenizer,
)
from ee_gym.files import CorruptFileError, read_json
from ee_gym.model_card import CardFacts, multiexit_card, write_card

POOLINGS = ("cls", "mean")
CONFIG_NAME = "multiexit_config.json"
WEIGHTS_NAME = "model.safetensors"
FINGERPRINT_NAME = "fingerprint"


class TaskMismatchError(ValueError):
    """A model asked to serve a task it was not trained for (another task, or another label count)."""


def check_model_task(model: MultiExitModel, task: Any, allow_other_task: bool = False) -> None:
    """Refuse, before anything runs or is written, a model for another task.

    A label-count mismatch (a 2-label model on a 3-label task) is always an error. A model trained
    for another task (``model.config.task``, recorded in ``multiexit_config.json``), or for the same
    task with other label names, is an error unless ``allow_other_task=True`` says it is meant. A
    model that records no task (built by hand) passes the task check.
    """
    from ee_gym.tasks import _key, get_task

    spec = get_task(task)
    config = model.config
    trained = f"trained for task {config.task!r}" if config.task else "built"
    if model.num_labels != spec.num_labels:
        raise TaskMismatchError(
            f"the model ({config.backbone}, {trained}) has {model.num_labels} labels per exit, but task "
            f"{spec.name!r} has {spec.num_labels} ({', '.join(spec.labels)}): it cannot serve it. Use a model "
            f"trained for {spec.name!r} (`ee-gym stage1 --task {spec.name}`, or train_stage1(task={spec.name!r}))."
        )
    if allow_other_task or not config.task:
        return
    if _key(config.task) != _key(spec.name):
        raise TaskMismatchError(
            f"the model ({config.backbone}) was trained for task {config.task!r}, not {spec.name!r}. Use a "
            f"model trained for {spec.name!r} (`ee-gym stage1 --task {spec.name}`), or pass "
            "allow_other_task=True if serving it on this task is meant."
        )
    if config.labels is not None and tuple(config.labels) != spec.labels:
        raise TaskMismatchError(
            f"the model was trained for task {spec.name!r} with labels {list(config.labels)} (in id order), "
            f"but the task now has {list(spec.labels)}: its predictions would mean other labels. Retrain "
            f"it (`ee-gym stage1 --task {spec.name}`), or pass allow_other_task=True if this is meant."
        )


@dataclass
class MultiExitConfig:
    """Everything needed to rebuild a :class:`MultiExitModel` (saved as JSON)."""

    backbone: str = DEFAULT_BACKBONE  # the name or path it was built from (informational after load)
    num_labels: int = 2
    pooling: str = "cls"
    head_dropout: float = 0.1
    labels: list[str] | None = None
    task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (stage, run, ...)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.num_labels < 1:  # 1: one output per head, a regression task's
            raise ValueError(
                f"num_labels must be >= 1 (2+ classes, or 1 for regression), got {self.num_labels}"
            )


@dataclass
class LayerState:
    """A batch part-way through the backbone: every row has run ``layer`` layers (0 = embeddings)."""

    hidden: torch.Tensor  # [B, T, d]
    attention_mask: torch.Tensor  # [B, T] 1 = token, 0 = padding
    layer_mask: Any  # what the backbone's layers receive (LayerwiseEncoder.layer_mask)
    layer: int = 0

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def select(self, rows: torch.Tensor, encoder: LayerwiseEncoder) -> LayerState:
        """Keep only ``rows`` (indices or a boolean mask), trimming padding no kept row needs."""
        hidden = self.hidden[rows]
        attention_mask = self.attention_mask[rows]
        used = attention_mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        hidden, attention_mask = hidden[:, :length], attention_mask[:, :length]
        return LayerState(hidden, attention_mask, encoder.layer_mask(attention_mask, hidden), self.layer)


@dataclass
class ExitOutput:
    states: torch.Tensor  # [B, d] pooled state s_l
    logits: torch.Tensor  # [B, K] head l's logits


class MultiExitModel(nn.Module):
    """A pretrained encoder with the exits of ConsistentEE (one pooler, one head per layer)."""

    def __init__(self, encoder: LayerwiseEncoder, config: MultiExitConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        d = encoder.hidden_size
        self.pooler = nn.Linear(d, d)
        own = encoder.take_pooler()
        if own is not None:  # start from the backbone's pre-trained pooler
            self.pooler.load_state_dict(own.state_dict())
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.heads = nn.ModuleList(nn.Linear(d, config.num_labels) for _ in range(encoder.num_layers))

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | PretrainedConfig = DEFAULT_BACKBONE,
        num_labels: int = 2,
        pooling: str | None = None,
        head_dropout: float = 0.1,
        tokenizer=None,
        **config_fields: Any,
    ) -> MultiExitModel:
        """New exits over a pretrained backbone (a name or path), or over a random one (a config).

        ``pooling=None`` follows how the backbone was pre-trained (see ``default_pooling``).
        """
        if isinstance(backbone, PretrainedConfig):
            name = f"random-{backbone.model_type}"
            pooling = pooling or "cls"
        else:
            name = str(backbone)
            pooling = pooling or default_pooling(name)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name)
        config = MultiExitConfig(
            backbone=name, num_labels=num_labels, pooling=pooling, head_dropout=head_dropout, **config_fields
        )
        return cls(LayerwiseEncoder(load_encoder(backbone)), config, tokenizer)

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        extra: Callable[[Path], None] | None = None,
        card: CardFacts | None = None,
    ) -> Path:
        """Write config JSON, backbone config, tokenizer, one safetensors file of weights and a model
        card (``README.md``, :mod:`ee_gym.model_card`; ``card`` adds what the trainer knows: stage,
        split, per-layer dev metrics, settings).

        Written to a temporary sibling first and renamed, so an interrupted save never leaves a
        half-written checkpoint behind. ``extra(tmp_folder)`` may add files (optimizer state, ...)
        that must land together with the weights.
        """
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            _rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        self.encoder.config.save_pretrained(tmp / "backbone")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
        save_model(self, str(tmp / WEIGHTS_NAME))
        fingerprint = self.fingerprint()
        (tmp / FINGERPRINT_NAME).write_text(fingerprint)
        write_card(tmp, multiexit_card(self.config, self.num_layers, fingerprint, card))
        if extra is not None:
            extra(tmp)
        if folder.exists():
            _rmtree(folder)
        tmp.rename(folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str = "cpu") -> MultiExitModel:
        """Load a folder written by :meth:`save_pretrained`.

        The loaded weights are checked against the folder's ``fingerprint`` file (one hash of the
        weights, a fraction of a second for MiniLM): a checkpoint whose files were damaged or changed
        after saving raises :class:`~ee_gym.files.CorruptFileError` naming the folder and the fix, as
        does an unreadable ``multiexit_config.json`` or ``model.safetensors``.
        """
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} is not a multi-exit checkpoint (no {CONFIG_NAME}). Train one with "
                "`ee-gym stage1 --task <task>` or build one with MultiExitModel.from_backbone(...)."
            )
        fix = _checkpoint_fix(folder)
        fields = read_json(folder / CONFIG_NAME, fix)
        try:
            config = MultiExitConfig(**fields)
        except (TypeError, ValueError) as error:  # not an object, unknown or bad fields
            raise CorruptFileError(
                f"{folder / CONFIG_NAME} is not a multi-exit config ({error}); {fix}"
            ) from None
        try:
            backbone_config = AutoConfig.from_pretrained(folder / "backbone")
        except (OSError, ValueError) as error:
            raise CorruptFileError(f"{folder / 'backbone'} cannot be read ({error}); {fix}") from None
        encoder = LayerwiseEncoder(AutoModel.from_config(backbone_config))
        tokenizer = (
            AutoTokenizer.from_pretrained(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
        )
        model = cls(encoder, config, tokenizer)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}; {fix}")
        try:
            load_model(model, str(weights), strict=True, device=map_location)
        except (SafetensorError, OSError, EOFError) as error:  # truncated or not a safetensors file
            raise CorruptFileError(f"{weights} cannot be read ({error}); {fix}") from None
        except RuntimeError as error:  # other tensors than this config's model has
            if isinstance(error, torch.OutOfMemoryError):
                raise
            raise CorruptFileError(
                f"{weights} does not hold the weights of the model its {CONFIG_NAME} and backbone/ "
                f"describe ({str(error).splitlines()[0]}); {fix}"
            ) from None
        saved_file = folder / FINGERPRINT_NAME
        if saved_file.is_file():
            saved, loaded = saved_file.read_text().strip(), model.fingerprint()
            if saved != loaded:
                raise CorruptFileError(
                    f"the checkpoint {folder} is damaged: its weights hash to {loaded}, but it was saved "
                    f"with fingerprint {saved} ({FINGERPRINT_NAME} file), so {WEIGHTS_NAME} or {CONFIG_NAME} "
                    f"changed after saving; {fix}"
                )
        return model.eval()

    def fingerprint(self) -> str:
        """A hash of the weights and config: caches record it and refuse any other model."""
        digest = hashlib.sha256()
        digest.update(json.dumps(dataclasses.asdict(self.config), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()[:16]

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def device(self) -> torch.device:
        return self.pooler.weight.device

    # -- tokenisation --------------------------------------------------------------------------
    def tokenize(
        self, text_a: list[str], text_b: list[str] | None = None, max_length: int = 128
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch (padded to its longest row) into tensors on the model's device."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass one to MultiExitModel(...)")
        batch = self.tokenizer(
            text_a, text_b, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items() if k in _MODEL_INPUTS}

    # -- layer by layer -------------------------------------------------------------------------
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> LayerState:
        """Embed a batch: the state before layer 1."""
        hidden = self.encoder.embed(input_ids, token_type_ids)
        return LayerState(hidden, attention_mask, self.encoder.layer_mask(attention_mask, hidden), 0)

    def advance(self, state: LayerState) -> LayerState:
        """Run the next layer for every row of ``state``."""
        if state.layer >= self.num_layers:
            raise IndexError(f"all {self.num_layers} layers have already run")
        hidden = self.encoder.layer(state.layer, state.hidden, state.layer_mask)
        return LayerState(hidden, state.attention_mask, state.layer_mask, state.layer + 1)

    def select(self, state: LayerState, rows: torch.Tensor) -> LayerState:
        """Keep only ``rows`` of a batch (those that have not exited)."""
        return state.select(rows, self.encoder)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """s = P(h): the shared pooler on the first token or the masked token mean."""
        if self.config.pooling == "cls":
            summary = hidden[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summary = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return torch.tanh(self.pooler(summary))

    def head(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``layer`` (1-based, as in docs/method.md) for pooled states."""
        return self.heads[layer - 1](self.head_dropout(states))

    def exit_outputs(self, state: LayerState) -> ExitOutput:
        """Pooled state and logits of the exit at the state's current layer."""
        if state.layer < 1:
            raise ValueError("no exit before layer 1: call advance() first")
        states = self.pool(state.hidden, state.attention_mask)
        return ExitOutput(states, self.head(state.layer, states))

    def run(self, batch: dict[str, torch.Tensor], decide: Any = None) -> Any:
        """Run ``batch`` layer by layer, dropping rows as ``decide`` exits them (None: full depth):
        :func:`ee_gym.runner.run_layers`, the one loop inference and stage 3 share."""
        from ee_gym.runner import run_layers  # the runner builds on this module

        return run_layers(self, batch, decide)

    # -- all exits at once ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> ExitOutput:
        """Every exit: states [B, L, d] and logits [B, L, K]."""
        state = self.start(input_ids, attention_mask, token_type_ids)
        states, logits = [], []
        for _ in range(self.num_layers):
            state = self.advance(state)
            out = self.exit_outputs(state)
            states.append(out.states)
            logits.append(out.logits)
        return ExitOutput(torch.stack(states, 1), torch.stack(logits, 1))


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _checkpoint_fix(folder: Path) -> str:
    return (
        f"retrain it (`ee-gym stage1 --task <task>`, which writes a new one), copy or download it again, "
        f"or delete the folder {folder}"
    )


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
