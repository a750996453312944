"""Exit heads of a decoder's layers 1..L-1: their kinds, how they are built, and their folder on disk.

Exit l is ``head_l(final_norm(h_l))``; exit L is always the model's own LM head, so full-depth
decoding reproduces the model's greedy ``generate`` (docs/method.md, "Generation"). Three kinds for
layers 1..L-1 (``head_kind``): ``copy`` (a trainable copy of the LM head per layer, the paper's
choice), ``shared`` (the LM head itself, CALM's choice) and ``adapter`` (the LM head after a per-layer
affine map of the state, initialised to the identity: the "tuned lens", trainable at a fraction of a
copy's size). Kept apart from the decoding loop so that what is trained and saved (the heads) is
one small module, whatever runs them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

#: Exit heads of layers 1..L-1 (exit L is always the model's own LM head), see MultiExitDecoder.
HEAD_KINDS = ("copy", "shared", "adapter")
HEADS_CONFIG = "exit_heads.json"
HEADS_WEIGHTS = "exit_heads.safetensors"
#: what a heads folder must match in the decoder it is loaded into
SHAPE_KEYS = ("model_type", "num_layers", "hidden_size", "vocab_size")


def resolve_head_kind(head_kind: str | None, share_heads: bool) -> str:
    """``head_kind``, or the older ``share_heads`` spelling of it (``shared`` / ``copy``)."""
    if head_kind is None:
        return "shared" if share_heads else "copy"
    if share_heads and head_kind != "shared":
        raise ValueError(f"share_heads=True contradicts head_kind={head_kind!r}: give only head_kind")
    return head_kind


class ExitAdapter(nn.Module):
    """s -> s + W s + b (``rank=None``, W: d x d) or s + U V s + b (rank r, V: d -> r, U: r -> d).

    Zero at initialisation (W = 0, or U = 0 with V random as LoRA does, so that V still gets a
    gradient): an adapted exit starts as the model's own LM head on its layer's state.
    """

    def __init__(self, hidden_size: int, rank: int | None = None):
        super().__init__()
        if rank is not None and not 1 <= int(rank) <= hidden_size:
            raise ValueError(f"adapter rank must be in 1..{hidden_size} (or None for full d x d), got {rank}")
        self.rank = None if rank is None else int(rank)
        self.down = None if rank is None else nn.Linear(hidden_size, self.rank, bias=False)
        self.up = nn.Linear(hidden_size if rank is None else self.rank, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states + self.up(states if self.down is None else self.down(states))


class AdapterHead(nn.Module):
    """An exit head of the ``adapter`` kind: ``lm_head(s + adapter(s))``.

    The LM head is the model's own, shared by every exit and frozen: it is held outside the module's
    parameters, so the head's state dict (what is trained and saved) is the adapter alone.
    """

    def __init__(self, lm_head: nn.Module, hidden_size: int, rank: int | None = None):
        super().__init__()
        self.adapter = ExitAdapter(hidden_size, rank)
        self.__dict__["lm_head"] = lm_head  # bypasses nn.Module registration on purpose

    @property
    def out_features(self) -> int:
        return self.lm_head.out_features

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.adapter(states))


def build_heads(
    lm_head: nn.Linear, head_kind: str, num_layers: int, hidden_size: int, adapter_rank: int | None = None
) -> nn.ModuleList | None:
    """Fresh heads of layers 1..L-1 of ``head_kind`` (None for ``shared``: the LM head serves them)."""
    if head_kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {head_kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    if adapter_rank is not None and head_kind != "adapter":
        raise ValueError(f"adapter_rank is for head_kind='adapter', not {head_kind!r}")
    if head_kind == "shared":
        return None
    if head_kind == "copy":
        # Copies, not views: a tied LM head shares its weight with the input embeddings, and the
        # copies must be free to train apart from it.
        return nn.ModuleList(copy.deepcopy(lm_head) for _ in range(num_layers - 1))
    heads = nn.ModuleList(AdapterHead(lm_head, hidden_size, adapter_rank) for _ in range(num_layers - 1))
    return heads.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)


def write_heads(folder: str | os.PathLike, heads: nn.ModuleList | None, record: dict) -> Path:
    """Write ``exit_heads.json`` (``record``: kind, sizes, metadata) and ``exit_heads.safetensors``
    (absent for the ``shared`` kind, which has no weights).

    Written to a temporary sibling first and renamed, so an interrupted save never leaves a
    half-written folder behind.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / HEADS_CONFIG).write_text(json.dumps(record, indent=2))
    if heads is not None:
        weights = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
        save_file(weights, str(tmp / HEADS_WEIGHTS))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_heads_record(folder: str | os.PathLike, expected: dict) -> dict:
    """The record of a heads folder, checked against the decoder's ``expected`` sizes (SHAPE_KEYS)."""
    folder = Path(folder)
    if not (folder / HEADS_CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder} holds no exit heads (no {HEADS_CONFIG}): write one with decoder.save_heads(folder) "
            "or train one with ee_gym.generation.training.train_exit_heads"
        )
    record = json.loads((folder / HEADS_CONFIG).read_text())
    mine = tuple(expected[k] for k in SHAPE_KEYS)
    theirs = tuple(record[k] for k in SHAPE_KEYS)
    if mine != theirs:
        raise ValueError(
            f"{folder} holds heads for (model type, layers, hidden size, vocab) = {theirs}, "
            f"this decoder is {mine}: load heads trained on this model"
        )
    return record


def read_head_weights(folder: str | os.PathLike, device: torch.device) -> dict[str, torch.Tensor]:
    """The saved state dict of a heads folder's weights."""
    return load_file(str(Path(folder) / HEADS_WEIGHTS), device=str(device))
