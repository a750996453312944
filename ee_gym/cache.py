"""The per-layer cache: every exit's pooled state and logits for every input of a split.

An env replays any input at any layer from it without running the model. One folder per
(model, task, split, max length, row limit), the split being any name :func:`ee_gym.tasks.load_split`
reads, slices such as ``train[90%:]`` included:

    manifest.json   what produced it (model fingerprint, task, split, max length, ...) and its shapes
    states.npy      [N, L, d] pooled states s_l, float16 when that changes no prediction, else float32
    logits.npy      [N, L, K] float32 head logits (computed from the float32 states)
    labels.npy      [N] int64 gold labels
    memorized.npy   [N] int64 memorized layer m(x) in 1..L (hardness.py)

Arrays are opened memory-mapped. A cache is written into a temporary folder and renamed when
complete, so an interrupted build leaves nothing that could be mistaken for a cache.

Under ``accelerate launch`` / ``torchrun`` every process runs its share of the batches and writes its
rows into the same memory-mapped arrays (so the cache folder must be on a file system all processes
see); the main process then finishes and renames the folder while the others wait.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from filelock import FileLock
from tqdm.auto import tqdm

from ee_gym import paths
from ee_gym.batching import iter_exit_outputs, tokenize_examples
from ee_gym.hardness import memorized_layer_from_logits
from ee_gym.multiexit import MultiExitModel
from ee_gym.tasks import TaskSpec, compute_metrics, get_task, load_split, split_slug

FORMAT_VERSION = 1
STATE_DTYPES = ("auto", "float16", "float32")


class StaleCacheError(RuntimeError):
    """The cache on disk was produced by another model or with other settings."""


class ExitShapes:
    """Sizes read off per-layer arrays: ``states`` [N, L, d], ``logits`` [N, L, K], ``labels`` [N]."""

    states: np.ndarray
    logits: np.ndarray
    labels: np.ndarray

    @property
    def num_inputs(self) -> int:
        return self.labels.shape[0]

    @property
    def num_layers(self) -> int:
        return self.logits.shape[1]

    @property
    def num_labels(self) -> int:
        return self.logits.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]


@dataclass
class ExitCache(ExitShapes):
    """A per-layer cache opened from disk (arrays memory-mapped, read-only)."""

    folder: Path
    manifest: dict
    states: np.ndarray  # [N, L, d]
    logits: np.ndarray  # [N, L, K]
    labels: np.ndarray  # [N]
    memorized: np.ndarray  # [N]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def __len__(self) -> int:
        return self.num_inputs


def default_cache_dir(
    model: MultiExitModel, task: str | TaskSpec, split: str, max_length: int, limit: int | None = None
) -> Path:
    """$EE_GYM_HOME/cache/<fingerprint>/<task>-<split>-len<max_length>[-n<limit>].

    A sliced split is named by :func:`~ee_gym.tasks.split_slug` (``train[90%:]`` -> ``train-from90pct``);
    the manifest keeps the exact split string.
    """
    name = f"{get_task(task).name}-{split_slug(split)}-len{max_length}" + (f"-n{limit}" if limit else "")
    return paths.home() / "cache" / model.fingerprint() / name


def build_cache(
    model: MultiExitModel,
    task: str | TaskSpec,
    split: str = "train",
    folder: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    max_length: int = 128,
    limit: int | None = None,
    batch_size: int = 64,
    state_dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> ExitCache:
    """Run the model over a split once and store every exit's state and logits.

    ``state_dtype="auto"`` stores float16 states when the heads' predictions from them equal those
    from float32 for every input and layer, else float32. An existing cache for the same model and
    settings is returned as is (``overwrite=True`` rebuilds it).
    """
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    task = get_task(task)
    folder = Path(folder) if folder is not None else default_cache_dir(model, task, split, max_length, limit)
    expected = _identity(model, task, split, max_length, limit)
    if (folder / "manifest.json").is_file() and not overwrite:
        return open_cache(folder, expect=expected)
    processes = PartialState(cpu=not torch.cuda.is_available())
    build = functools.partial(
        _build, model, task, split, folder, expected, processes, data_dir, max_length, limit, batch_size
    )
    if processes.num_processes > 1:
        return build(state_dtype, progress)
    # one process: other jobs may want the same cache at the same time; the first builds it, the
    # others wait for it and then open it
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "manifest.json").is_file() and not overwrite:
            return open_cache(folder, expect=expected)
        return build(state_dtype, progress)


def _build(
    model: MultiExitModel,
    task: TaskSpec,
    split: str,
    folder: Path,
    expected: dict,
    processes: PartialState,
    data_dir,
    max_length: int,
    limit: int | None,
    batch_size: int,
    state_dtype: str,
    progress: bool,
) -> ExitCache:
    """Write the cache (every process its share of the batches, the main one the folder)."""
    rank, world, main = processes.process_index, processes.num_processes, processes.is_main_process
    examples = load_split(task, split, data_dir, limit)
    tokenized = tokenize_examples(examples, model.tokenizer, max_length)
    n, num_layers, d, k = len(tokenized), model.num_layers, model.hidden_size, model.num_labels
    tmp = folder.with_name(folder.name + ".tmp")
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        np.lib.format.open_memmap(tmp / "states.f32.npy", "w+", np.float32, (n, num_layers, d))
        np.lib.format.open_memmap(tmp / "logits.npy", "w+", np.float32, (n, num_layers, k))
    processes.wait_for_everyone()
    states32 = np.load(tmp / "states.f32.npy", mmap_mode="r+")
    logits = np.load(tmp / "logits.npy", mmap_mode="r+")
    mismatches = 0
    began = time.perf_counter()
    bar = tqdm(total=n, desc=f"cache [{task.name}/{split}]", unit="input", disable=not (progress and main))
    for rows, out in iter_exit_outputs(model, tokenized, batch_size, rank, world):
        states32[rows] = out.states.float().cpu().numpy()
        logits[rows] = out.logits.float().cpu().numpy()
        mismatches += _fp16_prediction_mismatches(model, out.states, out.logits)
        bar.update(len(rows) * world)
    bar.close()
    states32.flush()
    logits.flush()
    if world > 1:
        total = torch.tensor([mismatches], device=processes.device)
        torch.distributed.all_reduce(total)
        mismatches = int(total.item())
        processes.wait_for_everyone()  # every process's rows are on disk
        if not main:
            del states32, logits
            processes.wait_for_everyone()  # the main process finishes the folder
            return open_cache(folder, expect=expected)

    use_fp16 = state_dtype == "float16" or (state_dtype == "auto" and mismatches == 0)
    if use_fp16:
        states16 = np.lib.format.open_memmap(tmp / "states.npy", "w+", np.float16, (n, num_layers, d))
        for i in range(0, n, 4096):
            states16[i : i + 4096] = states32[i : i + 4096]
        states16.flush()
        del states16, states32
        (tmp / "states.f32.npy").unlink()
    else:
        states32.flush()
        del states32
        (tmp / "states.f32.npy").rename(tmp / "states.npy")
    logits.flush()

    labels = tokenized.labels
    np.save(tmp / "labels.npy", labels)
    np.save(tmp / "memorized.npy", memorized_layer_from_logits(logits, labels))
    predictions = np.asarray(logits).argmax(-1)
    manifest = {
        **expected,
        "format_version": FORMAT_VERSION,
        "model_backbone": model.config.backbone,
        "num_inputs": n,
        "num_layers": num_layers,
        "num_labels": k,
        "hidden_size": d,
        "state_dtype": "float16" if use_fp16 else "float32",
        "fp16_prediction_mismatches": int(mismatches),
        "layer_metrics": [compute_metrics(task, predictions[:, i], labels) for i in range(num_layers)],
        "build_seconds": round(time.perf_counter() - began, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    del logits
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    processes.wait_for_everyone()
    return open_cache(folder, expect=expected)


def open_cache(
    folder: str | os.PathLike,
    model: MultiExitModel | None = None,
    *,
    expect: dict | None = None,
) -> ExitCache:
    """Open a cache folder; with ``model`` (or ``expect``), refuse one that another model produced."""
    folder = Path(folder)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"no per-layer cache at {folder} (no manifest.json). Build one with "
            "ee_gym.cache.build_cache(model, task, split) or `ee-gym cache --task <task>`."
        )
    manifest = json.loads(manifest_file.read_text())
    expect = dict(expect or {})
    if model is not None:
        expect.setdefault("fingerprint", model.fingerprint())
    stale = {k: (manifest.get(k), v) for k, v in expect.items() if manifest.get(k) != v}
    if manifest.get("format_version") != FORMAT_VERSION:
        stale["format_version"] = (manifest.get("format_version"), FORMAT_VERSION)
    if stale:
        details = "; ".join(f"{k}: cache has {have!r}, wanted {want!r}" for k, (have, want) in stale.items())
        raise StaleCacheError(
            f"the cache at {folder} does not match ({details}). Rebuild it with "
            "build_cache(..., overwrite=True) or `ee-gym cache --overwrite`, or delete the folder."
        )
    return ExitCache(
        folder=folder,
        manifest=manifest,
        states=np.load(folder / "states.npy", mmap_mode="r"),
        logits=np.load(folder / "logits.npy", mmap_mode="r"),
        labels=np.load(folder / "labels.npy"),
        memorized=np.load(folder / "memorized.npy"),
    )


def _identity(model: MultiExitModel, task: TaskSpec, split: str, max_length: int, limit: int | None) -> dict:
    """What a cache must agree on to be served for this model and these settings."""
    return {
        "fingerprint": model.fingerprint(),
        "task": task.name,
        "split": split,
        "max_length": max_length,
        "limit": limit,
    }


@torch.no_grad()
def _fp16_prediction_mismatches(model: MultiExitModel, states: torch.Tensor, logits: torch.Tensor) -> int:
    """How many (input, layer) predictions change when states are rounded to float16."""
    rounded = states.half().float()
    predicted = torch.stack(
        [model.head(layer, rounded[:, layer - 1]) for layer in range(1, model.num_layers + 1)], 1
    )
    return int((predicted.argmax(-1) != logits.argmax(-1)).sum())
