"""The SB3 exit policies (agents.sb3) on a synthetic table whose best policy is known (seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

import agents
from agents.base import load_policy
from agents.evaluate import evaluate
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.rewards import plain

N, L, D, K = 400, 6, 16, 2
NAMES = ["ppo", "a2c", "dqn", "qrdqn", "maskable-ppo"]
CONTRIB = {"qrdqn", "maskable-ppo"}
#: a few updates each (DQNs start updating after 200 steps here)
SHORT = {"total_timesteps": 1_024, "learning_starts": 200}


@pytest.fixture(scope="module")
def table() -> ExitTable:
    """Input i has an easy layer e_i (uniform on 1..L): head l is right and confident iff l >= e_i,
    wrong and unsure before; s_l says whether l >= e_i (four dims at +-0.5, small noise elsewhere);
    memorized = e. Best static exit: layer L (accuracy 1); best policy: exit at e (mean ~3.5)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(K, size=N)
    easy = rng.integers(1, L + 1, size=N)
    right = np.arange(1, L + 1)[None, :] >= easy[:, None]  # [N, L]
    target = np.where(right, labels[:, None], 1 - labels[:, None])
    logits = np.zeros((N, L, K), np.float32)
    np.put_along_axis(logits, target[..., None], np.where(right, 4.0, 0.5)[..., None], axis=-1)
    states = rng.normal(0.0, 0.05, size=(N, L, D)).astype(np.float32)
    states[..., :4] += np.where(right, 0.5, -0.5)[..., None]
    return ExitTable(states=states, logits=logits, labels=labels, memorized=easy, task="synthetic")


def make(name: str, **kwargs):
    if name in CONTRIB:
        pytest.importorskip("sb3_contrib")
    if name in ("a2c", "ppo", "maskable-ppo"):
        kwargs.pop("learning_starts", None)
    return agents.make(name, **kwargs)


def beats_best_static(policy, table: ExitTable) -> tuple[bool, str]:
    """As accurate as the best static layer (within 0.02) and at least one layer earlier on average."""
    accuracy = table.correct.mean(0)
    best_layer = int(accuracy.argmax()) + 1
    result = evaluate(policy, table)
    ok = result.score >= accuracy.max() - 0.02 and result.mean_exit_layer <= best_layer - 1
    return (
        ok,
        f"{result.score:.3f} at {result.mean_exit_layer:.2f} vs static {accuracy.max():.3f} at {best_layer}",
    )


def test_ppo_beats_the_best_static_layer(table):
    policy = make("ppo", total_timesteps=4_096).learn(ConsistentEEVectorEnv(1, table=table))
    ok, message = beats_best_static(policy, table)
    assert ok, message
    assert evaluate(policy, table).mean_exit_layer < table.memorized.mean() + 0.5  # near the oracle


def test_an_untrained_ppo_does_not(table):
    """The check above can fail: the same PPO, learning nothing, misses it."""
    policy = make("ppo", total_timesteps=512, learning_rate=0.0).learn(ConsistentEEVectorEnv(1, table=table))
    assert not beats_best_static(policy, table)[0]


@pytest.mark.parametrize("name", NAMES)
def test_learn_act_save_load(name, table, tmp_path):
    policy = make(name, **SHORT)
    env = ConsistentEEVectorEnv(3, table=table, reward="plain", alpha=0.05)
    assert policy.learn(env, seed=1) is policy
    trained_on = policy.model.get_env().env
    assert trained_on.num_envs == policy.num_envs != 3  # rebuilt with the algorithm's num_envs
    assert (trained_on.table, trained_on.reward_fn, trained_on.alpha) == (table, plain, 0.05)

    obs, _ = ConsistentEEVectorEnv(50, table=table).reset(seed=0)
    actions = policy.act(obs)
    assert actions.dtype == np.int64 and actions.shape == (50,) and set(actions.tolist()) <= {0, 1}
    assert policy.act(obs, deterministic=False).shape == (50,)

    loaded = load_policy(policy.save(tmp_path / name))
    assert type(loaded) is type(policy) and loaded.get_params() == policy.get_params()
    np.testing.assert_array_equal(loaded.act(obs), actions)


def test_learn_uses_a_fitting_env_as_is(table):
    env = ConsistentEEVectorEnv(64, table=table)
    policy = make("a2c", total_timesteps=512).learn(env)
    assert policy.model.get_env().env is env


@pytest.mark.parametrize("name", NAMES)
def test_make_with_no_arguments(name):
    policy = make(name)
    assert policy.name == name and policy.learns and policy.obs_mode == "state+layer"
    params = policy.get_params()
    assert params["total_timesteps"] > 0 and "seed" in params
    json.dumps(params)  # saved in policy.json
    with pytest.raises(RuntimeError, match="learn"):
        policy.act(np.zeros((1, D + L), np.float32))


def test_maskable_ppo_never_continues_at_the_last_layer(table):
    pytest.importorskip("sb3_contrib")
    from agents.sb3 import MaskableSB3VecEnv

    venv = MaskableSB3VecEnv(ConsistentEEVectorEnv(4, table=table))
    venv.reset()
    venv.env.layer[:] = [1, 3, L, L]
    np.testing.assert_array_equal(venv.action_masks(), [[1, 1], [1, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(np.stack(venv.env_method("action_masks", indices=[2, 0])), [[0, 1], [1, 1]])

    # Hard inputs at layer 1, relabelled as layer L: the policy wants to CONTINUE, the mask says EXIT.
    policy = make("maskable-ppo", total_timesteps=1_024).learn(ConsistentEEVectorEnv(1, table=table))
    obs, _ = ConsistentEEVectorEnv(N, table=table).reset(options={"index": np.arange(N)})
    obs[:, D:] = 0.0
    obs[:, -1] = 1.0
    assert (policy.model.predict(obs, deterministic=True)[0] == 0).mean() > 0.5  # unmasked
    assert (policy.act(obs) == 1).all() and (policy.act(obs, deterministic=False) == 1).all()


def test_contrib_policies_say_how_to_install_sb3_contrib(monkeypatch):
    """Without sb3-contrib, PPO/A2C/DQN still work and the contrib policies name the package."""
    monkeypatch.setitem(sys.modules, "sb3_contrib", None)  # `import sb3_contrib` now fails
    spec = importlib.util.spec_from_file_location("sb3_copy", importlib.util.find_spec("agents.sb3").origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PPOPolicy().name == "ppo" and module.DQNPolicy().name == "dqn"
    for name in ("QRDQNPolicy", "MaskablePPOPolicy"):
        with pytest.raises(ImportError, match="pip install sb3-contrib"):
            getattr(module, name)


def test_maskable_ppo_reads_the_confidence_observation():
    """On a table where only the heads' confidence tells the easy layer (the states are noise),
    Maskable PPO in ``state+confidence`` beats the best static layer, masking at the last layer by
    the one-hot that ends the observation."""
    pytest.importorskip("sb3_contrib")
    from tests.test_reinforce import beats_best_static_layer, confidence_only_table

    train, dev = confidence_only_table(n=200), confidence_only_table(n=200, seed=1, split="dev")
    policy = make("maskable-ppo", obs_mode="state+confidence", total_timesteps=2_048, seed=0)
    policy.learn(ConsistentEEVectorEnv(1, table=train, obs_mode="state+confidence"))
    ok, why = beats_best_static_layer(evaluate(policy, dev), dev)
    assert ok, why


def test_learning_leaves_no_logger_folder_behind(table, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(
        tempfile, "tempdir", str(tmp_path)
    )  # where SB3's default logger would make SB3-<date>
    policy = agents.make("a2c", total_timesteps=128)
    policy.learn(
        ConsistentEEVectorEnv(64, table=table, split=table.split, obs_mode=policy.obs_mode), progress=False
    )
    assert not list(tmp_path.glob("SB3-*"))


def test_settings_given_stay_as_given_after_learning(table):
    given = {"net_arch": [16, 16]}
    policy = agents.make("a2c", total_timesteps=128, policy_kwargs=given)
    policy.learn(
        ConsistentEEVectorEnv(64, table=table, split=table.split, obs_mode=policy.obs_mode), progress=False
    )
    assert given == {"net_arch": [16, 16]}  # SB3's A2C adds its optimizer class to the dict it is given
    assert json.loads(json.dumps(policy.get_params()))["policy_kwargs"] == {"net_arch": [16, 16]}
