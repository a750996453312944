"""Find (or make) what an env needs: the stage-1 model and the per-layer table of a split.

``gym.make("ConsistentEE-RTE-v0")`` with nothing else said trains stage 1 for RTE on the default
backbone (once, with a progress bar; later calls reuse it), builds the cache of the split (once) and
loads it. Every step of that can be pointed elsewhere with the env's keyword arguments.

Which inputs the exit policy learns from is a protocol (:mod:`ee_gym.protocols`): with nothing said,
``paper``, so ``gym.make`` uses the same stage-1 model (of ``train``, in its default folder) and the
same policy split (``train``) as ``python -m benchmarks.compare`` and ``python -m agents``: one model
per task, backbone and protocol. :func:`policy_tables` returns the (policy, dev) tables of one. Why
paper is the default, measured: ``docs/protocols.md``.
"""

from __future__ import annotations

import os

from ee_gym.backbones import DEFAULT_BACKBONE, max_input_length
from ee_gym.cache import build_cache
from ee_gym.envs.table import ExitTable
from ee_gym.multiexit import MultiExitModel, check_model_task
from ee_gym.protocols import DEFAULT_PROTOCOL, POLICY_PROTOCOLS, env_split, get_protocol  # noqa: F401 (env_split: re-exported)
from ee_gym.tasks import get_task, load_split, task_default
from ee_gym.training import Stage1Config, finished_stage1_model, train_stage1

#: Re-exported from :mod:`ee_gym.protocols` (where every entry point reads them).
POLICY_PROTOCOL = DEFAULT_PROTOCOL
STAGE1_SPLIT, POLICY_SPLIT = POLICY_PROTOCOLS[POLICY_PROTOCOL]

_TABLES: dict[tuple, ExitTable] = {}  # tables already loaded in this process, by cache identity


def load_model(
    task: str,
    *,
    model: MultiExitModel | str | os.PathLike | None = None,
    backbone: str = DEFAULT_BACKBONE,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    train_split: str | None = None,
    protocol: str | None = None,
) -> MultiExitModel:
    """A multi-exit model: the one given, a checkpoint folder, or stage 1 of (task, backbone) trained
    on ``train_split`` (None: the stage-1 split of ``protocol``, itself None for the default,
    ``paper``): the finished run in its default folder whatever its settings (reported in one
    line when they are not the defaults, see :func:`ee_gym.training.finished_stage1_model`), else
    trained (or resumed) with the defaults."""
    protocol_split = get_protocol(protocol).stage1_split  # checked even when a model is given
    if isinstance(model, MultiExitModel):
        return model.eval()
    if model is not None:
        return MultiExitModel.from_pretrained(model)
    train_split = protocol_split if train_split is None else train_split
    config = Stage1Config(
        task=task,
        backbone=backbone,
        data_dir=None if data_dir is None else str(data_dir),
        progress=progress,
        train_split=train_split,
    )
    finished = finished_stage1_model(config)
    if finished is not None:
        return finished.eval()
    return train_stage1(config).model.eval()


def default_max_length(task: str, model: MultiExitModel | None = None) -> int:
    """The task's stage-1 max length, capped at what ``model``'s backbone takes when it is given (an
    explicit ``max_length`` past that limit is an error instead, see ``check_max_length``)."""
    length = task_default(task, "max_length")
    return length if model is None else min(length, max_input_length(model))


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
    allow_other_task: bool = False,
) -> ExitTable:
    """The split's per-layer table, from its cache (built first if missing).

    The split is loaded (once) to hash its content, so that a changed copy of the data is never
    served from the table or cache of another; a model trained for another task is refused unless
    ``allow_other_task=True`` (see :func:`ee_gym.multiexit.check_model_task`).
    """
    task = get_task(task).name
    check_model_task(model, task, allow_other_task)
    max_length = max_length or default_max_length(task, model)
    examples = load_split(task, split, data_dir, max_inputs)
    key = (model.fingerprint(), task, split, max_inputs, max_length, str(cache_dir), examples.content_hash())
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
            allow_other_task=allow_other_task,
            examples=examples,
        )
        _TABLES[key] = ExitTable.from_cache(cache)
    return _TABLES[key]


def policy_table(
    model: MultiExitModel,
    task: str,
    protocol: str | None = None,
    *,
    split: str | None = None,
    backbone: str = DEFAULT_BACKBONE,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **table_options,
) -> ExitTable:
    """The table the exit policy learns from under ``protocol``: ``model``'s table of the protocol's
    policy split (or of ``split``), except under ``cross-fit``, where the policy split's rows come from
    the fold models of (task, ``backbone``) (:mod:`ee_gym.crossfit`, trained on first use); there
    ``split`` may be one slice of the policy split (a subset of a large train), whose rows are taken
    from that table, and anything else is a ConfigError.
    ``table_options`` go to :func:`load_table` (max_length, max_inputs, cache_dir, ...)."""
    chosen = get_protocol(protocol)
    split = chosen.policy_split if split is None else split
    options = dict(data_dir=data_dir, progress=progress, **table_options)
    if not chosen.cross_fit:
        return load_table(model, task, split, **options)
    from ee_gym.crossfit import cross_fit_for, rows_within

    # a slice of the cross-fitted split (a subset of a large train): only the fold models holding its
    # rows are trained, each over its rows alone
    rows = None if split == chosen.policy_split else rows_within(task, split, chosen.policy_split, data_dir)
    given = tuple(sorted((k, str(v)) for k, v in table_options.items() if v is not None))
    key = ("cross-fit", chosen.folds, model.fingerprint(), task, split, str(backbone), str(data_dir), given)
    if key not in _TABLES:
        max_inputs = options.pop("max_inputs", None)
        fitted = cross_fit_for(
            task, chosen.folds, backbone=backbone, data_dir=data_dir, progress=progress, split=chosen.policy_split,
            table_for=lambda fold_model, fold_split: load_table(fold_model, task, fold_split, **options),
            rows=rows, name=split,
        )  # fmt: skip
        table = fitted.table if max_inputs is None else fitted.table.head(max_inputs)
        table.cross_fit = fitted.summary()  # where each row came from, for the records
        _TABLES[key] = table
    return _TABLES[key]


def env_table(
    task: str,
    split: str,
    *,
    protocol: str | None,
    model: MultiExitModel | str | os.PathLike | None,
    backbone: str | None,
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None,
    max_inputs: int | None,
    max_length: int | None,
    progress: bool,
) -> tuple[MultiExitModel, ExitTable]:
    """What a cached env on ``split`` replays: (its model, the table), by :func:`load_model` and
    :func:`policy_table` (so that ``protocol="cross-fit"`` plays the cross-fitted table)."""
    backbone = backbone or DEFAULT_BACKBONE
    loaded = load_model(
        task, model=model, backbone=backbone, data_dir=data_dir, progress=progress, protocol=protocol
    )
    table = policy_table(
        loaded, task, protocol, split=split, backbone=backbone, data_dir=data_dir, progress=progress,
        cache_dir=cache_dir, max_inputs=max_inputs, max_length=max_length or default_max_length(task, loaded),
    )  # fmt: skip
    return loaded, table


def policy_tables(
    task: str,
    protocol: str = POLICY_PROTOCOL,
    *,
    backbone: str = DEFAULT_BACKBONE,
    data_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> tuple[ExitTable, ExitTable]:
    """(table the exit policy learns from, dev table) under ``protocol`` (see :data:`POLICY_PROTOCOLS`).

    Both come from the stage-1 model of the protocol's stage-1 split, trained on first use, except
    the cross-fitted policy table of ``cross-fit`` (:func:`policy_table`).
    """
    chosen = get_protocol(protocol)
    model = load_model(task, backbone=backbone, data_dir=data_dir, progress=progress, protocol=chosen.name)
    options = dict(data_dir=data_dir, max_length=max_length, progress=progress)
    train = policy_table(model, task, chosen.name, backbone=backbone, **options)
    return train, load_table(model, task, "dev", **options)
