"""Bad input data gets a clear, early error (issue 15, part A): one test per item.

Errors of the integrity layer are checked by class name (``CorruptFileError``) so that this file
imports nothing new at the top and, on code without these checks, fails on the behaviour itself.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import new_tiny_model, write_tiny_glue

from ee_gym import cache as cache_module
from ee_gym import tasks
from ee_gym.cache import StaleCacheError, build_cache, open_cache
from ee_gym.cli import main
from ee_gym.envs.prepare import load_table
from ee_gym.multiexit import MultiExitModel
from ee_gym.tasks import load_split, task_from_files

REBUILD = "overwrite=True"


def _cache(model, data, folder=None, split="dev", **kwargs):
    kwargs.setdefault("max_length", 32)
    return build_cache(model, "rte", split, folder, data_dir=str(data), progress=False, **kwargs)


def _flip_rte_train_labels(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    path = dst / "glue" / "RTE" / "train.tsv"
    header, *rows = path.read_text().splitlines()
    swap = {"entailment": "not_entailment", "not_entailment": "entailment"}
    rows = ["\t".join([*row.split("\t")[:-1], swap[row.split("\t")[-1]]]) for row in rows]
    path.write_text("\n".join([header, *rows]) + "\n")
    return dst


def _corrupt(info) -> str:
    """The message of a CorruptFileError (asserting its class)."""
    assert type(info.value).__name__ == "CorruptFileError", repr(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- 1: the data is part of a cache's identity


def test_item1_a_cache_of_one_data_folder_is_not_served_for_another(
    tiny_model, tiny_data, tmp_path, monkeypatch
):
    fixed = _flip_rte_train_labels(tiny_data, tmp_path / "fixed")
    loads = []
    real_load = cache_module.load_split
    monkeypatch.setattr(cache_module, "load_split", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    old = _cache(tiny_model, tiny_data, split="train")
    assert len(loads) == 1  # building loads the data once
    new = _cache(tiny_model, fixed, split="train")  # default folder: the new data gets its own cache
    assert new.folder != old.folder
    np.testing.assert_array_equal(new.labels, 1 - old.labels)
    assert new.manifest["data_hash"] == load_split("rte", "train", fixed).content_hash()
    with pytest.raises(StaleCacheError, match="data_hash.*data changed.*overwrite=True"):
        _cache(tiny_model, fixed, old.folder, split="train")  # an explicit folder of the old data
    # gym.make's path (load_table, in-process tables), with EE_GYM_DATA pointing at each copy
    monkeypatch.setenv("EE_GYM_DATA", str(tiny_data))
    before = load_table(tiny_model, "rte", "train", max_length=32, progress=False)
    monkeypatch.setenv("EE_GYM_DATA", str(fixed))
    after = load_table(tiny_model, "rte", "train", max_length=32, progress=False)
    np.testing.assert_array_equal(after.labels, 1 - before.labels)


# ----------------------------------------------------------------------------- 2: a model for another task


def test_item2_a_model_for_another_task_is_refused_before_anything_is_written(tokenizer, tiny_data, tmp_path):
    rte_model = new_tiny_model(tokenizer, task="rte", labels=["entailment", "not_entailment"]).eval()
    options = dict(data_dir=str(tiny_data), max_length=32, progress=False)
    with pytest.raises(ValueError, match="trained for task 'rte', not 'sst2'.*allow_other_task=True"):
        build_cache(rte_model, "sst2", "dev", tmp_path / "sst2", **options)
    assert not (tmp_path / "sst2").exists()
    with pytest.raises(ValueError, match="trained for task 'rte'"):
        load_table(rte_model, "sst2", "dev", cache_dir=tmp_path / "sst2", **options)
    meant = build_cache(rte_model, "sst2", "dev", tmp_path / "sst2", allow_other_task=True, **options)
    assert meant.manifest["task"] == "sst2"
    # 2 labels per exit on a 3-label task: always refused (it used to write the cache, then IndexError)
    untagged = new_tiny_model(tokenizer).eval()  # records no task: only its label count is checked
    for allow in (False, True):
        with pytest.raises(ValueError, match="2 labels per exit, but task 'mnli' has 3"):
            build_cache(untagged, "mnli", "dev", tmp_path / "mnli", allow_other_task=allow, **options)
    assert not (tmp_path / "mnli").exists()


# ----------------------------------------------------------------------------- 4: integrity on load


def _flip_weights(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])  # tensor bytes; the header stays valid
    path.write_bytes(bytes(data))


def _resave(folder: Path, name: str, change) -> None:
    array = np.array(np.load(folder / name))
    np.save(folder / name, change(array))


def _set(array, index, value):
    array[index] = value
    return array


DAMAGE = {
    "weights": ("model.safetensors", _flip_weights),
    "labels": ("labels.npy", lambda c: _resave(c, "labels.npy", lambda a: _set(a, 0, 7))),
    "memorized": ("memorized.npy", lambda c: _resave(c, "memorized.npy", lambda a: _set(a, 0, 0))),
    "logits": ("logits.npy", lambda c: _resave(c, "logits.npy", lambda a: _set(a, (0, 0, 0), np.nan))),
    "states": ("states.npy", lambda c: _resave(c, "states.npy", lambda a: a[:, :2])),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_item4_damaged_weights_and_cache_arrays_are_caught_on_load(tiny_model, tiny_data, tmp_path, damage):
    name, spoil = DAMAGE[damage]
    if damage == "weights":
        folder = tiny_model.save_pretrained(tmp_path / "model")
        MultiExitModel.from_pretrained(folder)  # intact: loads
        spoil(folder)
        with pytest.raises(Exception) as info:
            MultiExitModel.from_pretrained(folder)
        message = _corrupt(info)
        assert str(folder) in message and "fingerprint" in message
        assert "retrain" in message and "delete the folder" in message
        return
    folder = _cache(tiny_model, tiny_data, tmp_path / "c").folder
    spoil(folder)
    with pytest.raises(Exception) as info:
        open_cache(folder)
    message = _corrupt(info)
    assert str(folder / name) in message and REBUILD in message and "delete the folder" in message


# ----------------------------------------------------------------------------- 6: numeric labels are not classes


def test_item6_continuous_looking_labels_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the tasks made here stay here
    scores = ["0", "0.00", "0.000", "2.5", "3.8", "5.000", "1.2", "4.75"]
    train = tmp_path / "scores.tsv"
    train.write_text("text\tscore\n" + "".join(f"sentence {i}\t{s}\n" for i, s in enumerate(scores)))
    with pytest.raises(ValueError, match="continuous.*kind=.regression.*labels="):
        task_from_files("scores", train=train, text_columns="text", label_column="score")
    many = tmp_path / "many.tsv"  # integers, but 30 distinct ones: scores, not classes
    many.write_text("text\tscore\n" + "".join(f"s {i}\t{i}\n" for i in range(30)))
    with pytest.raises(ValueError, match="30 distinct numbers"):
        task_from_files("many", train=many, text_columns="text", label_column="score")
    stars = tmp_path / "stars.tsv"  # a few integer classes stay classes
    stars.write_text("text\tstars\n" + "".join(f"s {i}\t{1 + i % 5}\n" for i in range(10)))
    task = task_from_files("stars", train=stars, text_columns="text", label_column="stars")
    assert task.labels == ("1", "2", "3", "4", "5")
    explicit = task_from_files(
        "scores", train=train, text_columns="text", label_column="score", labels=scores
    )
    assert explicit.num_labels == len(scores)  # the user says they are classes


# ----------------------------------------------------------------------------- 11: garbage files name themselves and the fix


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


GARBAGE = {
    "states.npy": ("cache", _truncate),
    "manifest.json": ("cache", lambda p: p.write_text('{"fingerprint": "ab')),
    "multiexit_config.json": ("model", lambda p: p.write_text("not json at all")),
    "model.safetensors": ("model", _truncate),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_item11_garbage_or_truncated_files_name_the_file_and_the_fix(
    tiny_model, tiny_data, tmp_path, capsys, name
):
    where, spoil = GARBAGE[name]
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    cache_dir = tmp_path / "cache"
    argv = ["cache", "--task", "rte", "--model", str(model_dir), "--split", "dev", "--output", str(cache_dir)]
    argv += ["--data-dir", str(tiny_data), "--max-length", "32"]
    assert main(argv) == 0
    path = (cache_dir if where == "cache" else model_dir) / name
    spoil(path)
    capsys.readouterr()
    with pytest.raises(Exception) as info:
        open_cache(cache_dir) if where == "cache" else MultiExitModel.from_pretrained(model_dir)
    message = _corrupt(info)
    assert str(path) in message and "delete the folder" in message
    assert (REBUILD if where == "cache" else "retrain") in message
    assert main(argv) == 2  # the CLI prints it as one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ee-gym: error: ") and str(path) in err[0]


# ----------------------------------------------------------------------------- 12: no data source, offline


def test_item12_no_data_source_offline_fails_at_once_naming_both_fixes(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EE_GYM_DATA", "relative/data")  # resolved against the working directory
    with pytest.raises(FileNotFoundError) as info:
        load_split("rte")
    assert repr(str(tmp_path / "relative" / "data")) in str(info.value)
    monkeypatch.delenv("EE_GYM_DATA")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets-cache"))  # no local hub copy
    for offline in ("1", "true", "YES", "on"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        began = time.perf_counter()
        with pytest.raises(FileNotFoundError) as info:
            load_split("rte", "train")
        assert time.perf_counter() - began < 2  # at once, not after the datasets library's retries
        message = str(info.value)
        for part in (
            "no data source is reachable",
            "EE_GYM_DATA",
            "glue/RTE/train.tsv",
            "unsetting HF_HUB_OFFLINE",
        ):
            assert part in message
    from ee_gym.tasks import check_data_source  # checks without loading, for callers about to do work

    with pytest.raises(FileNotFoundError, match="no data source is reachable"):
        check_data_source("rte")
    data = write_tiny_glue(tmp_path / "data")
    assert check_data_source("rte", data) == str(data / "glue" / "RTE")
    assert check_data_source("sst2", "data", ["train[:90%]", "dev"]) == str(data / "glue" / "SST-2")
    with pytest.raises(FileNotFoundError, match="glue/QNLI/train.tsv"):
        check_data_source("qnli", data)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert "hub" in check_data_source("rte")


# ----------------------------------------------------------------------------- 15: replacing a cache is atomic


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_item15_overwrite_never_leaves_the_cache_missing(
    tiny_model, tiny_data, tmp_path, monkeypatch, exchange
):
    folder = _cache(tiny_model, tiny_data, tmp_path / "c").folder
    n = len(open_cache(folder))
    if not exchange:
        monkeypatch.setattr(cache_module, "_exchange", lambda a, b: False, raising=False)
    seen, errors, threads = [], [], []

    def read():
        try:
            seen.append(len(open_cache(folder)))
        except Exception as error:  # noqa: BLE001 - recorded and asserted below
            errors.append(error)

    real_rmtree, real_rename = shutil.rmtree, Path.rename

    def watching_rmtree(path, *args, **kwargs):  # the old cache is deleted: the folder must be whole
        read()
        real_rmtree(path, *args, **kwargs)
        read()

    def watching_rename(self, target):  # between the renames, a reader waits for the new cache
        result = real_rename(self, target)
        if str(target).endswith(".old"):
            threads.append(threading.Thread(target=read))
            threads[-1].start()
        return result

    monkeypatch.setattr(shutil, "rmtree", watching_rmtree)
    monkeypatch.setattr(Path, "rename", watching_rename)
    stop = threading.Event()

    def reader_loop():
        while not stop.is_set():
            read()

    loop = threading.Thread(target=reader_loop)
    loop.start()
    try:
        for _ in range(3):
            _cache(tiny_model, tiny_data, folder, overwrite=True)
    finally:
        stop.set()
        loop.join()
        for thread in threads:
            thread.join()
    assert errors == [] and len(seen) >= 6 and set(seen) == {n}
    assert len(threads) == (0 if exchange else 3)
    assert not folder.with_name("c.old").exists() and not folder.with_name("c.tmp").exists()


def test_friction_tasks_lists_which_tasks_have_no_files(capsys, tiny_data):
    """`ee-gym tasks` says which tasks the data folder holds no files for (tiny_data has RTE and SST-2)."""
    from ee_gym.cli import main

    assert main(["tasks", "--data-dir", str(tiny_data)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert "no files in" in lines["qnli"] and "no files in" in lines["mnli"]
    assert "no files in" not in lines["rte"]
