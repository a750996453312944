"""Stage 1: the weighted loss, training on tiny data, checkpoints and resuming."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ee_gym import training
from ee_gym.multiexit import MultiExitModel
from ee_gym.training import Stage1Config, train_stage1, weighted_exit_loss
from tests.conftest import killed_after_first_checkpoint, new_tiny_model


def test_weighted_loss_matches_hand_computation():
    # Two layers, one example with label 0. Layer 1 logits (0, 0): CE = log 2.
    # Layer 2 logits (log 3, 0): p(0) = 3/4, CE = log(4/3). Weights 1 and 2 over 3.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    expected = (1 * math.log(2.0) + 2 * math.log(4.0 / 3.0)) / 3
    assert weighted_exit_loss(logits, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_loss_weights_deeper_layers_more():
    wrong_early = torch.tensor([[[0.0, 5.0], [5.0, 0.0], [5.0, 0.0]]])
    wrong_late = torch.tensor([[[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]])
    labels = torch.tensor([0])
    assert weighted_exit_loss(wrong_late, labels) > 2.9 * weighted_exit_loss(wrong_early, labels)


def test_task_defaults_are_recorded_in_the_resolved_config():
    config = Stage1Config(task="SST-2").resolved()
    assert config.task == "sst2"
    assert (config.learning_rate, config.epochs, config.max_length) == (3e-5, 1, 64)
    assert config.output_dir.endswith("sst2-minilm-l6-stage1")
    assert Stage1Config(task="rte", epochs=2).resolved().epochs == 2


def _tiny_run(tokenizer, tiny_data, output_dir, **overrides):
    model = new_tiny_model(tokenizer)
    settings = dict(
        task="sst2",
        data_dir=str(tiny_data),
        output_dir=str(output_dir),
        epochs=3,
        batch_size=8,
        learning_rate=5e-3,
        max_length=32,
        warmup_ratio=0.0,
        progress=False,
        seed=3,
    )
    settings.update(overrides)
    return train_stage1(Stage1Config(**settings), model=model)


def test_stage1_learns_tiny_data_and_writes_a_run_folder(tokenizer, tiny_data, tmp_path):
    result = _tiny_run(tokenizer, tiny_data, tmp_path / "run", epochs=6)
    losses = [record["train_loss"] for record in result.history]
    assert losses[-1] < losses[0]
    assert len(result.history[-1]["dev"]) == 4  # one metric record per exit
    assert result.history[-1]["dev"][-1]["accuracy"] > 0.8  # chance is 0.5
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["epochs"] == 6
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    assert (run / "checkpoint" / "trainer_state.pt").is_file()
    loaded = MultiExitModel.from_pretrained(result.model_dir)
    assert loaded.fingerprint() == result.model.fingerprint()
    # A second call finds the finished run and trains nothing.
    again = _tiny_run(tokenizer, tiny_data, run, epochs=6)
    assert again.model.fingerprint() == result.model.fingerprint()
    assert again.history == result.history


def test_interrupted_run_resumes_to_the_same_weights(tokenizer, tiny_data, tmp_path, monkeypatch):
    straight = _tiny_run(tokenizer, tiny_data, tmp_path / "straight")

    killed_after_first_checkpoint(monkeypatch, training)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tokenizer, tiny_data, tmp_path / "resumed")
    resumed = _tiny_run(tokenizer, tiny_data, tmp_path / "resumed")

    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    np.testing.assert_allclose(resumed.history[-1]["train_loss"], straight.history[-1]["train_loss"])


def test_resuming_with_other_settings_is_refused(tokenizer, tiny_data, tmp_path):
    _tiny_run(tokenizer, tiny_data, tmp_path / "run", epochs=1)
    with pytest.raises(ValueError, match="learning_rate"):
        _tiny_run(tokenizer, tiny_data, tmp_path / "run", epochs=1, learning_rate=1e-4)


def test_stage1_trains_on_its_train_split_only(tokenizer, tiny_data, tmp_path, monkeypatch):
    seen = []
    real_loss = training.weighted_exit_loss

    def counting_loss(logits, labels):
        seen.append(len(labels))
        return real_loss(logits, labels)

    monkeypatch.setattr(training, "weighted_exit_loss", counting_loss)
    _tiny_run(tokenizer, tiny_data, tmp_path / "half", epochs=1, train_split="train[:50%]")
    assert sum(seen) == 64 // 2  # the tiny data has 64 training rows
    saved = json.loads((tmp_path / "half" / "config.json").read_text())
    assert saved["train_split"] == "train[:50%]"


def test_train_split_names_the_default_run_folder():
    assert Stage1Config(task="rte").resolved().output_dir.endswith("rte-minilm-l6-stage1")
    sliced = Stage1Config(task="rte", train_split="train[:90%]").resolved()
    assert sliced.output_dir.endswith("rte-minilm-l6-stage1-train-to90pct")


def test_run_saved_before_train_split_existed_still_resumes(tmp_path):
    config = Stage1Config(task="rte", output_dir=str(tmp_path)).resolved()
    saved = dataclasses.asdict(config)
    del saved["train_split"]  # a config.json written before the field was added
    (tmp_path / "config.json").write_text(json.dumps(saved))
    training._check_run_config(tmp_path, config)  # counts as "train": no error
    with pytest.raises(ValueError, match="train_split"):
        training._check_run_config(tmp_path, dataclasses.replace(config, train_split="train[:90%]"))
