"""Envs and tables on slices of the training split (``train[90%:]``): the policy-split protocols."""

from __future__ import annotations

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from ee_gym.envs import ConsistentEEVectorEnv, prepare
from ee_gym.envs.classification import draws_at_random
from ee_gym.tasks import load_split

N_TRAIN = 64  # rows of the tiny training split (tests/conftest.py)


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("split", "random"),
    [("train", True), ("train[90%:]", True), ("train[:2000]", True), ("dev", False), ("dev[:50%]", False)],
)
def test_training_splits_and_their_slices_are_drawn_at_random(split, random):
    assert draws_at_random(split) is random


def _make(tiny_model, tiny_data, split, **kwargs):
    return gym.make(
        "ConsistentEE-RTE-v0",
        split=split,
        model=tiny_model,
        data_dir=str(tiny_data),
        max_length=32,
        progress=False,
        **kwargs,
    )


def test_gym_make_on_a_held_out_slice_of_train(tiny_model, tiny_data):
    env = _make(tiny_model, tiny_data, "train[75%:]")
    table = env.unwrapped.table
    assert table.split == "train[75%:]" and table.num_inputs == N_TRAIN // 4
    labels = load_split("rte", "train", tiny_data).labels
    np.testing.assert_array_equal(table.labels, labels[3 * N_TRAIN // 4 :])
    indices = [env.reset(seed=0 if i == 0 else None)[1]["index"] for i in range(12)]
    assert indices != list(range(12)) and max(indices) < N_TRAIN // 4  # drawn at random
    again = _make(tiny_model, tiny_data, "train[75%:]")
    assert [again.reset(seed=0 if i == 0 else None)[1]["index"] for i in range(12)] == indices


def test_gym_make_on_a_slice_of_dev_walks_in_order(tiny_model, tiny_data):
    env = _make(tiny_model, tiny_data, "dev[:50%]")
    assert env.unwrapped.num_inputs == 16
    assert [env.reset(seed=0 if i == 0 else None)[1]["index"] for i in range(18)] == [*range(16), 0, 1]


def test_live_mode_reads_the_slice(tiny_model, tiny_data):
    env = _make(tiny_model, tiny_data, "train[:25%]", mode="live")
    assert env.unwrapped.num_inputs == N_TRAIN // 4


def test_vector_env_draws_at_random_on_a_train_slice(tiny_model, tiny_data):
    env = ConsistentEEVectorEnv(
        num_envs=8,
        split="train[50%:]",
        model=tiny_model,
        data_dir=str(tiny_data),
        max_length=32,
        progress=False,
    )
    env.reset(seed=1)
    first = env.index.copy()
    assert env.table.num_inputs == N_TRAIN // 2 and first.max() < N_TRAIN // 2
    assert first.tolist() != list(range(8))
    dev = ConsistentEEVectorEnv(
        num_envs=8,
        split="dev[:50%]",
        model=tiny_model,
        data_dir=str(tiny_data),
        max_length=32,
        progress=False,
    )
    dev.reset(seed=1)
    assert dev.index.tolist() == list(range(8))


@pytest.mark.parametrize(
    ("protocol", "stage1_split", "rows"), [("paper", "train", 64), ("held-out", "train[:90%]", 7)]
)
def test_policy_tables_follow_the_protocol(tiny_model, tiny_data, monkeypatch, protocol, stage1_split, rows):
    trained = []

    def fake_stage1(config):  # stage 1 of the real backbone is too slow here: record and hand back
        trained.append(config.train_split)
        return SimpleNamespace(model=tiny_model)

    monkeypatch.setattr(prepare, "train_stage1", fake_stage1)
    train, dev = prepare.policy_tables(
        "rte", protocol, data_dir=str(tiny_data), max_length=32, progress=False
    )
    assert trained == [stage1_split]
    assert train.split == prepare.POLICY_PROTOCOLS[protocol][1] and train.num_inputs == rows  # 64 - 57
    assert dev.split == "dev" and dev.num_inputs == 32
    with pytest.raises(ValueError, match="held-out"):
        prepare.policy_tables("rte", "nope")


def test_default_protocol_is_consistent():
    assert prepare.POLICY_PROTOCOLS[prepare.POLICY_PROTOCOL] == (prepare.STAGE1_SPLIT, prepare.POLICY_SPLIT)
