"""The SB3 bridge over the native vector env, on a synthetic table (no model, runs in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.vec_env import VecMonitor

from ee_gym.envs import (
    CONTINUE,
    EXIT,
    ConsistentEEEnv,
    ConsistentEEVectorEnv,
    ExitTable,
    SB3VecEnv,
    StatsView,
    make_sb3_vec_env,
)
from ee_gym.rewards import default_alpha, hardness

N, L, D, K = 64, 4, 8, 2
NUM_ENVS = 8


@pytest.fixture(scope="module")
def table() -> ExitTable:
    """Heads are wrong below each input's memorized layer m and right from m on."""
    rng = np.random.default_rng(0)
    labels = rng.integers(K, size=N)
    memorized = rng.integers(1, L + 1, size=N)
    logits = rng.normal(0.0, 0.3, size=(N, L, K)).astype(np.float32)
    right = np.arange(1, L + 1)[None, :] >= memorized[:, None]  # [N, L]
    target = np.where(right, labels[:, None], 1 - labels[:, None])
    np.put_along_axis(logits, target[..., None], 2.0, axis=-1)
    states = rng.uniform(-1.0, 1.0, size=(N, L, D)).astype(np.float32)
    return ExitTable(states=states, logits=logits, labels=labels, memorized=memorized, task="rte")


def bridge(table, obs_mode="state+layer", num_envs=NUM_ENVS, **kwargs) -> SB3VecEnv:
    return SB3VecEnv(ConsistentEEVectorEnv(num_envs, table=table, obs_mode=obs_mode, **kwargs))


def exit_observation(table, obs_mode, index, exit_layer):
    """The single env's observation at ``exit_layer`` of input ``index``."""
    env = ConsistentEEEnv(table=table, obs_mode=obs_mode)
    obs, _ = env.reset(options={"index": index})
    for _ in range(exit_layer - 1):
        obs, *_ = env.step(CONTINUE)
    return obs


def rollout(venv, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        actions = (rng.random(venv.num_envs) < 0.3).astype(np.int64)
        yield actions, *venv.step(actions)


@pytest.mark.parametrize("obs_mode", ["state+layer", "state+confidence", "full"])
def test_vecenv_contract_and_terminal_observation(table, obs_mode):
    venv = bridge(table, obs_mode)
    venv.seed(0)
    assert venv.num_envs == NUM_ENVS
    assert venv.observation_space == ConsistentEEEnv(table=table, obs_mode=obs_mode).observation_space
    assert venv.action_space.n == 2
    obs = venv.reset()
    assert venv.observation_space.contains(
        obs[0] if obs_mode != "full" else {key: value[0] for key, value in obs.items()}
    )
    lengths = np.zeros(NUM_ENVS, dtype=np.int64)
    alpha = default_alpha("rte", L)
    checked = 0
    for actions, obs, rewards, dones, infos in rollout(venv, 40):
        assert rewards.shape == (NUM_ENVS,) and rewards.dtype == np.float32
        assert dones.shape == (NUM_ENVS,) and dones.dtype == bool
        assert isinstance(infos, list) and len(infos) == NUM_ENVS
        lengths += 1
        for i in range(NUM_ENVS):
            info = infos[i]
            if not dones[i]:
                assert info == {} and rewards[i] == 0.0
                continue
            layer = info["exit_layer"]
            assert layer == lengths[i] and (actions[i] == EXIT or layer == L)
            assert info["episode"]["l"] == layer
            assert info["episode"]["r"] == pytest.approx(rewards[i], abs=1e-6)
            assert info["TimeLimit.truncated"] is False
            index = info["index"]
            assert info["label"] == table.labels[index]
            assert info["prediction"] == table.predictions[index, layer - 1]
            assert info["cross_entropy"] == pytest.approx(table.cross_entropy[index, layer - 1])
            assert info["memorized_layer"] == table.memorized[index]
            assert info["correct"] == (layer >= table.memorized[index])  # how the table was built
            expected = hardness(
                table.cross_entropy[index, layer - 1], None, layer, table.memorized[index], L, alpha
            )
            assert rewards[i] == pytest.approx(expected, abs=1e-5)
            single = exit_observation(table, obs_mode, index, layer)
            terminal = info["terminal_observation"]
            if obs_mode == "full":
                assert set(terminal) == {"state", "stats"}
                for key in terminal:
                    np.testing.assert_allclose(terminal[key], single[key], atol=1e-6)
                next_layer = StatsView(obs["stats"][i], L, K).layer_number
            else:
                np.testing.assert_allclose(terminal, single, atol=1e-6)
                next_layer = obs[i][-L:].argmax() + 1  # the one-hot ends the flat modes
            assert next_layer == 1  # the returned observation is layer 1 of the next input
            lengths[i] = 0
            checked += 1
    assert checked > 20


def test_seeding_follows_sb3(table):
    def trace(seed):
        venv = bridge(table)
        venv.seed(seed)
        first = venv.reset()
        return [first] + [step[1] for step in rollout(venv, 10)]

    same, again, other = trace(3), trace(3), trace(4)
    assert all(np.array_equal(a, b) for a, b in zip(same, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(same, other, strict=True))


def test_options_choose_inputs(table):
    venv = bridge(table, obs_mode="state")
    venv.set_options([{"index": i} for i in range(NUM_ENVS)])
    obs = venv.reset()
    np.testing.assert_array_equal(obs, table.states[:NUM_ENVS, 0])
    venv.set_options([{"index": 0}] + [{}] * (NUM_ENVS - 1))
    with pytest.raises(ValueError, match="every sub-env"):
        venv.reset()


def test_attributes_methods_and_construction(table):
    venv = bridge(table)
    assert venv.get_attr("num_layers") == [L] * NUM_ENVS
    assert venv.get_attr("alpha", indices=[1, 2]) == [venv.env.alpha] * 2
    assert venv.has_attr("table") and not venv.has_attr("no_such_attribute")
    venv.set_attr("alpha", 0.5)
    assert venv.env.alpha == 0.5
    with pytest.raises(ValueError, match="all of them"):
        venv.set_attr("alpha", 0.1, indices=[0])
    assert venv.env_method("_draw", 3, indices=[0, 1])[0].shape == (3,)
    assert venv.env_is_wrapped(VecMonitor) == [False] * NUM_ENVS
    assert venv.render() is None and venv.render_mode is None
    venv.close()

    by_id = make_sb3_vec_env("ConsistentEE-RTE-v0", 4, table=table, obs_mode="stats")
    assert by_id.num_envs == 4 and isinstance(by_id.env, ConsistentEEVectorEnv)
    assert by_id.reset().shape == by_id.env.observation_space.shape
    assert make_sb3_vec_env(table, 3).num_envs == 3
    prebuilt = ConsistentEEVectorEnv(5, table=table)
    assert make_sb3_vec_env(prebuilt).env is prebuilt
    with pytest.raises(ValueError, match="copy=True"):
        make_sb3_vec_env(table, 2, copy=False)
    with pytest.raises(ValueError, match="prebuilt"):
        make_sb3_vec_env(prebuilt, 6)


def test_no_final_obs_still_reports_episodes(table):
    venv = bridge(table, final_obs=False)
    venv.reset()
    done_infos = [
        info for *_, dones, infos in rollout(venv, 10) for info, d in zip(infos, dones, strict=True) if d
    ]
    assert done_infos and all("terminal_observation" not in i and "episode" in i for i in done_infos)


def test_vecmonitor_agrees(table):
    """Wrapping in VecMonitor (not needed) gives the same episode stats as the bridge's own."""
    inner = bridge(table)
    venv = VecMonitor(inner)
    venv.reset()
    for *_, dones, infos in rollout(venv, 20):
        for info, done in zip(infos, dones, strict=True):
            if done:
                assert info["episode"]["l"] == info["exit_layer"]


@pytest.mark.parametrize(
    "algo, kwargs",
    [
        (PPO, {"n_steps": 16, "batch_size": 64, "n_epochs": 2}),
        (A2C, {"n_steps": 8}),
        (DQN, {"learning_starts": 64, "buffer_size": 1000, "train_freq": 4, "target_update_interval": 64}),
    ],
    ids=["ppo", "a2c", "dqn"],
)
def test_sb3_algorithms_learn_box(table, algo, kwargs):
    venv = bridge(table)
    model = algo("MlpPolicy", venv, gamma=1.0, seed=0, device="cpu", **kwargs)
    model.learn(total_timesteps=512)
    assert model.num_timesteps >= 512
    lengths = [ep["l"] for ep in model.ep_info_buffer]
    assert lengths and all(1 <= length <= L for length in lengths)
    action, _ = model.predict(venv.reset(), deterministic=True)
    assert action.shape == (NUM_ENVS,)


def test_ppo_multi_input_on_dict_observations(table):
    venv = bridge(table, obs_mode="full")
    model = PPO(
        "MultiInputPolicy", venv, n_steps=16, batch_size=64, n_epochs=2, gamma=1.0, seed=0, device="cpu"
    )
    model.learn(total_timesteps=512)
    assert len(model.ep_info_buffer) > 0
