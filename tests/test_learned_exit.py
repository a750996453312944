"""``learned-exit`` (agents/learned_exit.py, BERxiT's learning-to-exit) on the synthetic table whose
right exits are known (tests/test_reinforce.py): head l is right iff l >= e(x), and the state tells
l >= e apart, so a correctness predictor that reads the state finds e(x)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import agents
from agents.base import PolicyMismatchError, load_policy
from agents.evaluate import evaluate
from agents.learned_exit import LearnedExit
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.policy import policy_class
from ee_gym.validation import ConfigError
from tests.test_reinforce import NUM_LAYERS, STATE_SIZE, assert_same_decisions, easy_layer_table


def train_env(table: ExitTable, **kwargs) -> ConsistentEEVectorEnv:
    return ConsistentEEVectorEnv(1, table=table, split=table.split, final_obs=False, **kwargs)


@pytest.fixture(scope="module")
def tables() -> tuple[ExitTable, ExitTable]:
    return easy_layer_table(seed=0), easy_layer_table(seed=1, split="dev")


@pytest.fixture(scope="module")
def trained(tables) -> LearnedExit:
    return agents.make("learned-exit").learn(train_env(tables[0]), progress=False)


def test_finds_the_right_exits(tables, trained):
    dev = tables[1]
    result = evaluate(trained, dev)
    exits = np.asarray(result.exit_layers)
    assert (exits == dev.memorized).mean() >= 0.95  # exits at e(x), the first right layer
    assert result.score >= 0.97
    assert abs(result.mean_exit_layer - dev.memorized.mean()) <= 0.1  # the oracle's mean exit
    # it learned: the loss fell and the predictions of "head l is right" are nearly all right
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]
    assert trained.history[-1]["accuracy"] >= 0.97
    # 400 inputs are 2 batches an epoch: the default trains for 500 updates, so 250 epochs
    assert [h["epoch"] for h in trained.history] == list(range(1, 251))
    # an untrained predictor does not
    untrained = LearnedExit(seed=0)
    untrained.bind(train_env(tables[0]))
    assert (np.asarray(evaluate(untrained, dev).exit_layers) == dev.memorized).mean() < 0.5


def noisy_table(seed: int, split: str, noise: float = 1.0) -> ExitTable:
    """The synthetic table with noisier states: s_l no longer tells l >= e(x) apart for sure, so the
    predicted correctness spreads between 0 and 1 and the threshold has a trade-off to trace."""
    table = easy_layer_table(seed=seed, split=split)
    rng = np.random.default_rng(seed + 50)
    states = np.clip(table.states + rng.normal(0.0, noise, table.states.shape), -1.0, 1.0)
    return ExitTable(states.astype(np.float32), table.logits, table.labels, table.memorized, split=split)


def test_threshold_sweep_traces_a_monotone_exit_depth_curve(trained):
    sweep = LearnedExit.sweep(NUM_LAYERS)
    thresholds = [kwargs["threshold"] for kwargs in sweep]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) >= 10  # earliest exits first
    assert agents.make("learned-exit", **sweep[3]).threshold == thresholds[3]
    train, dev = noisy_table(0, "train"), noisy_table(1, "dev")
    policy = LearnedExit(seed=0).learn(train_env(train))
    results = [evaluate(policy.with_threshold(**kwargs), dev) for kwargs in sweep]
    depths = np.array([r.mean_exit_layer for r in results])
    assert (np.diff(depths) >= 0).all(), depths
    assert depths[-1] - depths[0] >= 1.0, depths  # a curve, not a point
    assert results[-1].score - results[0].score >= 0.2  # later exits are right more often here
    # the extremes: a threshold of 0 exits every input at layer 1; 1 no earlier than the sweep's last
    assert evaluate(policy.with_threshold(0.0), dev).mean_exit_layer == 1.0
    assert evaluate(policy.with_threshold(1.0), dev).mean_exit_layer >= depths[-1]
    # with_threshold shares the weights and leaves the original's threshold alone
    assert trained.with_threshold(0.9).net is trained.net and trained.threshold == 0.5


def test_same_seed_same_weights_other_seed_other_weights(tables):
    def weights(seed: int) -> torch.Tensor:
        policy = LearnedExit(seed=seed).learn(train_env(tables[0]), epochs=2)
        return torch.cat([p.detach().flatten() for p in policy.net.parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_save_load_round_trip_gives_identical_actions(tables, trained, tmp_path):
    dev = tables[1]
    trained.save(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert isinstance(loaded, LearnedExit)
    assert loaded.get_params() == trained.get_params() and loaded.shapes == trained.shapes
    assert_same_decisions(loaded, trained, dev)


@pytest.mark.parametrize("num_layers, d", [(4, 8), (4, STATE_SIZE + NUM_LAYERS - 4)])
def test_refuses_a_table_of_other_shapes(trained, num_layers, d, tmp_path):
    """Other (L, d), including one of the same observation width (4 + 18 = 6 + 16)."""
    other = easy_layer_table(n=20, num_layers=num_layers, d=d)
    with pytest.raises(PolicyMismatchError, match="trained on a table of L=6 layers, d=16"):
        trained.bind(train_env(other))
    trained.save(tmp_path / "policy")
    with pytest.raises(PolicyMismatchError):
        load_policy(tmp_path / "policy").learn(train_env(other), epochs=1)


def test_last_layer_exits_whatever_the_predictor_says(tables):
    policy = LearnedExit(threshold=1.0)
    policy.bind(train_env(tables[0]))
    with torch.no_grad():
        policy.net.linear.bias.fill_(-100.0)  # c ~ 0: never predicted right
    obs = np.zeros((NUM_LAYERS, STATE_SIZE + NUM_LAYERS), dtype=np.float32)
    obs[:, STATE_SIZE:] = np.eye(NUM_LAYERS)
    np.testing.assert_array_equal(policy.act(obs), [0] * (NUM_LAYERS - 1) + [1])
    np.testing.assert_array_equal(policy.act(obs, deterministic=False), [0] * (NUM_LAYERS - 1) + [1])


def test_registered_and_validated():
    assert "learned-exit" in agents.names() and policy_class("learned-exit") is LearnedExit
    policy = agents.make("learned-exit")
    assert policy.learns and not policy.trains_jointly and policy.deployable
    assert policy.obs_mode == "state+layer" and policy.threshold == 0.5
    with pytest.raises(RuntimeError, match="no predictor"):
        policy.act(np.zeros((1, STATE_SIZE + NUM_LAYERS), dtype=np.float32))
    for bad in ({"threshold": 1.5}, {"threshold": -0.1}, {"obs_mode": "stats"}, {"seed": -1}):
        with pytest.raises(ConfigError):
            agents.make("learned-exit", **bad)
    with pytest.raises(ValueError, match="obs_mode='state\\+layer'"):
        LearnedExit().bind(ConsistentEEVectorEnv(1, table=easy_layer_table(n=8), obs_mode="stats"))


def test_the_core_threshold_sweep_reads_its_predicted_correctness():
    """learned-exit is a sweeping policy of the core protocol: evaluate_sweep traces its curve from
    one trained predictor, and the default threshold gives exactly what act gives."""
    from ee_gym.evaluation import evaluate_sweep

    train, dev = noisy_table(0, "train"), noisy_table(1, "dev")
    policy = LearnedExit(seed=0).learn(train_env(train))
    results = evaluate_sweep(policy, dev, num=11)
    depths = np.array([r.mean_exit_layer for r in results])
    assert (np.diff(depths) >= 0).all() and depths[-1] - depths[0] >= 1.0, depths
    at_default = next(r for r in results if r.threshold == policy.default_threshold)
    assert at_default.mean_exit_layer == evaluate(policy, dev).mean_exit_layer
