"""The per-layer cache: every exit's pooled state and logits for every input of a split.

An env replays any input at any layer from it without running the model. One folder per
(model, task, split, max length, row limit, data content), the split being any name
:func:`ee_gym.tasks.load_split` reads, slices such as ``train[90%:]`` included:

    manifest.json   what produced it (model fingerprint, task, split, max length, a hash of the
                    split's texts and labels, ...) and its shapes
    states.npy      [N, L, d] pooled states s_l, float16 when that changes no prediction, else float32
    logits.npy      [N, L, K] float32 head logits (computed from the float32 states)
    labels.npy      [N] int64 gold labels (float32 values for a regression task, K = 1)
    memorized.npy   [N] int64 memorized layer m(x) in 1..L (hardness.py)

Arrays are opened memory-mapped, after cheap checks against the manifest (shapes, file sizes, label
and memorized-layer ranges, finite logits): a damaged cache raises
:class:`~ee_gym.files.CorruptFileError` naming the file and the fix. A cache is written into a
temporary folder and swapped in when complete (an existing one is renamed away first and deleted
after), so an interrupted build leaves nothing that could be mistaken for a cache, and a reader
opening it during a rebuild sees the old cache or the new one, never a missing folder.

Under ``accelerate launch`` / ``torchrun`` every process runs its share of the batches and writes its
rows into the same memory-mapped arrays (so the cache folder must be on a file system all processes
see); the main process then finishes and renames the folder while the others wait.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ee_gym import paths
from ee_gym.files import CorruptFileError, read_json, write_json_atomic
from ee_gym.hardness import memorized_layer_from_logits
from ee_gym.shapes import ExitShapes
from ee_gym.targets import Target
from ee_gym.tasks import Examples, TaskSpec, compute_metrics, get_task, load_split, split_slug

if TYPE_CHECKING:  # torch, accelerate and the model code load when a cache is built, not to open one
    import torch
    from accelerate import PartialState

    from ee_gym.multiexit import MultiExitModel

FORMAT_VERSION = 1
STATE_DTYPES = ("auto", "float16", "float32")


class StaleCacheError(RuntimeError):
    """The cache on disk was produced by another model, from other data or with other settings."""


REBUILD_FIX = (
    "rebuild it with build_cache(..., overwrite=True) or `ee-gym cache --overwrite`, or delete the folder"
)


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
    model: MultiExitModel,
    task: str | TaskSpec,
    split: str,
    max_length: int,
    limit: int | None = None,
    *,
    data_hash: str | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Path:
    """$EE_GYM_HOME/cache/<fingerprint>/<task>-<split>-len<max_length>[-n<limit>]-d<data hash>.

    A sliced split is named by :func:`~ee_gym.tasks.split_slug` (``train[90%:]`` -> ``train-from90pct``);
    the manifest keeps the exact split string. ``data_hash`` is the split's
    :meth:`~ee_gym.tasks.Examples.content_hash` (its first 8 digits name the folder, so that a changed
    copy of the data gets its own cache); without it the split is loaded (from ``data_dir``) to hash it.
    """
    task = get_task(task)
    if data_hash is None:
        data_hash = load_split(task, split, data_dir, limit).content_hash()
    name = f"{task.name}-{split_slug(split)}-len{max_length}" + (f"-n{limit}" if limit else "")
    return paths.home() / "cache" / model.fingerprint() / f"{name}-d{data_hash[:8]}"


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
    allow_other_task: bool = False,
    examples: Examples | None = None,
) -> ExitCache:
    """Run the model over a split once and store every exit's state and logits.

    ``state_dtype="auto"`` stores float16 states when the heads' predictions from them equal those
    from float32 for every input and layer, else float32. An existing cache for the same model,
    data and settings is returned as is (``overwrite=True`` rebuilds it); the split is loaded every
    time, to hash its content (see :func:`default_cache_dir`), and only once. ``examples``: the split,
    already loaded by the caller (``load_split(task, split, data_dir, limit)``), to save loading it
    again. A model trained for another task is refused (:func:`~ee_gym.multiexit.check_model_task`)
    unless ``allow_other_task=True``; one with another label count always is.
    """
    import torch
    from accelerate import PartialState
    from filelock import FileLock

    from ee_gym.backbones import check_max_length
    from ee_gym.multiexit import check_model_task

    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    task = get_task(task)
    check_model_task(model, task, allow_other_task)
    max_length = check_max_length(model, max_length)  # before the split is read
    if examples is None:
        examples = load_split(task, split, data_dir, limit)
    data_hash = examples.content_hash()
    if folder is None:
        folder = default_cache_dir(model, task, split, max_length, limit, data_hash=data_hash)
    folder = Path(folder)
    expected = _identity(model, task, split, max_length, limit, data_hash)
    if (folder / "manifest.json").is_file() and not overwrite:
        return open_cache(folder, expect=expected)
    processes = PartialState(cpu=not torch.cuda.is_available())
    build = functools.partial(
        _build, model, task, split, folder, expected, processes, examples, max_length, batch_size
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
    examples: Examples,
    max_length: int,
    batch_size: int,
    state_dtype: str,
    progress: bool,
) -> ExitCache:
    """Write the cache (every process its share of the batches, the main one the folder)."""
    import torch
    from tqdm.auto import tqdm

    from ee_gym.batching import iter_exit_outputs, tokenize_examples

    rank, world, main = processes.process_index, processes.num_processes, processes.is_main_process
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
    target = Target.of_task(task)
    np.save(tmp / "memorized.npy", memorized_layer_from_logits(logits, labels, target))
    predictions = target.predictions(logits)
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
    write_json_atomic(tmp / "manifest.json", manifest)
    del logits
    _swap_into_place(tmp, folder)
    processes.wait_for_everyone()
    return open_cache(folder, expect=expected)


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Make the complete folder ``tmp`` the cache at ``folder``; at no moment is ``folder`` missing
    where the OS can exchange two folders at once (Linux), and for a moment only otherwise (readers
    wait for it, see :func:`open_cache`). The old cache is deleted after the swap."""
    if not folder.exists():
        tmp.rename(folder)
        return
    if _exchange(tmp, folder):  # tmp now holds the old cache
        shutil.rmtree(tmp)
        return
    old = _old_sibling(folder)
    if old.exists():
        shutil.rmtree(old)
    folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old)


def _old_sibling(folder: Path) -> Path:
    return folder.with_name(folder.name + ".old")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def open_cache(
    folder: str | os.PathLike,
    model: MultiExitModel | None = None,
    *,
    expect: dict | None = None,
) -> ExitCache:
    """Open a cache folder; with ``model`` (or ``expect``), refuse one that another model produced.

    The arrays are checked against the manifest, cheaply (shapes and file sizes, label and
    memorized-layer ranges, finite logits); a damaged file raises
    :class:`~ee_gym.files.CorruptFileError` naming it and the fix. A cache being rebuilt at this
    moment is opened whole: either the old one or the new one.
    """
    folder = Path(folder)
    damaged_once = False  # a file that vanished mid-read may be a swap, not damage: look once more
    for attempt in range(50):
        manifest_file = folder / "manifest.json"
        if not manifest_file.is_file():
            # a rebuild is swapping the folder: the old one is set aside, or the swap finished
            # between the two looks (the manifest is back), so look again
            swapping = _old_sibling(folder).exists() or manifest_file.is_file()
            if swapping and attempt < 49:
                time.sleep(0.1)
                continue
            raise FileNotFoundError(
                f"no per-layer cache at {folder} (no manifest.json). Build one with "
                "ee_gym.cache.build_cache(model, task, split) or `ee-gym cache --task <task>`."
            )
        try:
            text = manifest_file.read_text(encoding="utf-8", errors="replace")
            cache = _open_checked(folder, model, expect)
            same = (folder / "manifest.json").read_text(encoding="utf-8", errors="replace") == text
        except FileNotFoundError:  # the folder was swapped while being read
            if attempt == 49:
                raise
            time.sleep(0.1)
            continue
        except CorruptFileError:  # an array missing or cut short: damaged, or swapped while being read
            swapping = _old_sibling(folder).exists() or not manifest_file.is_file()
            if attempt == 49 or (damaged_once and not swapping):
                raise
            damaged_once = True
            time.sleep(0.1)
            continue
        if same:  # else a rebuild swapped the folder between reading the manifest and the arrays
            return cache
    raise StaleCacheError(f"the cache at {folder} kept changing while being opened; try again")


def _open_checked(folder: Path, model: MultiExitModel | None, expect: dict | None) -> ExitCache:
    manifest = read_json(folder / "manifest.json", REBUILD_FIX)
    if not isinstance(manifest, dict):
        raise CorruptFileError(
            f"{folder / 'manifest.json'} is not a cache manifest (not an object); {REBUILD_FIX}"
        )
    expect = dict(expect or {})
    if model is not None:
        expect.setdefault("fingerprint", model.fingerprint())
    stale = {k: (manifest.get(k), v) for k, v in expect.items() if manifest.get(k) != v}
    if manifest.get("format_version") != FORMAT_VERSION:
        stale["format_version"] = (manifest.get("format_version"), FORMAT_VERSION)
    if stale:
        details = "; ".join(f"{k}: cache has {have!r}, wanted {want!r}" for k, (have, want) in stale.items())
        hint = " (the data changed since it was built)" if "data_hash" in stale else ""
        raise StaleCacheError(
            f"the cache at {folder} does not match ({details}){hint}. {REBUILD_FIX[0].upper()}{REBUILD_FIX[1:]}."
        )
    sizes = {}
    for key in ("num_inputs", "num_layers", "num_labels", "hidden_size"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "num_inputs" else 1):
            raise CorruptFileError(
                f"{folder / 'manifest.json'}: {key} is {value!r}, not a size; {REBUILD_FIX}"
            )
        sizes[key] = value
    n, num_layers, k, d = (sizes[key] for key in ("num_inputs", "num_layers", "num_labels", "hidden_size"))
    states = _load_array(folder, "states.npy", (n, num_layers, d), "f", mmap=True)
    logits = _load_array(folder, "logits.npy", (n, num_layers, k), "f", mmap=True)
    labels = _load_array(folder, "labels.npy", (n,), "f" if k == 1 else "i")  # k = 1: regression values
    memorized = _load_array(folder, "memorized.npy", (n,), "i")
    if n:
        if k == 1 and not np.isfinite(labels).all():
            raise CorruptFileError(
                f"{folder / 'labels.npy'} holds non-finite labels (nan or inf); {REBUILD_FIX}"
            )
        if k > 1:
            _check_range(folder, "labels.npy", labels, 0, k - 1, "label ids")
        _check_range(folder, "memorized.npy", memorized, 1, num_layers, "memorized layers")
        if not np.isfinite(logits).all():
            raise CorruptFileError(
                f"{folder / 'logits.npy'} holds non-finite logits (nan or inf); {REBUILD_FIX}"
            )
    return ExitCache(
        folder=folder, manifest=manifest, states=states, logits=logits, labels=labels, memorized=memorized
    )


def _load_array(folder: Path, name: str, shape: tuple[int, ...], kind: str, mmap: bool = False) -> np.ndarray:
    """One array of a cache, memory-mapped or read, whose shape and dtype kind the manifest says."""
    path = folder / name
    if not path.is_file():
        if not folder.is_dir():
            raise FileNotFoundError(f"no per-layer cache at {folder}")
        raise CorruptFileError(f"{path} is missing from the cache; {REBUILD_FIX}")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as error:  # truncated ("mmap length is greater than file size")
        raise CorruptFileError(f"{path} is truncated or not a numpy array ({error}); {REBUILD_FIX}") from None
    if array.shape != shape or array.dtype.kind != kind:
        raise CorruptFileError(
            f"{path} holds a {array.dtype} array of shape {array.shape}, but the manifest says shape {shape}; "
            f"{REBUILD_FIX}"
        )
    return array


def _check_range(folder: Path, name: str, values: np.ndarray, low: int, high: int, what: str) -> None:
    smallest, largest = int(values.min()), int(values.max())
    if smallest < low or largest > high:
        raise CorruptFileError(
            f"{folder / name} holds {what} from {smallest} to {largest}, outside {low}..{high}; {REBUILD_FIX}"
        )


def _identity(
    model: MultiExitModel, task: TaskSpec, split: str, max_length: int, limit: int | None, data_hash: str
) -> dict:
    """What a cache must agree on to be served for this model, this data and these settings."""
    return {
        "fingerprint": model.fingerprint(),
        "task": task.name,
        "split": split,
        "max_length": max_length,
        "limit": limit,
        "data_hash": data_hash,
    }


def _fp16_prediction_mismatches(model: MultiExitModel, states: torch.Tensor, logits: torch.Tensor) -> int:
    """How many (input, layer) predictions change when states are rounded to float16."""
    import torch

    rounded = states.half().float()
    with torch.no_grad():
        predicted = torch.stack(
            [model.head(layer, rounded[:, layer - 1]) for layer in range(1, model.num_layers + 1)], 1
        )
    if logits.shape[-1] == 1:  # regression: a value that moves by more than 1e-3 changed
        return int(((predicted - logits).abs() > 1e-3).sum())
    return int((predicted.argmax(-1) != logits.argmax(-1)).sum())
