"""TensorBoard scalars (ee_gym.scalars): written by stage 1, stage 3, REINFORCE and the SB3 learners
when asked, and a clear error, before any work, when the package is missing."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import agents
from agents.reinforce import Reinforce
from ee_gym.joint import Stage3Config, train_stage3
from ee_gym.policy import TrainingBudget
from ee_gym.training import Stage1Config, train_stage1
from ee_gym.validation import ConfigError
from tests.conftest import new_tiny_model
from tests.test_reinforce import easy_layer_table, train_env

pytest.importorskip("tensorboard")  # the extra; `.[dev]` (and so CI) installs it
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def scalar_values(accumulator: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in accumulator.Scalars(tag)]


def test_stage1_writes_its_loss_and_per_layer_dev_metric(tokenizer, tiny_data, tmp_path):
    config = Stage1Config(task="sst2", data_dir=str(tiny_data), output_dir=str(tmp_path / "run"), epochs=2,
                          batch_size=8, max_length=32, progress=False, tensorboard=str(tmp_path / "tb"))  # fmt: skip
    result = train_stage1(config, model=new_tiny_model(tokenizer))
    found = events(tmp_path / "tb")
    tags = found.Tags()["scalars"]
    assert "stage1/train_loss" in tags and "stage1/train_loss_step" in tags
    layers = new_tiny_model(tokenizer).num_layers
    for layer in range(1, layers + 1):
        values = scalar_values(found, f"stage1/dev_accuracy/layer_{layer:02d}")
        assert values == pytest.approx([h["dev"][layer - 1]["accuracy"] for h in result.history], abs=1e-6)
    assert scalar_values(found, "stage1/train_loss") == pytest.approx(
        [h["train_loss"] for h in result.history], rel=1e-6
    )


def test_reinforce_writes_reward_exit_layer_and_its_histogram(tmp_path):
    table = easy_layer_table(n=64)
    policy = Reinforce(seed=0).learn(
        train_env(table),
        TrainingBudget(epochs=2, replicas=4, progress=False, tensorboard_log=str(tmp_path / "tb")),
    )
    found = events(tmp_path / "tb")
    assert scalar_values(found, "reinforce/mean_reward") == pytest.approx(
        [h["mean_reward"] for h in policy.history], rel=1e-6
    )
    assert len(scalar_values(found, "reinforce/mean_exit_layer")) == 2
    histogram = found.Histograms("reinforce/exit_layer")[-1].histogram_value
    assert histogram.num == 64 * 4 and histogram.min >= 1 and histogram.max <= table.num_layers


def test_sb3_learners_pass_tensorboard_through(tmp_path):
    table = easy_layer_table(n=64)
    policy = agents.make("ppo", total_timesteps=256, n_steps=32, batch_size=32, n_epochs=1)
    policy.learn(train_env(table), TrainingBudget(progress=False, tensorboard_log=str(tmp_path / "tb")))
    runs = list((tmp_path / "tb").iterdir())
    assert [r.name for r in runs] == ["ppo_seed0"]
    assert any(
        tag.startswith("rollout/") or tag.startswith("train/") for tag in events(runs[0]).Tags()["scalars"]
    )


def test_stage3_writes_losses_reward_and_exit_histogram(tokenizer, tiny_data, tmp_path):
    config = Stage3Config(task="sst2", data_dir=str(tiny_data), output_dir=str(tmp_path / "run"), epochs=1,
                          batch_size=8, replicas=2, max_length=32, train_limit=16, progress=False,
                          tensorboard=str(tmp_path / "tb"))  # fmt: skip
    result = train_stage3(config, model=new_tiny_model(tokenizer), policy=Reinforce(seed=1),
                          memorized=np.tile([1, 2, 3, 4], 4))  # fmt: skip
    found = events(tmp_path / "tb")
    for name in ("train_loss", "ce_loss", "policy_loss", "mean_reward", "mean_exit_layer"):
        assert scalar_values(found, f"stage3/{name}") == pytest.approx([result.history[0][name]], rel=1e-6)
    assert found.Histograms("stage3/exit_layer")[-1].histogram_value.num == 16 * 2


def test_a_missing_package_or_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        Stage1Config(tensorboard=str(tmp_path / "file"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    for make in (lambda: Stage1Config(tensorboard="tb"), lambda: Stage3Config(tensorboard="tb"),
                 lambda: TrainingBudget(tensorboard_log="tb")):  # fmt: skip
        with pytest.raises(ConfigError, match=r"ee-gym\[tensorboard\]"):
            make()
    assert Stage1Config().tensorboard is None  # not asked: nothing needed
