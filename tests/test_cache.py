"""The per-layer cache: contents, round trip, float16 choice and stale-model refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ee_gym.batching import tokenize_examples
from ee_gym.cache import StaleCacheError, build_cache, default_cache_dir, open_cache
from ee_gym.hardness import memorized_layer_from_logits
from ee_gym.tasks import load_split


def _build(model, data, folder=None, **kwargs):
    kwargs.setdefault("max_length", 32)
    return build_cache(model, "rte", "dev", folder, data_dir=str(data), progress=False, **kwargs)


def test_cache_holds_every_exit_of_every_input(tiny_model, tiny_data):
    cache = _build(tiny_model, tiny_data, batch_size=5)
    n = len(load_split("rte", "dev", tiny_data))
    assert (cache.num_inputs, cache.num_layers, cache.hidden_size, cache.num_labels) == (n, 4, 32, 2)
    examples = load_split("rte", "dev", tiny_data)
    batch = tiny_model.tokenize(examples.text_a[:3], examples.text_b[:3], max_length=32)
    with torch.no_grad():
        out = tiny_model(**batch)
    np.testing.assert_allclose(cache.logits[:3], out.logits.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cache.states[:3].astype(np.float32), out.states.numpy(), atol=2e-3)
    np.testing.assert_array_equal(cache.labels, examples.labels)
    np.testing.assert_array_equal(cache.memorized, memorized_layer_from_logits(cache.logits, cache.labels))
    assert cache.memorized.min() >= 1 and cache.memorized.max() <= 4
    assert isinstance(cache.states, np.memmap)
    assert cache.folder == default_cache_dir(tiny_model, "rte", "dev", 32, data_dir=tiny_data)


def test_float16_states_only_when_predictions_do_not_change(tiny_model, tiny_data):
    cache = _build(tiny_model, tiny_data)
    manifest = cache.manifest
    expected = "float16" if manifest["fp16_prediction_mismatches"] == 0 else "float32"
    assert manifest["state_dtype"] == expected == cache.states.dtype.name
    forced = _build(tiny_model, tiny_data, state_dtype="float32", overwrite=True)
    assert forced.states.dtype == np.float32
    with pytest.raises(ValueError, match="state_dtype"):
        _build(tiny_model, tiny_data, state_dtype="bfloat16")


def test_manifest_records_what_produced_it(tiny_model, tiny_data):
    manifest = _build(tiny_model, tiny_data, limit=10).manifest
    assert manifest["fingerprint"] == tiny_model.fingerprint()
    assert (manifest["task"], manifest["split"], manifest["max_length"], manifest["limit"]) == (
        "rte",
        "dev",
        32,
        10,
    )
    assert manifest["num_inputs"] == 10
    assert len(manifest["layer_metrics"]) == 4


def test_round_trip_and_reuse(tiny_model, tiny_data, tmp_path):
    built = _build(tiny_model, tiny_data, tmp_path / "c")
    opened = open_cache(tmp_path / "c", tiny_model)
    np.testing.assert_array_equal(opened.logits, built.logits)
    np.testing.assert_array_equal(opened.states, built.states)
    np.testing.assert_array_equal(opened.memorized, built.memorized)
    stamp = (tmp_path / "c" / "manifest.json").stat().st_mtime_ns
    _build(tiny_model, tiny_data, tmp_path / "c")  # same model and settings: served, not rebuilt
    assert (tmp_path / "c" / "manifest.json").stat().st_mtime_ns == stamp


def test_stale_cache_is_refused_with_the_fix(tiny_model, tiny_data, tmp_path):
    _build(tiny_model, tiny_data, tmp_path / "c")
    with torch.no_grad():
        tiny_model.heads[0].weight.add_(0.01)
    with pytest.raises(StaleCacheError, match="fingerprint.*overwrite=True"):
        open_cache(tmp_path / "c", tiny_model)
    with pytest.raises(StaleCacheError):
        _build(tiny_model, tiny_data, tmp_path / "c")
    rebuilt = _build(tiny_model, tiny_data, tmp_path / "c", overwrite=True)
    assert rebuilt.fingerprint == tiny_model.fingerprint()
    with pytest.raises(StaleCacheError, match="max_length"):
        _build(tiny_model, tiny_data, tmp_path / "c", max_length=16)


def test_missing_or_half_written_cache_is_not_served(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="build_cache"):
        open_cache(tmp_path / "nothing")
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "logits.npy", np.zeros(3))  # an interrupted build wrote arrays only
    with pytest.raises(FileNotFoundError, match="manifest"):
        open_cache(tmp_path / "c")


def test_older_format_is_refused(tiny_model, tiny_data, tmp_path):
    _build(tiny_model, tiny_data, tmp_path / "c")
    manifest_file = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["format_version"] = 0
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(StaleCacheError, match="format_version"):
        open_cache(tmp_path / "c")


def test_tokenized_batches_pad_dynamically(tokenizer, tiny_data):
    split = tokenize_examples(load_split("rte", "dev", tiny_data), tokenizer, max_length=32)
    batch = split.batch([0, 1], tokenizer)
    assert batch["input_ids"].shape[1] == max(split.lengths[[0, 1]])
    assert batch["labels"].tolist() == split.labels[[0, 1]].tolist()


def test_sliced_split_gets_a_safe_folder_and_its_exact_name_in_the_manifest(tiny_model, tiny_data):
    cache = build_cache(
        tiny_model, "rte", "train[50%:]", data_dir=str(tiny_data), max_length=32, progress=False
    )
    assert cache.folder == default_cache_dir(tiny_model, "rte", "train[50%:]", 32, data_dir=tiny_data)
    assert cache.folder.name == f"rte-train-from50pct-len32-d{cache.manifest['data_hash'][:8]}"
    assert cache.manifest["split"] == "train[50%:]"
    examples = load_split("rte", "train", tiny_data)
    np.testing.assert_array_equal(cache.labels, examples.labels[len(examples) // 2 :])
    head = build_cache(
        tiny_model, "rte", "train[:50%]", data_dir=str(tiny_data), max_length=32, progress=False
    )
    assert head.folder.name.startswith("rte-train-to50pct-len32-d")
    assert head.num_inputs + cache.num_inputs == len(examples)
