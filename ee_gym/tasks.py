"""Classification tasks: what each one is, and how to load its splits.

A :class:`TaskSpec` names a task's labels, its primary metric and where its data lives. The built-in
tasks are seven GLUE tasks (``rte``, ``mrpc``, ``sst2``, ``cola``, ``qnli``, ``qqp``, ``mnli``) whose
label ids follow the Hugging Face ``nyu-mll/glue`` dataset, so that a local copy and the hub give the
same ids. :func:`load_split` reads one split into memory as :class:`Examples`:

- from ``<data>/glue/<DIR>/<split file>`` when a data folder is set (``data_dir=`` or ``$EE_GYM_DATA``,
  see :mod:`ee_gym.paths`);
- from the Hugging Face hub otherwise.

Your own data joins with :func:`task_from_files` (CSV, TSV or JSON lines) or :func:`task_from_hub`
(any ``datasets`` name); both register the task so that every name-taking function knows it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from ee_gym import paths
from ee_gym.validation import ConfigError

__all__ = [
    "DEFAULT_HUB_SPLITS",
    "DEFAULT_SPLIT_FILES",
    "MAX_NUMERIC_CLASSES",
    "METRICS",
    "DataSourceError",
    "Examples",
    "TableFormat",
    "TaskDefaults",
    "TaskSpec",
    "UnknownTaskError",
    "check_data_source",
    "compute_metrics",
    "data_status",
    "check_split",
    "get_task",
    "load_split",
    "on_register",
    "parse_split",
    "primary_metric",
    "register_task",
    "resolve_task",
    "split_parts",
    "split_slug",
    "task_from_files",
    "task_from_hub",
    "task_names",
    "task_spec_from_dict",
    "task_default",
    "task_spec_to_dict",
]

#: a task's kind: one label id per input (classification) or one real number (regression)
TASK_KINDS = ("classification", "regression")
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
#: regression's headline metric: the mean of Pearson's and Spearman's correlation (GLUE's STS-B)
REGRESSION_METRICS = ("correlation",)
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
DEFAULT_SPLIT_FILES: Mapping[str, str] = MappingProxyType({"train": "train.tsv", "dev": "dev.tsv"})
DEFAULT_HUB_SPLITS: Mapping[str, str] = MappingProxyType({"train": "train", "dev": "validation"})
# Other names accepted for a split, tried when the name itself is not one of the task's splits.
_SPLIT_ALIASES = {"validation": "dev", "val": "dev", "validation_matched": "dev"}
_GLUE_HUB = "nyu-mll/glue"
#: More distinct numeric label values than this look like scores, not classes (task_from_files).
MAX_NUMERIC_CLASSES = 20


class DataSourceError(FileNotFoundError):
    """No data source a task can be read from is reachable (no data folder, and the hub is off)."""


class UnknownTaskError(KeyError):
    """A task name that is not registered."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"Unknown task {name!r}. Known tasks: {', '.join(task_names())}. "
            "Add your own with register_task(TaskSpec(...)), task_from_files(...) or task_from_hub(...)."
        )

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class TableFormat:
    """Where a task's local files keep texts and labels.

    ``text_columns`` and ``label_column`` are header names, or 0-based field indices when the file
    has no header (``header=False``). ``label_kind`` says whether label values are label names
    (``"entailment"``), label ids (``"0"``, ``"1"``) or, for a regression task, numbers (``"value"``). ``delimiter`` None picks by file suffix:
    ``.tsv`` tab (read with quoting disabled), ``.csv`` comma, ``.jsonl`` / ``.json`` JSON records.
    """

    text_columns: tuple[str | int, ...]
    label_column: str | int
    header: bool = True
    label_kind: Literal["name", "id", "value"] = "name"
    delimiter: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_columns", _as_tuple(self.text_columns))
        if self.label_kind not in ("name", "id", "value"):
            raise ValueError(f"label_kind must be 'name', 'id' or 'value', not {self.label_kind!r}")
        columns = (*self.text_columns, self.label_column)
        if not self.header and not all(isinstance(c, int) and c >= 0 for c in columns):
            raise ValueError("a file without a header needs 0-based integer column indices")


#: stage 1's pooler-and-heads rate on a regression task unless the task says otherwise. A regression
#: head must move its output from 0 to the label scale (STS-B: mean 2.7, sd 1.5); at the backbone's
#: 5e-5 it does not get there in 3 epochs (measured on 1,600 STS-B inputs, 2 epochs: train loss 2.52,
#: dev correlation 0.26 at the last exit; at 1e-3: train loss 0.90, correlation 0.90).
REGRESSION_HEAD_LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class TaskDefaults:
    """A task's training defaults: what a ``None`` setting of any stage means for this task.

    Read in one place, :func:`task_default`. The built-in values were chosen for the small embedded
    backbone on a 2-core CPU (README); a task you add gets these generic ones unless it passes its own.
    """

    learning_rate: float = 3e-5  # stage 1
    # stage 1's rate for the pooler and heads; None: learning_rate's (a regression task's spec puts
    # REGRESSION_HEAD_LEARNING_RATE here unless it names its own)
    head_learning_rate: float | None = None
    epochs: int = 3  # stage 1
    max_length: int = 128  # tokens, in every stage, cache and env
    batch_size: int = 16  # stage 1
    alpha: float = 0.035  # the price of one layer for a 12-layer model (rescaled by 12/L, ee_gym.rewards)


@dataclass(frozen=True)
class TaskSpec:
    """One task: classification (``labels`` names the classes) or regression (``kind="regression"``:
    one real-valued label, ``labels`` names it, e.g. ``("score",)``; a head's prediction counts as
    right within ``tolerance`` of the label, which the memorized layer, accuracy and the rewards read).

    Where :func:`load_split` reads it: with ``glue_dir`` set, from ``<data>/glue/<glue_dir>/`` plus the
    file named in ``split_files`` when a data folder is configured, else from the hub dataset ``hub``
    using ``hub_splits``. With ``glue_dir`` None, from the paths in ``split_files`` as given (tasks
    made by :func:`task_from_files`, which set ``local_format``), else from the hub.
    """

    name: str  # canonical lower-case id, e.g. "rte"
    labels: tuple[str, ...]  # label names in label-id order (regression: the one label's name)
    metric: str  # primary metric: "accuracy" | "f1" | "matthews" (classification), "correlation" (regression)
    text_columns: tuple[str, ...]  # 1 or 2 canonical names, also the hub's column names
    glue_dir: str | None = None  # folder under <data>/glue/, e.g. "SST-2"
    hub: tuple[str, str | None] | None = None  # (dataset, config), e.g. ("nyu-mll/glue", "rte")
    split_files: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SPLIT_FILES), hash=False)
    hub_splits: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_HUB_SPLITS), hash=False)
    hub_label_column: str = "label"
    local_format: TableFormat | None = field(default=None, repr=False)
    title: str | None = None  # the name in gym ids; default derived from `name`
    defaults: TaskDefaults = field(default_factory=TaskDefaults)  # read through task_default()
    kind: Literal["classification", "regression"] = "classification"
    tolerance: float | None = None  # regression: |prediction - label| <= tolerance is right

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "name", self.name.strip().lower())
        setattr_(self, "labels", tuple(str(label) for label in _as_tuple(self.labels)))
        setattr_(self, "text_columns", _as_tuple(self.text_columns))
        setattr_(self, "split_files", dict(self.split_files))
        setattr_(self, "hub_splits", dict(self.hub_splits))
        if self.hub is not None:
            setattr_(self, "hub", tuple(self.hub))
        if isinstance(self.defaults, Mapping):  # from task_spec_to_dict's plain data
            setattr_(self, "defaults", TaskDefaults(**self.defaults))
        if not _key(self.name):
            raise ValueError(f"task name {self.name!r} needs at least one letter or digit")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, not {self.kind!r}")
        if self.kind == "regression":
            self._check_regression()
            if self.defaults.head_learning_rate is None:  # heads that can reach the label scale
                setattr_(
                    self,
                    "defaults",
                    dataclasses.replace(self.defaults, head_learning_rate=REGRESSION_HEAD_LEARNING_RATE),
                )
        else:
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ValueError(
                    f"task {self.name!r}: labels must be at least two distinct names, got {self.labels}"
                )
            if self.metric not in CLASSIFICATION_METRICS:
                raise ValueError(
                    f"task {self.name!r}: a classification metric is one of {CLASSIFICATION_METRICS}, "
                    f"not {self.metric!r}"
                )
            if self.tolerance is not None:
                raise ValueError(f"task {self.name!r}: tolerance is a regression setting (kind='regression')")
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"task {self.name!r}: needs 1 or 2 text columns, got {self.text_columns}")
        if self.local_format and len(self.local_format.text_columns) != len(self.text_columns):
            raise ValueError(
                f"task {self.name!r}: local_format must name {len(self.text_columns)} text column(s)"
            )
        if self.hub is not None and len(self.hub) != 2:
            raise ValueError(f"task {self.name!r}: hub must be (dataset, config), got {self.hub!r}")

    def _check_regression(self) -> None:
        if len(self.labels) != 1:
            raise ValueError(
                f"task {self.name!r}: a regression task has one label, its name (e.g. labels=('score',)), "
                f"got {self.labels}"
            )
        if self.metric not in REGRESSION_METRICS:
            raise ValueError(
                f"task {self.name!r}: a regression metric is one of {REGRESSION_METRICS}, not {self.metric!r}"
            )
        if self.tolerance is None or not math.isfinite(self.tolerance) or self.tolerance <= 0:
            raise ValueError(
                f"task {self.name!r}: a regression task needs tolerance > 0 (how far from the label a "
                f"prediction still counts as right), got {self.tolerance!r}"
            )
        if self.local_format is not None and self.local_format.label_kind != "value":
            raise ValueError(f"task {self.name!r}: a regression task's local_format needs label_kind='value'")

    @property
    def is_regression(self) -> bool:
        """True for a real-valued label (one output per head)."""
        return self.kind == "regression"

    @property
    def num_labels(self) -> int:
        """How many classes; 1 for regression (the heads' output size)."""
        return len(self.labels)

    @property
    def env_name(self) -> str:
        """The task's part of gym ids, as in ``ConsistentEE-<env_name>-v0``."""
        if self.title:
            return self.title
        return "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", self.name) if part)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks."""
        return len(self.text_columns) == 2


@dataclass(repr=False)
class Examples:
    """One split of one task, in memory."""

    text_a: list[str]
    text_b: list[str] | None  # None for single-sentence tasks
    labels: np.ndarray  # int64 label ids; float32 values for a regression task

    def __post_init__(self) -> None:
        self.text_a = list(self.text_a)
        if self.text_b is not None:
            self.text_b = list(self.text_b)
        labels = np.asarray(self.labels)
        self.labels = labels.astype(np.float32 if np.issubdtype(labels.dtype, np.floating) else np.int64)
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.labels.shape}")
        lengths = {len(self.text_a), len(self.labels)} | (
            {len(self.text_b)} if self.text_b is not None else set()
        )
        if len(lengths) != 1:
            raise ValueError(f"text_a, text_b and labels differ in length: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.text_a)

    def __repr__(self) -> str:
        if self.is_regression:
            spread = f"{self.labels.min():.2f}..{self.labels.max():.2f}" if len(self) else "-"
            return f"Examples(n={len(self)}, pair={self.text_b is not None}, label_range={spread})"
        counts = np.bincount(self.labels).tolist() if len(self) else []
        return f"Examples(n={len(self)}, pair={self.text_b is not None}, label_counts={counts})"

    @property
    def is_regression(self) -> bool:
        """Real-valued labels."""
        return bool(np.issubdtype(self.labels.dtype, np.floating))

    def select(self, indices: Sequence[int] | np.ndarray) -> Examples:
        """The examples at ``indices`` (integer positions, or a boolean mask), in that order."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"a boolean mask needs shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
        idx = idx.reshape(-1)
        labels = self.labels[idx]  # raises IndexError on an out-of-range index
        text_b = None if self.text_b is None else [self.text_b[i] for i in idx]
        return Examples([self.text_a[i] for i in idx], text_b, labels)

    def content_hash(self) -> str:
        """A short hash of the texts and labels (16 hex digits): caches record it, so that a cache
        built from one copy of the data is never served for another. Linear in the split's size and
        cheap (one hash over the joined texts and the label bytes)."""
        digest = hashlib.blake2b(digest_size=8)
        for column in (self.text_a, self.text_b):
            if column is None:
                digest.update(b"\x00none\x00")
                continue
            digest.update(len(column).to_bytes(8, "little"))
            digest.update("\x1f".join(column).encode("utf-8", "surrogatepass"))
            digest.update(b"\x1e")
        digest.update(self.labels.astype("<f4" if self.is_regression else "<i8").tobytes())
        return digest.hexdigest()

    @classmethod
    def concatenate(cls, parts: Sequence[Examples]) -> Examples:
        """The examples of ``parts`` one after the other (all pairs, or all single sentences)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({part.text_b is None for part in parts}) > 1:
            raise ValueError("cannot concatenate single-sentence and sentence-pair examples")
        if len({part.is_regression for part in parts}) > 1:
            raise ValueError("cannot concatenate label ids and real-valued labels")
        text_b = None if parts[0].text_b is None else [t for part in parts for t in part.text_b]
        labels = np.concatenate([part.labels for part in parts])
        return cls([t for part in parts for t in part.text_a], text_b, labels)

    def head(self, n: int | None) -> Examples:
        """The first ``n`` examples (all of them when ``n`` is None or larger than the split)."""
        if n is None:
            return self.select(np.arange(len(self)))
        if n < 0:
            raise ValueError(f"n must be >= 0 or None, got {n}")
        return self.select(np.arange(min(n, len(self))))


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, TaskSpec] = {}
_LISTENERS: list[Callable[[TaskSpec], Any]] = []  # called with every task registered (env ids)


def on_register(listener: Callable[[TaskSpec], Any]) -> None:
    """Call ``listener(spec)`` for every task registered from now on (ee_gym.envs adds env ids)."""
    _LISTENERS.append(listener)


def _key(name: str) -> str:
    """Registry key: case-insensitive, ignoring '-', '_', '.' and spaces ("SST-2" == "sst2")."""
    return re.sub(r"[\s_.\-]+", "", name.strip().lower())


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The registered task called ``name`` (any case; "SST-2", "sst_2" and "sst2" are the same).

    A :class:`TaskSpec` is returned as it is. Unknown names raise :class:`UnknownTaskError`.
    """
    if isinstance(name, TaskSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"task must be a name or a TaskSpec, not {type(name).__name__}")
    spec = _REGISTRY.get(_key(name))
    if spec is None:
        raise UnknownTaskError(name)
    return spec


def task_names() -> list[str]:
    """The names of all registered tasks, sorted."""
    return sorted(spec.name for spec in _REGISTRY.values())


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    """Add ``spec`` to the registry under ``spec.name`` and return it.

    Registering the same spec twice is harmless; replacing a different spec of that name needs
    ``overwrite=True``.
    """
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task takes a TaskSpec, not {type(spec).__name__}")
    key = _key(spec.name)
    old = _REGISTRY.get(key)
    if old is not None and old != spec and not overwrite:
        raise ValueError(
            f"a different task is already registered as {old.name!r}; pass overwrite=True to replace it"
        )
    _REGISTRY[key] = spec
    for listener in _LISTENERS:
        listener(spec)
    return spec


# --------------------------------------------------------------------------- loading


def load_split(
    task: str | TaskSpec,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> Examples:
    """Load one split of a task into memory (the first ``limit`` examples when given).

    The data comes from the folder ``data_dir`` or ``$EE_GYM_DATA`` when either is set, else from the
    Hugging Face hub (see :class:`TaskSpec` for the details). Splits are the task's ``split_files``
    (local) or ``hub_splits`` (hub) keys, usually ``"train"`` and ``"dev"``; ``"validation"`` is
    accepted for ``"dev"``.

    A split name may end in a slice, as in Hugging Face ``datasets``: ``"train[:90%]"``,
    ``"train[90%:]"``, ``"train[:2000]"``, ``"train[2000:4000]"``. Bounds are row counts or integer
    or decimal percentages of the split; a percentage rounds down to a row index, so ``train[:90%]``
    and ``train[90%:]`` partition the split exactly. The slice is applied before ``limit``.
    """
    spec = get_task(task)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    parts = split_parts(split)
    if len(parts) > 1:  # "train[:830]+train[1660:]": the parts in order (a cross-fit fold's complement)
        return Examples.concatenate([load_split(spec, part, data_dir) for part in parts]).head(limit)
    split, start, end = parse_split(split)
    source, root = _source(spec, data_dir)
    split = _resolve_split(spec, split, spec.hub_splits if source == "hub" else spec.split_files)
    if source == "hub":
        examples = _load_hub(spec, split)
    else:
        path = _split_path(spec, split, source, root)
        if not path.is_file():
            raise FileNotFoundError(_missing_file_message(spec, split, path, source, root))
        examples = _read_file(spec, path)
    if start is not None or end is not None:
        n = len(examples)
        examples = examples.select(np.arange(slice_bound(start, n, 0), slice_bound(end, n, n)))
    return examples.head(limit)


_SLICE_BOUND = r"\s*(\d+(?:\.\d*)?%|\d+)?\s*"
_SPLIT_SLICE = re.compile(rf"^(?P<base>[^\[\]]+?)\s*\[{_SLICE_BOUND}:{_SLICE_BOUND}\]\s*$")


def split_parts(split: str) -> list[str]:
    """The parts of a union of splits, as in Hugging Face ``datasets``: ``"train[:830]+train[1660:]"``
    -> ``["train[:830]", "train[1660:]"]``; a plain split is one part."""
    if not isinstance(split, str):
        raise TypeError(f"split must be a string, not {type(split).__name__}")
    parts = [part.strip() for part in split.split("+")]
    if len(parts) > 1 and not all(parts):
        raise ValueError(
            f"cannot read the split {split!r}: a union is <split>+<split>, e.g. 'train[:10%]+train[20%:]'"
        )
    return parts


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """``"train[:90%]"`` -> ``("train", None, "90%")``; a name without a slice -> ``(name, None, None)``.

    Bounds are kept as written (``"2000"`` rows or ``"90%"``); :func:`load_split` resolves them
    against the split's length. Malformed slices raise ValueError.
    """
    if not isinstance(split, str):
        raise TypeError(f"split must be a string, not {type(split).__name__}")
    if "[" not in split and "]" not in split:
        return split, None, None
    match = _SPLIT_SLICE.match(split)
    bounds = match and [match.group(2), match.group(3)]
    if not match or any(b is not None and b.endswith("%") and float(b[:-1]) > 100 for b in bounds):
        raise ValueError(
            f"cannot read the split {split!r}: a slice is <split>[<start>:<end>] with row counts or "
            "percentages (0-100%) as bounds, either of which may be left out, e.g. 'train[:90%]', "
            "'train[90%:]', 'train[:2000]' or 'train[2000:]'"
        )
    return match.group("base"), *bounds


def split_slug(split: str) -> str:
    """A split name safe in file names: ``"train"`` stays, a slice is spelt out in words.

    ``"train[:90%]"`` -> ``"train-to90pct"``, ``"train[90%:]"`` -> ``"train-from90pct"``,
    ``"train[2000:4000]"`` -> ``"train-2000to4000"``, ``"train[:]"`` -> ``"train-all"``.
    """
    parts = split_parts(split)
    if len(parts) > 1:
        return "_plus_".join(split_slug(part) for part in parts)
    base, start, end = parse_split(split)
    base = re.sub(r"[^0-9A-Za-z._-]+", "_", base.strip())
    if start is None and end is None:
        return base if "[" not in split else f"{base}-all"
    start, end = (None if b is None else b.replace("%", "pct") for b in (start, end))
    if start is None:
        return f"{base}-to{end}"
    return f"{base}-from{start}" if end is None else f"{base}-{start}to{end}"


def slice_bound(bound: str | None, n: int, default: int) -> int:
    """A slice bound as a row index in 0..n; percentages round down."""
    if bound is None:
        return default
    if bound.endswith("%"):
        return math.floor(Fraction(bound[:-1]) * n / 100)
    return min(int(bound), n)


def split_rows(task, split: str, data_dir) -> tuple[str, int, int, bool]:
    """(base split, first row, one past the last row, whether that is the base split's end) of a
    split such as ``"train"`` or ``"train[:90%]"``, as :func:`load_split` slices it."""
    base, start, end = parse_split(split)
    n = len(load_split(task, base, data_dir))
    low, high = slice_bound(start, n, 0), slice_bound(end, n, n)
    return base, low, high, high == n


def _source(spec: TaskSpec, data_dir: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """("glue", folder), ("files", None) or ("hub", None)."""
    if spec.glue_dir is None:
        if spec.local_format is not None and spec.split_files:
            return "files", None
        if spec.hub is not None:
            return "hub", None
        raise ValueError(f"task {spec.name!r} names neither local files nor a hub dataset")
    root = paths.data_dir(data_dir)
    if root is not None:
        return "glue", root
    if spec.hub is None:
        raise DataSourceError(
            f"task {spec.name!r} has no hub dataset: set {paths.DATA_ENV} or pass data_dir= to a folder "
            f"holding glue/{spec.glue_dir}/{spec.split_files.get('train', 'train.tsv')}"
        )
    _check_hub_allowed(spec)
    return "hub", None


def _check_hub_allowed(spec: TaskSpec) -> None:
    """Refuse at once (not after the ``datasets`` library's retries) to read the hub when
    ``$HF_HUB_OFFLINE`` forbids it and the dataset is not in the local ``datasets`` cache."""
    if not paths.hub_offline() or _hub_cached(*spec.hub):
        return
    dataset, config = spec.hub
    offline = f"${paths.OFFLINE_ENV}={os.environ.get(paths.OFFLINE_ENV)!r}"
    if spec.glue_dir is not None:
        files = " and ".join(spec.split_files.get(s, f"{s}.tsv") for s in ("train", "dev"))
        raise DataSourceError(
            f"task {spec.name!r}: no data source is reachable: no data folder is set (${paths.DATA_ENV} "
            f"or data_dir=) and {offline} forbids the Hugging Face hub ({dataset!r}, {config}, not in the "
            f"local datasets cache). Either set {paths.DATA_ENV} (or pass data_dir= / --data-dir) to a "
            f"folder holding glue/{spec.glue_dir}/{files}, or allow the hub by unsetting {paths.OFFLINE_ENV}."
        )
    raise DataSourceError(
        f"task {spec.name!r} reads the hub dataset {dataset!r} ({config}), but {offline} forbids the "
        f"Hugging Face hub and the dataset is not in the local datasets cache. Allow the hub by unsetting "
        f"{paths.OFFLINE_ENV} (once is enough: the datasets cache keeps it), or make the task from local "
        "files with task_from_files(...)."
    )


def _hub_cached(dataset: str, config: str | None) -> bool:
    """Whether the ``datasets`` cache holds a copy of ``dataset`` (it then loads offline)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        root = Path(os.environ["HF_DATASETS_CACHE"])
    elif os.environ.get("HF_HOME"):
        root = Path(os.environ["HF_HOME"]) / "datasets"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "datasets"
    folder = root.expanduser() / dataset.replace("/", "___")
    return (folder / config).is_dir() if config else folder.is_dir()


def check_data_source(
    task: str | TaskSpec,
    data_dir: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = ("train", "dev"),
) -> str:
    """Check, without loading anything, that ``task``'s ``splits`` can be read; return where from.

    Call it before expensive work (training, cache building): a data folder that does not exist, a
    split file it lacks, or a hub that ``$HF_HUB_OFFLINE`` forbids raise FileNotFoundError (the last
    one :class:`DataSourceError`) naming the absolute path tried and both fixes. Split names may
    carry slices (``train[:90%]``); a split the task does not have is ValueError. Returns the folder
    (``/abs/data/glue/RTE``), the task's files, or ``"Hugging Face hub <dataset> (<config>)"``.
    """
    spec = get_task(task)
    source, root = _source(spec, data_dir)
    valid = spec.hub_splits if source == "hub" else spec.split_files
    names = [
        _resolve_split(spec, parse_split(part)[0], valid)
        for split in splits
        if split
        for part in split_parts(split)
    ]
    if source == "hub":
        dataset, config = spec.hub
        return f"Hugging Face hub {dataset} ({config})"
    checked = []
    for split in dict.fromkeys(names):
        path = _split_path(spec, split, source, root)
        if not path.is_file():
            raise FileNotFoundError(_missing_file_message(spec, split, path, source, root))
        checked.append(path)
    if source == "files":
        return ", ".join(str(path) for path in checked)
    return str(root / "glue" / spec.glue_dir)


def data_status(task: str | TaskSpec, data_dir: str | os.PathLike[str] | None = None) -> str:
    """One line on where ``task``'s data would come from and whether it is there (``ee-gym tasks``)."""
    spec = get_task(task)
    try:
        source, root = _source(spec, data_dir)
    except DataSourceError:
        if spec.hub is None:
            return f"no data: set {paths.DATA_ENV} to a folder holding glue/{spec.glue_dir}/"
        dataset, config = spec.hub
        return f"Hugging Face hub {dataset} ({config}): unreachable, ${paths.OFFLINE_ENV} is set"
    if source == "hub":
        dataset, config = spec.hub
        return f"Hugging Face hub {dataset} ({config})"
    files = {split: _split_path(spec, split, source, root) for split in spec.split_files}
    present = [split for split, path in files.items() if path.is_file()]
    where = root / "glue" / spec.glue_dir if source == "glue" else None
    if not present:
        return f"no files in {where}" if where else "its files do not exist any more"
    missing = [path.name for split, path in files.items() if split not in present]
    listed = ", ".join(files[split].name for split in present)
    return f"{listed} in {where}" + (f" (missing {', '.join(missing)})" if missing else "")


def _split_path(spec: TaskSpec, split: str, source: str, root: Path | None) -> Path:
    if source == "files":
        return Path(spec.split_files[split])
    return root / "glue" / spec.glue_dir / spec.split_files[split]


def _resolve_split(spec: TaskSpec, split: str, valid: Mapping[str, str]) -> str:
    name = split.strip().lower() if isinstance(split, str) else split
    if name in valid:
        return name
    alias = _SPLIT_ALIASES.get(name)
    if alias in valid:
        return alias
    raise ValueError(f"Unknown split {split!r} for task {spec.name!r}; valid splits: {', '.join(valid)}")


def _missing_file_message(spec: TaskSpec, split: str, path: Path, source: str, root: Path | None) -> str:
    if source == "files":
        return (
            f"task {spec.name!r}: its {split} file {str(path)!r} does not exist any more; "
            "make it again with task_from_files(...) pointing at the files"
        )
    where = f"glue/{spec.glue_dir}/{spec.split_files[split]}"
    folder = (
        "" if (root / "glue" / spec.glue_dir).is_dir() else f" (there is no glue/{spec.glue_dir}/ folder)"
    )
    message = (
        f"task {spec.name!r}: expected the {split} file {str(path)!r}, which does not exist{folder}. Either set "
        f"{paths.DATA_ENV} / pass data_dir= to a folder holding {where}"
    )
    if spec.hub is not None:
        dataset, config = spec.hub
        message += f", or leave both unset to download {dataset!r} ({config}) from the Hugging Face hub"
    return message + "."


def _read_file(spec: TaskSpec, path: Path) -> Examples:
    fmt = spec.local_format or TableFormat(spec.text_columns, spec.hub_label_column)
    return _to_examples(spec, _iter_table(path, fmt), path, fmt.label_kind)


def _load_hub(spec: TaskSpec, split: str) -> Examples:
    import datasets

    dataset, config = spec.hub
    hub_split = spec.hub_splits[split]
    ds = datasets.load_dataset(dataset, config, split=hub_split)
    columns = [*spec.text_columns, spec.hub_label_column]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{dataset} ({config}) split {hub_split!r} has no column(s) {missing}; it has {ds.column_names}"
        )
    feature = ds.features[spec.hub_label_column]
    data = ds.select_columns(columns).to_dict()
    raw_labels = data[spec.hub_label_column]
    if isinstance(feature, datasets.ClassLabel):  # ids -> names; unlabelled rows (-1) stay and fail below
        names = feature.names
        raw_labels = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in raw_labels]
    texts = [data[c] for c in spec.text_columns]
    rows = (("row", i, [*(col[i] for col in texts), label]) for i, label in enumerate(raw_labels))
    return _to_examples(spec, rows, f"{dataset} ({config}) split {hub_split!r}", "name")


def _to_examples(
    spec: TaskSpec, rows: Iterator[tuple[str, int, list[Any]]], origin: Path | str, label_kind: str
) -> Examples:
    """Build Examples from (unit, position, [text..., label]) rows, checking every label."""
    n_text = len(spec.text_columns)
    texts: list[list[str]] = [[] for _ in range(n_text)]
    ids: list[int] = []
    values_: list[float] = []
    index = {name: i for i, name in enumerate(spec.labels)}
    for unit, pos, values in rows:
        for column, value in zip(texts, values[:n_text], strict=True):
            if not isinstance(value, str):
                raise ValueError(f"{origin}, {unit} {pos}: text {value!r} is not a string")
            column.append(value.rstrip())
        if spec.is_regression:
            values_.append(_label_value(values[-1], f"{origin}, {unit} {pos}", spec.name))
            continue
        key = _label_key(values[-1])
        if label_kind == "id":
            label_id = int(key) if key.isdigit() and int(key) < spec.num_labels else None
        else:
            label_id = index.get(key)
        if label_id is None:
            expected = f"ids 0..{spec.num_labels - 1}" if label_kind == "id" else f"names {list(spec.labels)}"
            raise ValueError(
                f"{origin}, {unit} {pos}: label {values[-1]!r} is not one of task {spec.name!r}'s label {expected}"
            )
        ids.append(label_id)
    labels = np.asarray(values_, dtype=np.float32) if spec.is_regression else np.asarray(ids, dtype=np.int64)
    return Examples(texts[0], texts[1] if n_text == 2 else None, labels)


def _label_value(value: Any, where: str, task: str) -> float:
    """A regression label as a finite float, or a ValueError saying where it is."""
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number):
        raise ValueError(
            f"{where}: label {value!r} is not a finite number (task {task!r} is a regression task)"
        )
    return number


def _label_key(value: Any) -> str:
    """A label value as the string compared with label names (1, 1.0 and "1" all give "1")."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else str(value)


def _file_kind(path: Path, delimiter: str | None) -> str:
    """The delimiter of a delimited file, or "json"."""
    if delimiter is not None:
        return delimiter
    suffix = path.suffix.lower()
    kinds = {".tsv": "\t", ".tab": "\t", ".csv": ",", ".jsonl": "json", ".json": "json", ".ndjson": "json"}
    if suffix not in kinds:
        raise ValueError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; use .csv, .tsv or .jsonl, or pass delimiter="
        )
    return kinds[suffix]


def _iter_table(path: Path, fmt: TableFormat) -> Iterator[tuple[str, int, list[Any]]]:
    """Yield ("line" | "record", position, [text..., label]) for each row of a local file."""
    kind = _file_kind(path, fmt.delimiter)
    if kind == "json":
        yield from _iter_json(path, fmt)
        return
    # Tab-separated files hold bare double quotes, so quoting is off for them; CSV keeps its quoting.
    quoting = csv.QUOTE_NONE if kind == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as handle:  # utf-8-sig: MRPC starts with a BOM
        reader = csv.reader(handle, delimiter=kind, quoting=quoting)
        columns = [*fmt.text_columns, fmt.label_column]
        width: int | None = None
        if fmt.header:
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise ValueError(f"{path}: the file is empty; expected a header row")
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path}: no column(s) {missing} in the header; it has {header}")
            columns = [header.index(c) for c in columns]
            width = len(header)
        needed = max(columns) + 1
        for row in reader:
            if not row:  # blank line
                continue
            if (width is not None and len(row) != width) or len(row) < needed:
                expected = width if width is not None else f"at least {needed}"
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected {expected} fields, found {len(row)}"
                )
            yield "line", reader.line_num, [row[i] for i in columns]


def _iter_json(path: Path, fmt: TableFormat) -> Iterator[tuple[str, int, list[Any]]]:
    text = path.read_text(encoding="utf-8-sig")
    records: list[tuple[str, int, Any]] | None = None
    if path.suffix.lower() == ".json":  # a JSON array of records (or {"data": [...]}); else JSON lines
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, list):
            records = [("record", i + 1, record) for i, record in enumerate(data)]
    if records is None:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(("line", number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
    columns = [*fmt.text_columns, fmt.label_column]
    for unit, pos, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {unit} {pos}: expected a JSON object, got {type(record).__name__}")
        missing = [c for c in columns if c not in record]
        if missing:
            raise ValueError(f"{path}, {unit} {pos}: no field(s) {missing}; it has {sorted(record)}")
        yield unit, pos, [record[c] for c in columns]


# --------------------------------------------------------------------------- metrics


def primary_metric(task: str | TaskSpec) -> str:
    """The task's headline metric: "accuracy", "f1", "matthews" or (regression) "correlation"."""
    return get_task(task).metric


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """Score predicted label ids against true ones (regression: predicted values against true ones).

    The primary metric comes first; accuracy is always included. F1 is the positive class's (label
    id 1) for two-label tasks, macro-averaged otherwise; Matthews correlation is sklearn's. For a
    regression task: ``correlation`` (the mean of Pearson's and Spearman's, GLUE's STS-B headline),
    ``pearson``, ``spearman``, ``accuracy`` (the share within the task's tolerance) and ``mse``.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    if spec.is_regression:
        return _regression_metrics(spec, predictions, labels)
    y_pred = np.asarray(predictions)
    y_true = np.asarray(labels)
    if y_pred.ndim != 1 or y_true.ndim != 1 or len(y_pred) != len(y_true):
        raise ValueError(
            f"predictions and labels must be 1-D and equally long, got {y_pred.shape} and {y_true.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("cannot score an empty set of predictions")
    for what, values in (("predictions", y_pred), ("labels", y_true)):
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= spec.num_labels:
            raise ValueError(f"{what} must be label ids 0..{spec.num_labels - 1} of task {spec.name!r}")
    scores: dict[str, float] = {}
    if spec.metric == "f1":
        average = "binary" if spec.num_labels == 2 else "macro"
        scores["f1"] = float(
            f1_score(y_true, y_pred, labels=list(range(spec.num_labels)), average=average, zero_division=0.0)
        )
    elif spec.metric == "matthews":
        scores["matthews"] = float(matthews_corrcoef(y_true, y_pred))
    scores["accuracy"] = float(accuracy_score(y_true, y_pred))
    return scores


def _regression_metrics(spec: TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    y_pred = np.asarray(predictions, dtype=np.float64)
    y_true = np.asarray(labels, dtype=np.float64)
    if y_pred.ndim != 1 or y_true.ndim != 1 or len(y_pred) != len(y_true):
        raise ValueError(
            f"predictions and labels must be 1-D and equally long, got {y_pred.shape} and {y_true.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("cannot score an empty set of predictions")
    if not (np.isfinite(y_pred).all() and np.isfinite(y_true).all()):
        raise ValueError(f"predictions and labels of regression task {spec.name!r} must be finite numbers")
    # a constant column has no correlation; it says nothing about the order, so it scores 0
    varies = len(y_true) > 1 and np.ptp(y_pred) > 0 and np.ptp(y_true) > 0
    pearson = float(pearsonr(y_pred, y_true)[0]) if varies else 0.0
    spearman = float(spearmanr(y_pred, y_true)[0]) if varies else 0.0
    return {
        "correlation": (pearson + spearman) / 2,
        "pearson": pearson,
        "spearman": spearman,
        "accuracy": float(np.mean(np.abs(y_pred - y_true) <= spec.tolerance)),
        "mse": float(np.mean((y_pred - y_true) ** 2)),
    }


# --------------------------------------------------------------------------- user tasks


def task_from_files(
    name: str,
    *,
    train: str | os.PathLike[str],
    dev: str | os.PathLike[str] | None = None,
    text_columns: str | Sequence[str],
    label_column: str,
    labels: Sequence[str | int] | None = None,
    metric: str | None = None,
    delimiter: str | None = None,
    kind: str = "classification",
    tolerance: float | None = None,
) -> TaskSpec:
    """Make, register and return a task from your own files: classification, or regression
    (``kind="regression"``: a numeric label column, ``tolerance`` > 0 how far from the label a
    prediction still counts as right; the metric is ``"correlation"``, labels ``(label_column,)``).

    Files are CSV, TSV or JSON lines, told apart by suffix (``.csv``, ``.tsv``, ``.jsonl`` / ``.json``)
    unless ``delimiter`` is given, with a header (or JSON keys) naming 1-2 ``text_columns`` and a
    ``label_column``. Label values may be strings or ints; ``labels`` fixes their id order, else it is
    the sorted distinct values of the training file (numeric order when all are integers). The files
    are checked now; a task of the same name made before is replaced, but a built-in is never shadowed.
    """
    regression = kind == "regression"
    fmt = TableFormat(_as_tuple(text_columns), label_column, header=True,
                      label_kind="value" if regression else "name", delimiter=delimiter)  # fmt: skip
    files: dict[str, Path] = {}
    for split, file in (("train", train), ("dev", dev)):
        if file is None:
            continue
        path = Path(file).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"task {name!r}: the {split} file {str(path)!r} does not exist")
        _file_kind(path, delimiter)
        files[split] = path
    if regression:
        labels = (str(label_column),)
    elif labels is None:
        labels = _sorted_labels([values[-1] for _, _, values in _iter_table(files["train"], fmt)])
        _refuse_continuous_labels(files["train"], label_column, labels)
        if len(labels) < 2:
            raise ValueError(f"{files['train']}: found only the label(s) {labels}; a task needs two or more")
    spec = TaskSpec(
        name=name,
        labels=tuple(_label_key(label) for label in labels),
        metric=metric or ("correlation" if regression else "accuracy"),
        text_columns=tuple(str(c) for c in fmt.text_columns),
        split_files={split: str(path) for split, path in files.items()},
        hub_splits={},
        local_format=fmt,
        title=_title(name),
        kind=kind,
        tolerance=tolerance,
    )
    for path in files.values():  # surface bad rows and unknown labels now, naming file and row
        _read_file(spec, path)
    return _register_user_task(spec)


def task_from_hub(
    name: str,
    dataset: str,
    *,
    config: str | None = None,
    text_columns: str | Sequence[str],
    label_column: str = "label",
    labels: Sequence[str | int] | None = None,
    metric: str = "accuracy",
    splits: Mapping[str, str] = DEFAULT_HUB_SPLITS,
) -> TaskSpec:
    """Make, register and return a task read from a Hugging Face ``datasets`` dataset.

    ``splits`` maps this project's split names to the dataset's. Without ``labels`` the names come
    from the label column's ``ClassLabel`` feature, which asks the hub now. Label values are matched
    to label names (ClassLabel ids through their names). It always reads from the hub, whatever
    ``$EE_GYM_DATA`` says.
    """
    if labels is None:
        labels = _hub_label_names(dataset, config, label_column)
    spec = TaskSpec(
        name=name,
        labels=tuple(_label_key(label) for label in labels),
        metric=metric,
        text_columns=_as_tuple(text_columns),
        hub=(dataset, config),
        split_files={},
        hub_splits=dict(splits),
        hub_label_column=label_column,
        title=_title(name),
    )
    return _register_user_task(spec)


def _register_user_task(spec: TaskSpec) -> TaskSpec:
    builtin = _BUILTIN_KEYS.get(_key(spec.name))
    if builtin is not None:
        raise ValueError(f"{spec.name!r} is the built-in task {builtin!r}; give your task another name")
    return register_task(spec, overwrite=True)


def _hub_label_names(dataset: str, config: str | None, label_column: str) -> tuple[str, ...]:
    if paths.hub_offline() and not _hub_cached(dataset, config):
        raise DataSourceError(
            f"cannot read the label names of {dataset!r} ({config}): ${paths.OFFLINE_ENV} forbids the "
            f"Hugging Face hub and the dataset is not in the local datasets cache. Unset {paths.OFFLINE_ENV}, "
            "or pass labels=[...]"
        )
    import datasets

    feature = datasets.load_dataset_builder(dataset, config).info.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"{dataset} ({config}): column {label_column!r} is not a ClassLabel; pass labels=[...]"
        )
    return tuple(feature.names)


def _refuse_continuous_labels(path: Path, column: str, keys: Sequence[str]) -> None:
    """Numbers that look like scores (non-integers, more than MAX_NUMERIC_CLASSES distinct values, or
    one number spelt several ways such as '0' and '0.00') are not class names: refuse them."""
    numbers: list[float] = []
    for key in keys:
        try:
            value = float(key)
        except ValueError:
            return  # a name: classes
        if not math.isfinite(value):
            return
        numbers.append(value)
    distinct = set(numbers)
    fractional = [k for k, v in zip(keys, numbers, strict=True) if not v.is_integer()]
    if not fractional and len(distinct) <= MAX_NUMERIC_CLASSES and len(distinct) == len(numbers):
        return
    if fractional:
        why = f"non-integer values such as {', '.join(map(repr, fractional[:3]))}"
    elif len(distinct) > MAX_NUMERIC_CLASSES:
        why = f"{len(distinct)} distinct numbers, more than {MAX_NUMERIC_CLASSES}"
    else:
        why = "one number spelt several ways"
    raise ValueError(
        f"{path}: the label column {column!r} looks continuous ({len(keys)} distinct label strings; {why}), "
        "so it would become one class per spelling. For a real-valued label pass kind='regression' "
        "and a tolerance (task_from_files(..., kind='regression', tolerance=0.5)); if these values "
        "really are class names, pass labels=[...] explicitly, in label-id order."
    )


def _sorted_labels(values: list[Any]) -> tuple[str, ...]:
    keys = {_label_key(v) for v in values}
    if all(re.fullmatch(r"-?\d+", k) for k in keys):
        return tuple(sorted(keys, key=int))
    return tuple(sorted(keys))


def _title(name: str) -> str | None:
    """Keep a user's name as typed in gym ids when it is plain letters and digits ("IMDB")."""
    name = name.strip()
    return name if re.fullmatch(r"[A-Za-z0-9]+", name) else None


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return (value,) if isinstance(value, (str, int)) else tuple(value)


# --------------------------------------------------------------------------- checks and transport


def check_split(split: Any, spec: TaskSpec | None = None) -> str:
    """``split`` when it is a split name, optionally with a slice (``train[:90%]``), and, given the
    task's ``spec``, one the task has; else ConfigError. Reads no data."""
    if not isinstance(split, str) or not split.strip():
        raise ConfigError(f"split must be a split name such as 'train' or 'dev', got {split!r}")
    try:
        bases = [parse_split(part)[0] for part in split_parts(split)]
    except ValueError as error:
        raise ConfigError(str(error)) from None
    known = {} if spec is None else {**spec.split_files, **spec.hub_splits}
    for base in bases:
        name = base.strip().lower()
        if known and name not in known and _SPLIT_ALIASES.get(name) not in known:
            raise ConfigError(
                f"unknown split {split!r} for task {spec.name!r}; valid splits: {', '.join(known)} "
                "(optionally with a slice, such as 'train[:90%]')"
            )
    return split


def task_default(task: str | TaskSpec, name: str):
    """The task's default for setting ``name`` (a :class:`TaskDefaults` field): the one place every
    stage, env, cache and command reads a per-task default from."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    return getattr(spec.defaults, name)


def task_spec_to_dict(spec: TaskSpec) -> dict[str, Any]:
    """A task as plain JSON data (what a user task's env id carries, see :func:`resolve_task`)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def task_spec_from_dict(data: Mapping[str, Any]) -> TaskSpec:
    """The inverse of :func:`task_spec_to_dict`."""
    data = dict(data)
    fmt = data.pop("local_format", None)
    return TaskSpec(**data, local_format=None if fmt is None else TableFormat(**fmt))


def resolve_task(task: str | TaskSpec, task_spec: Mapping[str, Any] | None = None) -> TaskSpec:
    """The registered task ``task``. A user task's env id also carries its spec as plain data
    (``task_spec``, from ``register_task_env``): a process that does not know the name (a spawned or
    forkserver worker of an async vector env, an SB3 ``SubprocVecEnv``) registers it from that."""
    try:
        return get_task(task)
    except UnknownTaskError:
        if task_spec is None:
            raise
        spec = task_spec_from_dict(task_spec)
        if not isinstance(task, str) or spec.name != task.strip().lower():
            raise
        return register_task(spec)


# --------------------------------------------------------------------------- built-in tasks


BUILTIN_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="rte",
        labels=("entailment", "not_entailment"),
        metric="accuracy",
        text_columns=("sentence1", "sentence2"),
        glue_dir="RTE",
        hub=(_GLUE_HUB, "rte"),
        local_format=TableFormat(("sentence1", "sentence2"), "label"),
        title="RTE",
        defaults=TaskDefaults(learning_rate=5e-05, epochs=5, max_length=128, batch_size=16),
    ),
    TaskSpec(
        name="mrpc",
        labels=("not_equivalent", "equivalent"),
        metric="f1",
        text_columns=("sentence1", "sentence2"),
        glue_dir="MRPC",
        hub=(_GLUE_HUB, "mrpc"),
        local_format=TableFormat(("#1 String", "#2 String"), "Quality", label_kind="id"),
        title="MRPC",
        defaults=TaskDefaults(learning_rate=5e-05, epochs=3, max_length=128, batch_size=16),
    ),
    TaskSpec(
        name="sst2",
        labels=("negative", "positive"),
        metric="accuracy",
        text_columns=("sentence",),
        glue_dir="SST-2",
        hub=(_GLUE_HUB, "sst2"),
        local_format=TableFormat(("sentence",), "label", label_kind="id"),
        title="SST2",
        defaults=TaskDefaults(learning_rate=3e-05, epochs=1, max_length=64, batch_size=32),
    ),
    TaskSpec(
        name="cola",
        labels=("unacceptable", "acceptable"),
        metric="matthews",
        text_columns=("sentence",),
        glue_dir="CoLA",
        hub=(_GLUE_HUB, "cola"),
        # No header; the fields are: source, label, original-label mark, sentence.
        local_format=TableFormat((3,), 1, header=False, label_kind="id"),
        title="CoLA",
        defaults=TaskDefaults(learning_rate=5e-05, epochs=4, max_length=64, batch_size=16),
    ),
    TaskSpec(
        name="stsb",
        labels=("score",),
        metric="correlation",
        text_columns=("sentence1", "sentence2"),
        glue_dir="STS-B",
        hub=(_GLUE_HUB, "stsb"),
        local_format=TableFormat(("sentence1", "sentence2"), "score", label_kind="value"),
        title="STSB",
        defaults=TaskDefaults(learning_rate=5e-05, epochs=3, max_length=128, batch_size=16),
        kind="regression",
        tolerance=0.5,  # half a point of the 0-5 similarity score
    ),
    TaskSpec(
        name="qnli",
        labels=("entailment", "not_entailment"),
        metric="accuracy",
        text_columns=("question", "sentence"),
        glue_dir="QNLI",
        hub=(_GLUE_HUB, "qnli"),
        local_format=TableFormat(("question", "sentence"), "label"),
        title="QNLI",
        defaults=TaskDefaults(learning_rate=3e-05, epochs=2, max_length=128, batch_size=32),
    ),
    TaskSpec(
        name="qqp",
        labels=("not_duplicate", "duplicate"),
        metric="f1",
        text_columns=("question1", "question2"),
        glue_dir="QQP",
        hub=(_GLUE_HUB, "qqp"),
        local_format=TableFormat(("question1", "question2"), "is_duplicate", label_kind="id"),
        title="QQP",
        defaults=TaskDefaults(learning_rate=3e-05, epochs=2, max_length=128, batch_size=32),
    ),
    TaskSpec(
        name="mnli",
        labels=("entailment", "neutral", "contradiction"),
        metric="accuracy",
        text_columns=("premise", "hypothesis"),
        glue_dir="MNLI",
        hub=(_GLUE_HUB, "mnli"),
        split_files={"train": "train.tsv", "dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
        hub_splits={"train": "train", "dev": "validation_matched", "dev_mismatched": "validation_mismatched"},
        local_format=TableFormat(("sentence1", "sentence2"), "gold_label"),
        title="MNLI",
        defaults=TaskDefaults(learning_rate=3e-05, epochs=2, max_length=128, batch_size=32),
    ),
)
"""The GLUE tasks, with label ids in the order of the hub's ``nyu-mll/glue``."""

_BUILTIN_KEYS = {_key(spec.name): spec.name for spec in BUILTIN_TASKS}
for _spec in BUILTIN_TASKS:
    register_task(_spec)
del _spec
