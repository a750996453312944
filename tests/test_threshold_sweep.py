"""Dense learner curves: a trained policy swept over its decision threshold (ExitPolicy.with_threshold,
threshold_sweep, ee_gym.evaluation.evaluate_sweep), on the synthetic tables of the learners' tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import agents
from agents.base import load_policy
from agents.reinforce import Reinforce
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.evaluation import evaluate, evaluate_sweep, table_scores
from ee_gym.validation import ConfigError
from tests.test_reinforce import easy_layer_table, train_env

NUM = 11  # thresholds per sweep (plus the default)


@pytest.fixture(scope="module")
def tables() -> tuple[ExitTable, ExitTable]:
    return easy_layer_table(seed=0), easy_layer_table(seed=1, split="dev")


@pytest.fixture(scope="module")
def reinforce(tables) -> Reinforce:
    return Reinforce(seed=0).learn(train_env(tables[0]), epochs=3, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def ppo(tables):
    return agents.make("ppo", total_timesteps=1_024).learn(ConsistentEEVectorEnv(1, table=tables[0]))


@pytest.fixture(scope="module")
def dqn(tables):
    policy = agents.make("dqn", total_timesteps=1_024, learning_starts=200)
    return policy.learn(ConsistentEEVectorEnv(1, table=tables[0]))


def check_sweep(policy, table: ExitTable) -> list:
    """The sweep's curve: thresholds rising, every input's exit layer never earlier (so the mean exit
    layer is non-decreasing), from all at the first layer to all at the last, and at the default
    threshold exactly the exits of the policy's own ``act``."""
    results = evaluate_sweep(policy, table, num=NUM)
    taus = [r.threshold for r in results]
    assert taus == sorted(taus) and len(set(taus)) == len(taus) and len(taus) >= 5
    layers = np.stack([r.exit_layers for r in results])  # [taus, N]
    assert (np.diff(layers, axis=0) >= 0).all(), "a higher threshold made some input exit earlier"
    means = [r.mean_exit_layer for r in results]
    assert (np.diff(means) >= 0).all(), means
    assert means[0] == 1.0 and means[-1] == table.num_layers, means  # earliest to latest exit
    assert len(set(means)) >= 4, f"the sweep should trace a curve, not a point: {means}"
    own = evaluate(policy, table)
    assert policy.exit_threshold is None and policy.default_threshold in taus
    default = results[taus.index(policy.default_threshold)]
    np.testing.assert_array_equal(default.exit_layers, own.exit_layers)
    np.testing.assert_array_equal(default.predictions, own.predictions)
    return results


def test_reinforce_sweep_traces_a_monotone_curve_through_its_own_rule(tables, reinforce):
    assert reinforce.sweeps_threshold and reinforce.default_threshold == 0.5
    check_sweep(reinforce, tables[1])


def test_ppo_sweeps_its_exit_probability(tables, ppo):
    assert ppo.default_threshold == 0.5 and ppo.score_range == (0.0, 1.0)
    scores = ppo.exit_scores(tables[1].derived["state+layer"])
    probs = ppo.model.policy.get_distribution(
        ppo.model.policy.obs_to_tensor(tables[1].derived["state+layer"])[0]
    )
    np.testing.assert_allclose(scores, probs.distribution.probs[:, 1].detach().numpy(), rtol=1e-6)
    assert ((scores >= 0) & (scores <= 1)).all()
    check_sweep(ppo, tables[1])


def test_dqn_sweeps_its_q_margin(tables, dqn):
    assert dqn.default_threshold == 0.0 and dqn.score_range is None
    obs = tables[1].derived["state+layer"]
    with torch.no_grad():
        q = dqn.model.q_net(dqn.model.policy.obs_to_tensor(obs)[0]).numpy()
    np.testing.assert_allclose(dqn.exit_scores(obs), q[:, 1] - q[:, 0], rtol=1e-5, atol=1e-6)
    results = check_sweep(dqn, tables[1])
    assert min(r.threshold for r in results) < 0 < max(r.threshold for r in results)
    with pytest.raises(ConfigError, match="unbounded"):
        dqn.threshold_sweep()  # a margin has no range of its own: the sweep needs a table's scores


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("a2c", {}),
        ("maskable-ppo", {}),  # p(EXIT) = 1 at the last layer, as its masked predict
        ("qrdqn", {"learning_starts": 200}),  # the margin of the quantiles' means
    ],
)
def test_the_other_sb3_learners_sweep_too(name, settings, tables):
    if name in ("maskable-ppo", "qrdqn"):
        pytest.importorskip("sb3_contrib")
    policy = agents.make(name, total_timesteps=1_024, **settings)
    check_sweep(policy.learn(ConsistentEEVectorEnv(1, table=tables[0])), tables[1])


def test_evaluate_sweep_does_no_retraining(tables, reinforce, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("evaluate_sweep trained the policy")

    monkeypatch.setattr(Reinforce, "fit", no_training)
    monkeypatch.setattr(Reinforce, "_rollout", no_training)
    before = {k: v.clone() for k, v in reinforce.net.state_dict().items()}
    history = list(reinforce.history)
    first = evaluate_sweep(reinforce, tables[1], num=NUM)
    again = evaluate_sweep(reinforce, tables[1], taus=[r.threshold for r in first])
    for a, b in zip(first, again, strict=True):  # deterministic at each tau
        np.testing.assert_array_equal(a.exit_layers, b.exit_layers)
    after = reinforce.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert reinforce.history == history and reinforce.exit_threshold is None


def test_with_threshold_shares_the_weights_and_moves_only_the_decision(tables, reinforce):
    obs = tables[1].derived["state+layer"]
    probs = reinforce.exit_scores(obs)
    layers = obs[:, -tables[1].num_layers :].argmax(1) + 1
    for tau in (0.1, 0.5, 0.9):
        shifted = reinforce.with_threshold(tau)
        assert shifted.net is reinforce.net and shifted.exit_threshold == tau
        expected = (probs > tau) | (layers == tables[1].num_layers)
        np.testing.assert_array_equal(shifted.act(obs), expected.astype(np.int64))
    np.testing.assert_array_equal(reinforce.with_threshold(0.5).act(obs), reinforce.act(obs))
    assert reinforce.with_threshold(0.9).with_threshold(None).threshold_in_force == 0.5
    with pytest.raises(ConfigError, match="tau"):
        reinforce.with_threshold(float("nan"))


def test_threshold_sweep_spans_the_scores_and_keeps_the_default(reinforce):
    grid = reinforce.threshold_sweep(num=5)  # no scores: even over the range of a probability
    np.testing.assert_allclose(grid, [0.0, 0.25, 0.5, 0.75, 1.0])
    scores = np.array([[0.2, 0.4, 0.9], [0.3, 0.6, 0.7]])
    taus = reinforce.threshold_sweep(scores, num=3)
    assert taus[0] < scores.min() and taus[-1] == scores.max() and 0.5 in taus
    assert list(taus) == sorted(set(taus))
    with pytest.raises(ConfigError, match="num"):
        reinforce.threshold_sweep(num=1)


def test_table_scores_follow_every_input_to_the_last_layer(tables, reinforce):
    dev = tables[1]
    scores = table_scores(reinforce, dev)
    assert scores.shape == (dev.num_inputs, dev.num_layers)
    flat = reinforce.exit_scores(dev.derived["state+layer"]).reshape(dev.num_inputs, dev.num_layers)
    np.testing.assert_allclose(scores, flat, rtol=1e-6)


def test_a_chosen_threshold_survives_save_and_load(tables, reinforce, dqn, tmp_path):
    obs = tables[1].derived["state+layer"]
    for name, policy, tau in (("reinforce", reinforce, 0.8), ("dqn", dqn, -0.5)):
        policy.with_threshold(tau).save(tmp_path / name)
        loaded = load_policy(tmp_path / name)
        assert loaded.exit_threshold == tau
        np.testing.assert_array_equal(loaded.act(obs), policy.with_threshold(tau).act(obs))
    reinforce.save(tmp_path / "own")
    assert load_policy(tmp_path / "own").exit_threshold is None


def test_results_name_their_threshold_only_when_swept(tables, reinforce):
    own = evaluate(reinforce, tables[1]).to_dict()
    assert "threshold" not in own
    swept = evaluate_sweep(reinforce, tables[1], taus=[0.3])[0].to_dict()
    assert swept["threshold"] == 0.3


def test_policies_without_a_threshold_say_so(tables):
    rule = agents.make("entropy")
    assert not rule.sweeps_threshold
    for call in (
        lambda: rule.with_threshold(0.5),
        lambda: rule.threshold_sweep(),
        lambda: evaluate_sweep(rule, tables[1]),
    ):
        with pytest.raises(NotImplementedError, match="sweeps_threshold is False"):
            call()
