"""REINFORCE (agents/reinforce.py) on a synthetic table whose right policy is known, plus its formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import agents
from agents.base import load_policy
from agents.evaluate import evaluate
from agents.reinforce import Reinforce, group_baseline, trajectory_log_prob
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.envs.observations import CONFIDENCE_WIDTH
from ee_gym.rewards import accuracy

NUM_LAYERS, STATE_SIZE = 6, 16


def easy_layer_table(
    n: int = 400, num_layers: int = NUM_LAYERS, d: int = STATE_SIZE, seed: int = 0, split: str = "train"
) -> ExitTable:
    """Each input has an easy layer e in 1..L: the head at layer l is confidently right iff l >= e.

    The state s_l points along a fixed direction when l >= e and against it otherwise (plus noise),
    so a per-layer policy can learn to exit exactly at e: the oracle, 100 % at mean exit (L+1)/2.
    Every static layer l < L is right for l/L of the inputs only. memorized = e.
    """
    rng = np.random.default_rng(seed)
    easy = rng.integers(1, num_layers + 1, size=n)
    labels = rng.integers(0, 2, size=n)
    right = np.arange(1, num_layers + 1)[None, :] >= easy[:, None]  # [N, L]
    target = np.where(right, labels[:, None], 1 - labels[:, None])
    logits = np.zeros((n, num_layers, 2), dtype=np.float32)
    margin = rng.uniform(2.0, 4.0, size=(n, num_layers, 1)).astype(np.float32)
    np.put_along_axis(logits, target[..., None], margin, axis=-1)
    direction = np.random.default_rng(1234).normal(size=d)
    direction /= np.linalg.norm(direction)
    signal = np.where(right, 1.0, -1.0)[..., None] * 2.0 * direction
    states = np.clip(signal + rng.normal(0.0, 0.3, size=(n, num_layers, d)), -1.0, 1.0).astype(np.float32)
    return ExitTable(states, logits, labels, easy, task="custom", split=split)


@pytest.fixture(scope="module")
def tables() -> tuple[ExitTable, ExitTable]:
    return easy_layer_table(seed=0), easy_layer_table(seed=1, split="dev")


def train_env(table: ExitTable, **kwargs) -> ConsistentEEVectorEnv:
    return ConsistentEEVectorEnv(1, table=table, split=table.split, final_obs=False, **kwargs)


@pytest.fixture(scope="module")
def trained(tables) -> Reinforce:
    policy = Reinforce(seed=0)
    return policy.learn(train_env(tables[0]), epochs=5, lr=3e-3, progress=False)


def beats_best_static_layer(result, table: ExitTable) -> tuple[bool, str]:
    """Accuracy within 0.01 of the best static layer's, at least one layer earlier on average."""
    static = table.correct.mean(0)  # accuracy of each static layer 1..L
    best = float(static.max())
    best_layer = int(np.flatnonzero(static >= best)[0]) + 1  # the earliest layer reaching it
    ok = result.score >= best - 0.01 and result.mean_exit_layer <= best_layer - 1.0
    return ok, (
        f"policy {result.score:.3f} at mean layer {result.mean_exit_layer:.2f} vs static {best:.3f} at "
        f"layer {best_layer}"
    )


# -- learning ----------------------------------------------------------------------------------------
def test_default_policy_beats_the_best_static_layer_at_equal_accuracy(tables, trained):
    train, dev = tables
    assert trained.rollout == "sample"  # the default the class docstring justifies
    untrained = Reinforce(seed=0)
    untrained.bind(train_env(train))
    ok, why = beats_best_static_layer(evaluate(untrained, dev), dev)
    assert not ok, f"the untrained policy should not pass: {why}"
    result = evaluate(trained, dev)
    ok, why = beats_best_static_layer(result, dev)
    assert ok, why
    assert result.mean_exit_layer <= 4.0, why  # the oracle exits at 3.5 on average
    assert [h["epoch"] for h in trained.history] == [1, 2, 3, 4, 5]
    assert {"mean_reward", "mean_exit_layer", "accuracy", "loss", "seconds"} <= set(trained.history[0])
    assert trained.history[-1]["mean_reward"] > trained.history[0]["mean_reward"]


def confidence_only_table(n: int = 400, seed: int = 0, split: str = "train") -> ExitTable:
    """As ``easy_layer_table``, but the states are noise: only the heads' confidence tells the easy
    layer (a confident right head from e on, a nearly uniform wrong one before)."""
    table = easy_layer_table(n=n, seed=seed, split=split)
    rng = np.random.default_rng(seed + 100)
    right = table.correct
    logits = np.where(right[..., None], table.logits, 0.05 * (table.logits > 0))  # gap ~0.02 when wrong
    states = rng.uniform(-1.0, 1.0, size=table.states.shape).astype(np.float32)
    return ExitTable(
        states, logits.astype(np.float32), table.labels, table.memorized, task="custom", split=split
    )


def test_confidence_observation_learns_what_the_state_cannot_tell():
    """With states that carry nothing, the paper's state policy cannot find the easy layer; the
    state+confidence policy reads it off the head and beats every static layer."""
    train, dev = confidence_only_table(seed=0), confidence_only_table(seed=1, split="dev")
    results = {}
    for obs_mode in ("state+layer", "state+confidence"):
        policy = Reinforce(seed=0, obs_mode=obs_mode)
        policy.learn(train_env(train, obs_mode=obs_mode), epochs=5, lr=3e-3, progress=False)
        results[obs_mode] = beats_best_static_layer(evaluate(policy, dev), dev)
    assert results["state+confidence"][0], results["state+confidence"][1]
    assert not results["state+layer"][0], results["state+layer"][1]
    assert policy.net.state_size == STATE_SIZE + CONFIDENCE_WIDTH


def test_same_seed_same_weights_other_seed_other_weights(tables):
    def weights(seed: int) -> torch.Tensor:
        policy = Reinforce(seed=seed).learn(train_env(tables[0]), epochs=1, progress=False)
        return torch.cat([p.detach().flatten() for p in policy.net.parameters()])

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_rollout_pays_the_envs_own_reward_once_per_row(tables):
    table = tables[0]
    env = train_env(table, reward="accuracy", alpha=0.5)
    policy = Reinforce(seed=0)
    policy.bind(env)
    index = np.repeat(np.arange(16), 4)
    out = policy._rollout(policy._training_env(env, table, len(index)), index, "sample")
    assert ((out.exit_layer >= 1) & (out.exit_layer <= NUM_LAYERS)).all()
    correct = table.correct[index, out.exit_layer - 1]
    expected = accuracy(None, correct, out.exit_layer, None, NUM_LAYERS, 0.5)  # 1[correct] - 0.5 t
    np.testing.assert_allclose(out.rewards, expected)
    np.testing.assert_array_equal(out.correct, correct)
    assert out.exit_chosen[out.exit_layer < NUM_LAYERS].all()
    # the logits after each row's exit are zeros and carry no gradient to the network
    after = torch.arange(1, NUM_LAYERS + 1)[None, :] > torch.from_numpy(out.exit_layer)[:, None]
    assert (out.logits[after] == 0).all() and out.logits.requires_grad


def test_threshold_replicas_differ_only_by_dropout(tables):
    table = tables[0]
    env = train_env(table)
    index = np.repeat(np.arange(32), 8)
    layers = {}
    for dropout in (0.0, 0.1):
        policy = Reinforce(rollout="threshold", dropout=dropout, seed=0)
        policy.bind(env)
        out = policy._rollout(policy._training_env(env, table, len(index)), index, "threshold")
        layers[dropout] = out.exit_layer.reshape(32, 8)
    assert (layers[0.0] == layers[0.0][:, :1]).all()  # deterministic: every replica alike
    assert (layers[0.1] != layers[0.1][:, :1]).any()  # dropout makes some replicas differ


def _acts_when_always_exiting(policy: Reinforce, tmp_path) -> tuple[list[int], list[int]]:
    """Set every layer's exit probability to ~1, then act once at each layer: (the policy's actions,
    the actions of its saved and reloaded copy)."""
    with torch.no_grad():
        for head in policy.net.layers:
            head[-1].bias.fill_(100.0)
    obs = np.zeros((NUM_LAYERS, STATE_SIZE + NUM_LAYERS), dtype=np.float32)
    obs[:, STATE_SIZE:] = np.eye(NUM_LAYERS)
    policy.save(tmp_path / "policy")
    return policy.act(obs).tolist(), load_policy(tmp_path / "policy").act(obs).tolist()


def test_min_layer_forbids_earlier_exits_in_training_and_acting(tables, tmp_path):
    train, dev = tables
    policy = Reinforce(seed=0, min_layer=4)
    policy.learn(train_env(train), epochs=3, lr=3e-3, progress=False)
    assert min(evaluate(policy, dev).exit_layers) >= 4
    index = np.repeat(np.arange(16), 4)
    out = policy._rollout(policy._training_env(train_env(train), train, len(index)), index, "sample")
    assert (out.exit_layer >= 4).all()
    assert (out.logits[:, :3] == 0).all()  # no decision below the min layer, so no logit there
    # The networks below the min layer are never trained: they keep their initial weights.
    fresh = Reinforce(seed=0, min_layer=4)
    fresh.bind(train_env(train))
    trained_state, initial_state = policy.net.state_dict(), fresh.net.state_dict()
    for key in trained_state:
        if key.startswith(("layers.0.", "layers.1.", "layers.2.")):
            assert torch.equal(trained_state[key], initial_state[key]), key
    assert not torch.equal(policy.net.layers[3][0].weight, fresh.net.layers[3][0].weight)
    # act() refuses earlier exits even where the network says EXIT; the setting survives save/load.
    assert _acts_when_always_exiting(policy, tmp_path) == ([0, 0, 0, 1, 1, 1],) * 2
    with pytest.raises(ValueError, match="min_layer must be 1 or more"):
        Reinforce(min_layer=0)
    with pytest.raises(ValueError, match="beyond the env's last layer"):
        Reinforce(min_layer=NUM_LAYERS + 1).bind(train_env(train))


def test_every_decides_at_every_kth_layer_from_min_layer_in_training_and_acting(tables, tmp_path):
    """every=2 from min layer 2: the policy decides at layers 2 and 4 only (and L = 6 exits)."""
    train, dev = tables
    policy = Reinforce(seed=0, min_layer=2, every=2)
    policy.learn(train_env(train), epochs=3, lr=3e-3, progress=False)
    assert set(evaluate(policy, dev).exit_layers) <= {2, 4, 6}
    index = np.repeat(np.arange(16), 4)
    out = policy._rollout(policy._training_env(train_env(train), train, len(index)), index, "sample")
    assert set(out.exit_layer.tolist()) <= {2, 4, 6}
    assert (out.logits[:, [0, 2, 4]] == 0).all()  # no decision between probes, so no logit there
    assert _acts_when_always_exiting(policy, tmp_path) == ([0, 1, 0, 1, 0, 1],) * 2
    features = np.zeros((3, STATE_SIZE), dtype=np.float32)
    assert [bool(policy.exits_at_layer(features, layer).all()) for layer in range(1, 7)] == [
        False, True, False, True, False, True,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="every"):
        Reinforce(every=0)


# -- the formulas ------------------------------------------------------------------------------------
def test_trajectory_log_prob_on_hand_made_trajectories():
    probs = torch.tensor(
        [
            [0.2, 0.3, 0.9],  # exits at 3 by choice: log .8 + log .7 + log .9
            [0.2, 0.3, 0.4],  # forced out at L = 3 after CONTINUE: log .8 + log .7 + log .6
            [0.6, 0.99, 0.01],  # exits at 1: log .6; what follows is ignored
            [0.1, 0.7, 0.5],  # exits at 2: log .9 + log .7
        ],
        dtype=torch.float64,
    )
    logits = torch.log(probs / (1 - probs))
    exit_layer = torch.tensor([3, 3, 1, 2])
    chosen = torch.tensor([True, False, True, True])
    expected = [
        math.log(0.8) + math.log(0.7) + math.log(0.9),
        math.log(0.8) + math.log(0.7) + math.log(0.6),
        math.log(0.6),
        math.log(0.9) + math.log(0.7),
    ]
    got = trajectory_log_prob(logits.requires_grad_(), exit_layer, chosen)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12)
    got.sum().backward()  # d/dz log sigmoid(z) = 1 - p, d/dz log(1 - sigmoid(z)) = -p, 0 after the exit
    np.testing.assert_allclose(logits.grad[2].numpy(), [0.4, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(logits.grad[1].numpy(), [-0.2, -0.3, -0.4], atol=1e-12)


def test_trajectory_log_prob_leaves_out_the_layers_below_min_layer():
    logits = torch.randn(5, 6, dtype=torch.float64)
    exit_layer, chosen = torch.tensor([3, 4, 6, 6, 5]), torch.tensor([True, True, True, False, True])
    full = trajectory_log_prob(logits, exit_layer, chosen)
    below = F.logsigmoid(-logits[:, :2]).sum(1)  # layers 1, 2: CONTINUE in every trajectory
    np.testing.assert_allclose(
        trajectory_log_prob(logits, exit_layer, chosen, 3).numpy(), (full - below).numpy()
    )


def test_trajectory_log_prob_leaves_out_the_layers_between_probes():
    logits = torch.randn(5, 6, dtype=torch.float64)
    exit_layer, chosen = torch.tensor([3, 5, 6, 6, 5]), torch.tensor([True, True, True, False, True])
    # min layer 1, every 2: decisions at layers 1, 3, 5 (and the forced exit at L = 6)
    full = trajectory_log_prob(logits, exit_layer, chosen)
    between = torch.where(
        torch.tensor([False, True, False, True, False, False])[None, :]
        & (torch.arange(1, 7)[None, :] < exit_layer[:, None]),
        F.logsigmoid(-logits),
        torch.zeros((), dtype=torch.float64),
    ).sum(1)
    np.testing.assert_allclose(
        trajectory_log_prob(logits, exit_layer, chosen, 1, 2).numpy(), (full - between).numpy()
    )


def test_group_baseline_is_the_mean_over_the_replicas_of_each_input():
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0, -4.0, 0.0])
    np.testing.assert_allclose(group_baseline(rewards, 2).numpy(), [2, 2, 15, 15, -2, -2])
    np.testing.assert_allclose(group_baseline(rewards, 3).numpy(), [14 / 3] * 3 + [16 / 3] * 3, rtol=1e-6)
    advantage = (rewards - group_baseline(rewards, 2)).view(3, 2)
    np.testing.assert_allclose(advantage.sum(1).numpy(), 0.0)


# -- acting, persistence, registry -------------------------------------------------------------------
def test_input_at_the_last_layer_exits_whatever_the_network_says(tables):
    env = train_env(tables[0])
    policy = Reinforce()
    policy.bind(env)
    with torch.no_grad():
        for head in policy.net.layers:
            head[-1].bias.fill_(-100.0)  # p_l ~ 0: always CONTINUE
    obs = np.zeros((NUM_LAYERS, STATE_SIZE + NUM_LAYERS), dtype=np.float32)
    obs[:, STATE_SIZE:] = np.eye(NUM_LAYERS)
    np.testing.assert_array_equal(policy.act(obs), [0] * (NUM_LAYERS - 1) + [1])
    np.testing.assert_array_equal(policy.act(obs, deterministic=False), [0] * (NUM_LAYERS - 1) + [1])


def assert_same_decisions(loaded, trained, dev: ExitTable) -> None:
    """A reloaded per-layer network policy decides as the trained one on every (input, layer) of dev."""
    assert loaded.get_params()["state_size"] == STATE_SIZE and loaded.history == trained.history
    obs = dev.derived["state+layer"]  # every (input, layer) observation of the dev table
    np.testing.assert_array_equal(loaded.exit_probs(obs)[0], trained.exit_probs(obs)[0])
    np.testing.assert_array_equal(loaded.act(obs), trained.act(obs))
    assert 0 < trained.act(obs).mean() < 1
    np.testing.assert_array_equal(evaluate(loaded, dev).exit_layers, evaluate(trained, dev).exit_layers)


def test_save_load_round_trip_gives_identical_actions(tables, trained, tmp_path):
    dev = tables[1]
    trained.save(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert isinstance(loaded, Reinforce)
    assert loaded.get_params() == trained.get_params()
    assert_same_decisions(loaded, trained, dev)


def test_confidence_policy_round_trips_and_refuses_other_modes(tmp_path):
    table = confidence_only_table(n=40)
    policy = agents.make("reinforce", obs_mode="state+confidence")
    policy.learn(train_env(table, obs_mode="state+confidence"), epochs=1, progress=False)
    policy.save(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert loaded.obs_mode == "state+confidence" and loaded.get_params() == policy.get_params()
    obs = ConsistentEEVectorEnv(40, table=table, obs_mode="state+confidence").reset(seed=0)[0]
    np.testing.assert_array_equal(loaded.exit_probs(obs)[0], policy.exit_probs(obs)[0])
    with pytest.raises(ValueError, match="obs_mode='state\\+confidence'"):
        loaded.bind(train_env(table))  # a state+layer env
    with pytest.raises(ValueError, match="obs_mode"):
        Reinforce(obs_mode="stats")


def test_make_with_no_arguments(tables):
    policy = agents.make("reinforce")
    assert isinstance(policy, Reinforce) and policy.learns and policy.obs_mode == "state+layer"
    assert policy.get_params()["rollout"] == "sample" and policy.get_params()["hidden_size"] == 32
    with pytest.raises(RuntimeError, match="no network"):
        policy.act(np.zeros((1, STATE_SIZE + NUM_LAYERS), dtype=np.float32))
    env = train_env(tables[0])
    policy.bind(env)
    obs, _ = ConsistentEEVectorEnv(4, table=tables[0]).reset(seed=0)
    actions = policy.act(obs)
    assert actions.shape == (4,) and actions.dtype == np.int64 and set(actions) <= {0, 1}
    with pytest.raises(ValueError, match="rollout"):
        agents.make("reinforce", rollout="greedy")


def test_the_numpy_path_of_acting_is_the_networks_forward():
    """Acting on a batch at one layer goes through numpy (no torch dispatch per tiny op): the same
    logits as the torch forward, to float32 rounding."""
    from agents.reinforce import PerLayerPolicy

    torch.manual_seed(0)
    net = PerLayerPolicy(16, 4, 8)
    states = torch.randn(5, 16)
    for layer in range(1, 5):
        torch_logits = net(states, torch.full((5,), layer)).detach().numpy()
        np.testing.assert_allclose(net.numpy_logits(states.numpy(), layer), torch_logits, atol=1e-6)
    with torch.no_grad():  # an update in place shows through (the arrays are views of the parameters)
        net.layers[2][2].bias.add_(1.0)
    np.testing.assert_allclose(
        net.numpy_logits(states.numpy(), 3), net(states, torch.full((5,), 3)).detach().numpy(), atol=1e-6
    )
    # the kept views follow a loaded, a replaced (assign=True) and a copied network's parameters
    import copy

    other = PerLayerPolicy(16, 4, 8)
    for assign in (False, True):
        net.load_state_dict({k: v.clone() + 0.5 for k, v in other.state_dict().items()}, assign=assign)
        np.testing.assert_allclose(
            net.numpy_logits(states.numpy(), 3), net(states, torch.full((5,), 3)).detach().numpy(), atol=1e-6
        )
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.layers[2][2].bias.add_(1.0)
    np.testing.assert_allclose(
        twin.numpy_logits(states.numpy(), 3), twin(states, torch.full((5,), 3)).detach().numpy(), atol=1e-6
    )


def test_balanced_loss_weights_by_hand():
    table = easy_layer_table(n=4)
    table.labels[:] = [0, 0, 0, 1]
    w = table.target.balanced_weights(table.labels, 2)
    np.testing.assert_allclose(w, [4 / 6, 4 / 6, 4 / 6, 2.0])  # N / (K n_y): each class weighs 2 in all
    weighted = table.with_loss_weights(w)
    np.testing.assert_allclose(weighted.cross_entropy, table.cross_entropy * w[:, None])
    assert weighted.states is table.states and weighted.derived is table.derived
    with pytest.raises(ValueError, match="one weight per input"):
        table.with_loss_weights(w[:3])


def test_balanced_reinforce_pays_the_weighted_loss(tables, monkeypatch):
    table = tables[0]
    seen = []
    original = Reinforce._training_env
    monkeypatch.setattr(
        Reinforce, "_training_env", lambda self, env, t, n: seen.append(t) or original(self, env, t, n)
    )
    Reinforce(seed=0).learn(train_env(table), epochs=1, progress=False, loss_weights="balanced")
    w = table.target.balanced_weights(table.labels, 2)
    assert not np.allclose(w, 1.0)  # the fixture's classes are not exactly even
    np.testing.assert_allclose(seen[0].cross_entropy, table.cross_entropy * w[:, None])
    seen.clear()
    Reinforce(seed=0).learn(train_env(table), epochs=1, progress=False)
    assert seen[0] is table  # unweighted by default


def test_loss_weights_are_checked_and_refused_where_not_read(tables):
    from ee_gym.policy import TrainingBudget
    from ee_gym.validation import ConfigError

    with pytest.raises(ConfigError, match="loss_weights"):
        TrainingBudget(loss_weights="inverse")
    ppo = agents.make_policy("ppo", seed=0)
    with pytest.raises(ConfigError, match="REINFORCE's"):
        ppo.learn(train_env(tables[0]), total_timesteps=64, loss_weights="balanced")
