"""Cross-fitted policy data: every training input's per-layer table from a model that never saw it.

An exit policy learns from the heads' outputs, and on inputs the heads were fitted to those outputs
are too confident (``paper`` protocol); holding a slice of ``train`` out of stage 1 keeps them honest
but leaves the policy few inputs (``held-out``). Cross-fitting keeps both: ``train`` is cut into k
contiguous folds, fold model i is stage 1 on every fold but i, and the policy table's rows of fold i
come from fold model i. The policy learns on all of ``train``; the model it then drives (and that is
evaluated on dev) is stage 1 on all of ``train``, so its heads have seen as much data as the paper's.

Fold models are ordinary stage-1 runs on a union split (``train[:830]+train[1660:]``): each has its
default folder (:func:`ee_gym.training.default_stage1_dir`), resumes when interrupted and is reused by
every later call, like any stage-1 run. They take the evaluated model's recorded stage-1 settings, so
that a fold model differs from it only by the fold it did not see.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ee_gym.envs.table import ExitTable
from ee_gym.multiexit import MultiExitModel
from ee_gym.tasks import get_task, split_rows
from ee_gym.training import Stage1Config, _saved_config, train_stage1
from ee_gym.validation import ConfigError


@dataclass(frozen=True)
class Fold:
    """One fold of a split: the rows its model never saw, and the split that model trains on."""

    index: int
    start: int  # first row of the held-out fold
    stop: int  # one past its last row
    held_split: str  # e.g. "train[830:1660]"
    train_split: str  # the rest, e.g. "train[:830]+train[1660:]"


def make_folds(
    num_rows: int, k: int, split: str = "train", offset: int = 0, to_end: bool = True
) -> list[Fold]:
    """``k`` contiguous folds of ``num_rows`` rows (sizes differ by at most one), as split strings.

    The rows are ``offset`` .. ``offset + num_rows`` of ``split``; ``to_end`` False when more rows
    follow them (an evaluation split carved from the end), so that no fold model trains on those.
    ``start``/``stop`` count from ``offset`` (rows of the policy table); the split strings name rows
    of ``split``."""
    if not 2 <= k <= num_rows:
        raise ValueError(f"cross-fitting needs 2 <= k <= the {num_rows} rows of {split!r}, got k={k}")
    bounds = [num_rows * i // k for i in range(k + 1)]
    end = "" if to_end else str(offset + num_rows)
    folds = []
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        rest = [f"{split}[{offset or ''}:{offset + start}]"] if start > 0 else []
        rest += [f"{split}[{offset + stop}:{end}]"] if stop < num_rows else []
        folds.append(Fold(i, start, stop, f"{split}[{offset + start}:{offset + stop}]", "+".join(rest)))
    return folds


def rows_within(task: str, split: str, within: str, data_dir) -> range:
    """The rows of ``split`` as positions in ``within`` (the cross-fitted policy split), or ConfigError
    when ``split`` is not a slice of it: a fold model may have trained on rows outside it."""
    spec = get_task(task)
    base, low, high, _ = split_rows(spec, within, data_dir)
    try:
        sub_base, sub_low, sub_high, _ = split_rows(spec, split, data_dir)
    except ValueError:
        sub_base, sub_low, sub_high = None, 0, 0
    if sub_base != base or not low <= sub_low <= sub_high <= high:
        raise ConfigError(
            f"under a cross-fit protocol the policy split must be {within!r} or one slice of it (rows "
            f"{low} to {high} of {base!r}), e.g. '{base}[{low}:{low + (high - low) // 4}]', not {split!r}: "
            "only those rows have a table from a fold model that never saw them"
        )
    return range(sub_low - low, sub_high - low)


@dataclass
class CrossFitTable:
    """The cross-fitted table of a split, with where each row came from."""

    table: ExitTable  # rows in the split's order
    folds: list[Fold]  # the folds whose models gave rows (all of them unless a subset was asked for)
    fold_of: np.ndarray  # [N] the fold (and so the fold model) of each row
    fingerprints: list[str]  # fold model i's weights fingerprint
    run_dirs: list[str]  # fold model i's stage-1 run folder
    stage1_seconds: list[float]  # the epochs' training time its run recorded (the extra stage-1 cost)
    num_folds: int = 0  # k, the folds the split was cut into

    def summary(self) -> dict:
        """JSON-ready: the folds, their models' fingerprints and sizes."""
        return {
            "folds": [
                {**dataclasses.asdict(f), "fingerprint": fp, "run_dir": run_dir, "stage1_seconds": sec}
                for f, fp, run_dir, sec in zip(
                    self.folds, self.fingerprints, self.run_dirs, self.stage1_seconds, strict=True
                )
            ],
            "rows": int(len(self.fold_of)),
            "k": self.num_folds,  # the folds of the split ("folds" lists those whose models gave rows)
        }


def fold_stage1_config(base: Stage1Config) -> Stage1Config:
    """``base`` with the settings the evaluated model's finished run recorded (when it has a folder),
    so that fold models are trained as it was; train_split and output_dir are set per fold."""
    saved = _saved_config(base.resolved().output_dir) or {}
    fields = {f.name for f in dataclasses.fields(Stage1Config)} - {"train_split", "output_dir", "progress"}
    return dataclasses.replace(base, **{k: v for k, v in saved.items() if k in fields})


def cross_fit_table(
    base: Stage1Config,
    k: int,
    *,
    split: str = "train",
    table_for: Callable[[MultiExitModel, str], ExitTable],
    initial_model: Callable[[], MultiExitModel] | None = None,
    rows: range | None = None,
    name: str | None = None,
) -> CrossFitTable:
    """The cross-fitted table of ``split``: train (or reuse) one stage-1 model per fold, and take each
    fold's rows from its model. ``split`` is a split or a slice of one (``"train[:90%]"``, when an
    evaluation split is carved after it); fold models train on the slice's other folds only.

    ``base`` holds the stage-1 settings (its ``train_split`` is ignored); ``table_for(model, split)``
    builds (or reads the cache of) a model's table on a split; ``initial_model`` makes the model each
    fold's stage 1 starts from (a tiny random one in tests; None: the backbone's pretrained weights).
    ``rows`` (positions in ``split``; default all) keeps only those rows, so that a fold holding none
    of them is never trained and a fold model's forward pass covers only its rows in the subset; the
    folds stay those of the whole ``split``. ``name`` names the table's split (default ``split``).
    """
    task = get_task(base.task)
    base_split, low, high, to_end = split_rows(task, split, base.data_dir)
    folds = make_folds(high - low, k, base_split, offset=low, to_end=to_end)
    wanted = range(high - low) if rows is None else rows
    used, tables, fingerprints, run_dirs, seconds, fold_of = [], [], [], [], [], []
    for fold in folds:
        start, stop = max(fold.start, wanted.start), min(fold.stop, wanted.stop)
        if start >= stop:  # none of the wanted rows is in this fold: its model is not needed
            continue
        config = dataclasses.replace(base, train_split=fold.train_split, output_dir=None)
        # a finished fold run is reused as it is (train_stage1 returns it), an unfinished one resumed
        run = train_stage1(config, model=None if initial_model is None else initial_model())
        model = run.model.eval()
        # the fold's held split itself when the whole fold is wanted (make_folds names it alike)
        tables.append(table_for(model, f"{base_split}[{low + start}:{low + stop}]"))
        used.append(fold)
        fold_of.append(np.full(stop - start, fold.index, dtype=np.int64))
        fingerprints.append(model.fingerprint())
        run_dirs.append(str(Path(run.model_dir).parent))
        seconds.append(round(sum(r.get("seconds", 0.0) for r in getattr(run, "history", None) or []), 1))
    return CrossFitTable(
        ExitTable.concatenate(tables, name or split), used, np.concatenate(fold_of), fingerprints, run_dirs,
        seconds, k,
    )  # fmt: skip


def cross_fit_for(
    task: str,
    k: int,
    *,
    backbone: str,
    data_dir: str | os.PathLike | None,
    progress: bool,
    table_for: Callable[[MultiExitModel, str], ExitTable],
    split: str = "train",
    rows: range | None = None,
    name: str | None = None,
) -> CrossFitTable:
    """:func:`cross_fit_table` of ``split`` for stage 1 of (task, backbone) on ``split`` in its
    default folder (the model ``load_model(..., protocol="cross-fit")`` returns; ``split`` is the
    protocol's stage-1 and policy split, ``"train[:90%]"`` under ``cross-fit,eval=10%``); ``rows`` and
    ``name`` keep a subset of it (:func:`cross_fit_table`)."""
    base = Stage1Config(
        task=task, backbone=backbone, data_dir=None if data_dir is None else str(data_dir), progress=progress,
        train_split=split,
    )  # fmt: skip
    return cross_fit_table(
        fold_stage1_config(base), k, split=split, table_for=table_for, rows=rows, name=name
    )
