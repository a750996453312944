"""Find (or make) what an env needs: the stage-1 model and the per-layer table of a split.

``gym.make("ConsistentEE-RTE-v0")`` with nothing else said trains stage 1 for RTE on the default
backbone (once, with a progress bar; later calls reuse it), builds the cache of the split (once) and
loads it. Every step of that can be pointed elsewhere with the env's keyword arguments.
"""

from __future__ import annotations

import os

from ee_gym.backbones import DEFAULT_BACKBONE
from ee_gym.cache import build_cache
from ee_gym.envs.table import ExitTable
from ee_gym.multiexit import MultiExitModel
from ee_gym.tasks import get_task
from ee_gym.training import Stage1Config, train_stage1

_TABLES: dict[tuple, ExitTable] = {}  # tables already loaded in this process, by cache identity


def load_model(
    task: str,
    *,
    model: MultiExitModel | str | os.PathLike | None = None,
    backbone: str = DEFAULT_BACKBONE,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> MultiExitModel:
    """A multi-exit model: the one given, a checkpoint folder, or stage 1 of (task, backbone)."""
    if isinstance(model, MultiExitModel):
        return model.eval()
    if model is not None:
        return MultiExitModel.from_pretrained(model)
    config = Stage1Config(
        task=task, backbone=backbone, data_dir=None if data_dir is None else str(data_dir), progress=progress
    )
    return train_stage1(config).model.eval()


def default_max_length(task: str) -> int:
    return Stage1Config(task=task).resolved().max_length


def load_table(
    model: MultiExitModel,
    task: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_inputs: int | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> ExitTable:
    """The split's per-layer table, from its cache (built first if missing)."""
    task = get_task(task).name
    max_length = max_length or default_max_length(task)
    key = (model.fingerprint(), task, split, max_inputs, max_length, str(cache_dir))
    if key not in _TABLES:
        cache = build_cache(
            model,
            task,
            split,
            cache_dir,
            data_dir=data_dir,
            max_length=max_length,
            limit=max_inputs,
            progress=progress,
        )
        _TABLES[key] = ExitTable.from_cache(cache)
    return _TABLES[key]
