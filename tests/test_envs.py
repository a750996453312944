"""The ConsistentEE environments: API checks for every registered id, rewards, live vs cached, vector env.

Every task id runs on a tiny random multi-exit model and a tiny GLUE-layout data folder written for
it, every generation id (``ConsistentEE-XSum-v0``) on a tiny random Llama decoder and a tiny
XSum-layout file (session fixtures, built once), so the whole file runs in seconds. Section 1 runs every
registered id, of both kinds, through the checkers, seeded rollouts and pickling; what is particular to
the token env (its table, live decoding) is in tests/test_generation_env.py.
"""

from __future__ import annotations

import math
import pickle
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from ee_gym import rewards, tasks
from ee_gym.envs import (
    CONTINUE,
    EXIT,
    OBS_MODES,
    ConsistentEEEnv,
    ConsistentEEVectorEnv,
    EpisodeOverError,
    ExitTable,
    StatsView,
    env_id,
    registered_ids,
)
from ee_gym.generation import MultiExitDecoder
from ee_gym.generation.table import GENERATION_OBS_MODES
from ee_gym.multiexit import MultiExitModel
from ee_gym.observations import get_obs_mode
from ee_gym.tasks import TaskSpec, get_task, task_from_files
from tests.conftest import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    tiny_bert_config,
    tiny_llama_decoder,
    write_tiny_xsum,
)

TASK_IDS = registered_ids("classification")  # one input per episode
GENERATION_IDS = registered_ids("generation")  # one generated token per episode
ALL_IDS = TASK_IDS + GENERATION_IDS
#: every registered id with each observation mode it serves (a token table holds no logits)
ID_OBS_MODES = [
    (name, obs_mode)
    for name in ALL_IDS
    for obs_mode in (GENERATION_OBS_MODES if name in GENERATION_IDS else OBS_MODES)
    # a regression task's heads have no softmax: the modes reading its top-2 gap refuse them
    if not (
        name in registered_ids("classification")
        and get_task(gym.spec(name).kwargs["task"]).is_regression
        and get_obs_mode(obs_mode).confidence_signal == "top2_gap"
    )
]
N_TRAIN, N_DEV = 24, 12
MNLI = "ConsistentEE-MNLI-v0"  # three labels: catches code that assumes two

#: Warnings the env checkers may raise without failing the test, as (message regex, reason).
#: Empty: gymnasium's and SB3's checkers pass on every id and observation mode with no warning.
ALLOWED_WARNINGS: tuple[tuple[str, str], ...] = ()


# --------------------------------------------------------------------------- data and models


def spec_of(env_name: str) -> TaskSpec:
    return get_task(gym.spec(env_name).kwargs["task"])


def _sentence(rng: random.Random) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE + NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_task_data(spec: TaskSpec, root: Path) -> Path:
    """Tiny train and dev files for a built-in task, in the layout its ``local_format`` reads."""
    fmt = spec.local_format
    folder = root / "glue" / spec.glue_dir
    folder.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("dev", N_DEV)):
        rng = random.Random(f"{spec.name}-{split}")
        records = []
        for i in range(n):
            label = i % spec.num_labels
            value = spec.labels[label] if fmt.label_kind == "name" else str(label)
            if spec.is_regression:  # a score that varies: 0.0, 0.5, ..., 5.0
                value = f"{(i % 11) / 2:.1f}"
            records.append(
                dict(zip(fmt.text_columns, [_sentence(rng) for _ in fmt.text_columns], strict=True))
            )
            records[-1][fmt.label_column] = value
        if fmt.header:  # an extra leading id column, as GLUE files have
            columns = ["id", *fmt.text_columns, fmt.label_column]
            lines = ["\t".join(columns)] + [
                "\t".join([str(i)] + [r[c] for c in columns[1:]]) for i, r in enumerate(records)
            ]
        else:  # CoLA: no header, fields addressed by position
            width = max(*fmt.text_columns, fmt.label_column) + 1
            lines = ["\t".join(r.get(j, "src") for j in range(width)) for r in records]
        (folder / spec.split_files[split]).write_text("\n".join(lines) + "\n")
    return root


def tiny_model(num_labels: int, tokenizer, seed: int = 0) -> MultiExitModel:
    torch.manual_seed(seed)
    return MultiExitModel.from_backbone(tiny_bert_config(), num_labels=num_labels, tokenizer=tokenizer).eval()


@dataclass
class Assets:
    """A task's saved tiny model, data folder and cache root."""

    model: Path
    data: Path | None
    cache: Path

    def kwargs(self, split: str = "train", **extra) -> dict:
        cache_dir = self.cache / f"{split}-{extra.get('max_inputs')}"
        return dict(
            model=str(self.model),
            split=split,
            data_dir=self.data,
            cache_dir=cache_dir,
            progress=False,
            **extra,
        )


@dataclass
class TokenAssets:
    """A generation id's tiny decoder (passed as an object: its table is built on first use), XSum
    folder and table folder."""

    decoder: MultiExitDecoder
    data: Path
    cache: Path

    def kwargs(self, split: str = "train", **extra) -> dict:
        return dict(
            decoder=self.decoder,
            split=split,
            data_dir=self.data,
            cache_dir=self.cache,
            max_prompts=None,
            max_new_tokens=8,
            progress=False,
            **extra,
        )


@pytest.fixture(scope="session")
def assets(tmp_path_factory, tokenizer) -> dict[str, Assets | TokenAssets]:
    """One tiny model and data folder per registered id."""
    out: dict[str, Assets | TokenAssets] = {}
    for name in GENERATION_IDS:  # rows 200-205 of the file are the XSum train split
        root = tmp_path_factory.mktemp(name)
        out[name] = TokenAssets(
            tiny_llama_decoder(), write_tiny_xsum(root / "data", rows=206), root / "cache"
        )
    for name in TASK_IDS:
        spec = spec_of(name)
        root = tmp_path_factory.mktemp(name)
        if spec.glue_dir is not None:
            data = write_task_data(spec, root / "data")
        elif spec.local_format is not None:  # a user task made from files at import: reads them
            data = None
        else:
            continue  # a hub-only task: nothing offline to run it on
        model = tiny_model(spec.num_labels, tokenizer).save_pretrained(root / "model")
        out[name] = Assets(model, data, root / "cache")
    return out


def make(assets, name: str, split: str = "train", **kwargs) -> gym.Env:
    if name not in assets:
        pytest.skip(f"{name} has no offline data")
    return gym.make(name, **assets[name].kwargs(split, **kwargs))


def make_vec(assets, name: str, num_envs: int, split: str = "train", **kwargs) -> ConsistentEEVectorEnv:
    return gym.make_vec(name, num_envs=num_envs, **assets[name].kwargs(split, **kwargs))


# --------------------------------------------------------------------------- rollouts and comparisons


def run_episode(env, plan, index: int | None = None, seed: int | None = None):
    """Reset (at ``index`` if given) and take ``plan``'s actions until the episode ends.

    Returns (observations, rewards, infos); the plan must be long enough to end the episode.
    """
    obs, info = env.reset(seed=seed, options=None if index is None else {"index": index})
    observations, rewards_, infos = [obs], [], [info]
    for action in plan:
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        rewards_.append(reward)
        infos.append(info)
        assert not truncated
        if terminated:
            return observations, rewards_, infos
    raise AssertionError(f"plan {plan} did not end the episode")


def random_rollout(env, seed: int, episodes: int, action_seed: int = 0) -> list:
    """Everything ``episodes`` seeded episodes return, driven by a seeded random action sequence."""
    rng = np.random.default_rng(action_seed)
    trace = [env.reset(seed=seed)]
    for episode in range(episodes):
        terminated = False
        while not terminated:
            step = env.step(int(rng.integers(2)))
            trace.append(step)
            terminated = step[2]
        if episode + 1 < episodes:
            trace.append(env.reset())
    return trace


def assert_same(a, b, atol: float = 0.0, where: str = "") -> None:
    """Recursive equality of observations, infos and rollouts (floats within ``atol``)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], atol, f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, (float, np.floating, np.ndarray)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def exit_plan(exit_layer: int, num_layers: int) -> list[int]:
    """CONTINUE until ``exit_layer``, then EXIT (at L: CONTINUE, which exits anyway)."""
    last = EXIT if exit_layer < num_layers else CONTINUE
    return [CONTINUE] * (exit_layer - 1) + [last]


def checked(check, env) -> None:
    """Run an env checker with every warning an error, except the allow-list."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for pattern, _reason in ALLOWED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        check(env)


# --------------------------------------------------------------------------- a hand-made table

LOG3 = math.log(3.0)
ALPHA = 0.1
L_HAND = 4
# Input 0, label 0, m = 3: p(label) = 3/4, 1/4, 3/4, 1/2 at layers 1..4 (predictions 0, 1, 0, 0).
# Input 1, label 1, m = 1: p(label) = 3/4 at every layer.
HAND_LOGITS = [
    [[LOG3, 0.0], [0.0, LOG3], [LOG3, 0.0], [0.0, 0.0]],
    [[0.0, LOG3]] * 4,
]
HAND_ATOL = 1e-6  # the table holds float32 logits: log 3 is off by ~3e-8
CE = {1: math.log(4 / 3), 2: math.log(4.0), 4: math.log(2.0)}  # input 0, by exit layer


def hand_table() -> ExitTable:
    states = np.random.default_rng(0).uniform(-1, 1, (2, L_HAND, 3)).astype(np.float32)
    return ExitTable(states, np.array(HAND_LOGITS), np.array([0, 1]), np.array([3, 1]))


def hand_env(**kwargs) -> ConsistentEEEnv:
    return ConsistentEEEnv(table=hand_table(), alpha=ALPHA, **kwargs)


# (reward, input, exit layer, reward worked by hand with alpha = 0.1, L = 4)
HAND_REWARDS = [
    ("hardness", 0, 1, -math.log(4 / 3) - 0.1 * 1 * (1 - 3 / 4)),
    ("hardness", 0, 2, -math.log(4) - 0.1 * 2 * (1 - 3 / 4)),
    ("hardness", 0, 4, -math.log(2) - 0.1 * 4 * (1 - 3 / 4)),
    ("hardness", 1, 2, -math.log(4 / 3) - 0.1 * 2 * (1 - 1 / 4)),
    ("plain", 0, 1, -math.log(4 / 3) - 0.1),
    ("plain", 0, 2, -math.log(4) - 0.2),
    ("plain", 0, 4, -math.log(2) - 0.4),
    ("ce", 0, 1, -math.log(4 / 3)),
    ("ce", 0, 2, -math.log(4)),
    ("ce", 0, 4, -math.log(2)),
    ("accuracy", 0, 1, 1 - 0.1),
    ("accuracy", 0, 2, 0 - 0.2),
    ("accuracy", 0, 4, 1 - 0.4),
]


# =========================================================================== 1. every registered id


def test_every_builtin_task_is_registered():
    """The seven GLUE tasks have their ids, and the parametrised tests below run on them."""
    expected = {f"ConsistentEE-{t}-v0" for t in ("RTE", "MRPC", "SST2", "CoLA", "QNLI", "QQP", "MNLI")}
    assert expected <= set(TASK_IDS)
    assert gym.spec(MNLI).kwargs["task"] == "mnli" and spec_of(MNLI).num_labels == 3
    assert GENERATION_IDS == ["ConsistentEE-XSum-v0"]  # run by the tests of this section too


@pytest.mark.parametrize(("name", "obs_mode"), ID_OBS_MODES)
def test_env_checkers_pass_without_warnings(assets, name, obs_mode):
    """Gymnasium's and SB3's env checkers pass, warnings as errors (see ALLOWED_WARNINGS)."""
    env = make(assets, name, obs_mode=obs_mode)
    assert env.unwrapped.action_space == gym.spaces.Discrete(2)
    if name in TASK_IDS:  # a token env's items are the tokens its decoder generated: no fixed count
        assert env.unwrapped.num_inputs == N_TRAIN
    checked(gym_check_env, env.unwrapped)
    checked(sb3_check_env, env.unwrapped)


@pytest.mark.parametrize(("name", "obs_mode"), ID_OBS_MODES)
def test_observations_stay_inside_the_space(assets, name, obs_mode):
    """Every observation of every mode, at every layer, lies in the observation space."""
    env = make(assets, name, obs_mode=obs_mode)
    num_layers = env.unwrapped.num_layers
    for index in range(0, env.unwrapped.num_inputs, 5):
        observations, _, _ = run_episode(env, [CONTINUE] * num_layers, index=index)
        assert len(observations) == num_layers + 1
        for obs in observations:
            assert env.observation_space.contains(obs), (index, obs)


@pytest.mark.parametrize("name", ALL_IDS)
def test_same_seed_same_rollout_and_other_seeds_other_inputs(assets, name):
    """Equal seeds give equal rollouts (obs, rewards, infos); other seeds draw other inputs."""
    first = random_rollout(make(assets, name), seed=123, episodes=12)
    second = random_rollout(make(assets, name), seed=123, episodes=12)
    assert_same(first, second)
    other = random_rollout(make(assets, name), seed=124, episodes=12)

    def indices(trace):
        return [step[1]["index"] for step in trace if len(step) == 2]  # the resets' infos

    assert len(indices(first)) == 12
    assert indices(first) != indices(other)


@pytest.mark.parametrize("name", ALL_IDS)
def test_pickled_env_continues_identically(assets, name):
    """A pickled copy taken mid-episode continues exactly as the original (state and RNG)."""
    env = make(assets, name)
    env.reset(seed=7)
    env.step(CONTINUE)
    copy = pickle.loads(pickle.dumps(env))
    rng = np.random.default_rng(3)
    for _ in range(40):
        action = int(rng.integers(2))
        a, b = env.step(action), copy.step(action)
        assert_same(a, b)
        if a[2]:
            assert_same(env.reset(), copy.reset())


@pytest.mark.parametrize("name", ALL_IDS)
def test_invalid_actions_and_steps_out_of_episode_raise(assets, name):
    """Bad actions raise a clear ValueError and change nothing; stepping outside an episode raises."""
    env = make(assets, name)
    with pytest.raises(EpisodeOverError, match="reset"):
        env.unwrapped.step(CONTINUE)  # unwrapped: gym.make's OrderEnforcing would raise first
    env.reset(seed=0)
    for bad in (2, -1, 0.5, "x", None):
        with pytest.raises(ValueError, match=r"invalid action .*0 \(CONTINUE\) or 1 \(EXIT\)"):
            env.step(bad)
    _, _, terminated, _, info = env.step(CONTINUE)
    assert not terminated and info["layer"] == 2  # the bad actions did not move the episode
    _, _, terminated, _, _ = env.step(EXIT)
    assert terminated
    with pytest.raises(EpisodeOverError, match="ended"):
        env.step(CONTINUE)


@pytest.mark.parametrize("name", TASK_IDS)
def test_dev_split_walks_inputs_in_order(assets, name):
    """Without options, the dev split's episodes take inputs 0, 1, ..., N-1, 0, ..."""
    env = make(assets, name, split="dev")
    seen = [env.reset(seed=0)[1]["index"]] + [env.reset()[1]["index"] for _ in range(N_DEV + 1)]
    assert seen == [*range(N_DEV), 0, 1]
    env.reset()
    assert env.reset(seed=5)[1]["index"] == 0  # reset(seed=...) is reproducible: the walk restarts


# =========================================================================== 2. rewards


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hardness", [-0.5 - 0.1 * 3 * (1 - 2 / 4), -1.0 - 0.1 * 4 * (1 - 4 / 4)]),
        ("plain", [-0.5 - 0.3, -1.0 - 0.4]),
        ("ce", [-0.5, -1.0]),
        ("accuracy", [1 - 0.3, 0 - 0.4]),
    ],
)
def test_reward_functions_match_hand_worked_numbers(name, expected):
    """Each variant on (CE, correct, t, m) = (0.5, True, 3, 2) and (1.0, False, 4, 4), L = 4, alpha 0.1."""
    fn = rewards.get_reward(name)
    got = fn(np.array([0.5, 1.0]), np.array([True, False]), np.array([3, 4]), np.array([2, 4]), 4, 0.1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fn(0.5, True, 3, 2, 4, 0.1), expected[0], rtol=0, atol=1e-12)


def test_default_alpha_keeps_the_price_of_the_whole_network():
    """alpha = 0.035 for RTE at L = 12 (the authors' value), scaled by 12 / L."""
    assert rewards.default_alpha("rte", 12) == pytest.approx(0.035)
    assert rewards.default_alpha("rte", 4) == pytest.approx(0.105)


def test_unknown_reward_lists_the_valid_names():
    """An unknown reward name fails with every valid name in the message, in the env too."""
    with pytest.raises(ValueError, match="hardness, plain, ce, accuracy"):
        rewards.get_reward("speed")
    with pytest.raises(ValueError, match="unknown reward 'speed'.*hardness"):
        hand_env(reward="speed")


@pytest.mark.parametrize(("reward", "index", "exit_layer", "expected"), HAND_REWARDS)
def test_env_pays_hand_worked_reward_only_at_the_exit(reward, index, exit_layer, expected):
    """On a hand-made table, the env pays 0 before the exit and the hand-worked reward at it."""
    env = hand_env(reward=reward)
    _, paid, infos = run_episode(env, exit_plan(exit_layer, L_HAND), index=index)
    assert len(paid) == exit_layer
    assert paid[:-1] == [0.0] * (exit_layer - 1)
    assert [info["layer"] for info in infos[:-1]] == list(range(1, exit_layer + 1))
    assert paid[-1] == pytest.approx(expected, abs=HAND_ATOL)


@pytest.mark.parametrize("exit_layer", [1, 2, 4])
def test_episode_end_info_holds_the_exit(exit_layer):
    """The final info names the exit layer, prediction, label, correctness, m(x) and the CE."""
    _, _, infos = run_episode(hand_env(), exit_plan(exit_layer, L_HAND), index=0)
    prediction = {1: 0, 2: 1, 4: 0}[exit_layer]
    expected = {
        "index": 0,
        "exit_layer": exit_layer,
        "prediction": prediction,
        "label": 0,
        "correct": prediction == 0,
        "memorized_layer": 3,
        "cross_entropy": CE[exit_layer],
    }
    assert infos[-1].keys() == expected.keys()
    assert_same(infos[-1], expected, atol=HAND_ATOL)


@pytest.mark.parametrize("last_action", [CONTINUE, EXIT])
def test_input_exits_at_the_last_layer_whatever_the_action(last_action):
    """At layer L both actions end the episode there, with the same reward."""
    env = hand_env()
    _, paid, infos = run_episode(env, [CONTINUE] * (L_HAND - 1) + [last_action], index=0)
    assert infos[-1]["exit_layer"] == L_HAND
    assert paid[-1] == pytest.approx(-math.log(2) - 0.1 * 4 * (1 - 3 / 4), abs=HAND_ATOL)


@pytest.mark.parametrize(("reward", "index", "exit_layer", "expected"), HAND_REWARDS)
def test_vector_env_pays_the_same_hand_worked_rewards(reward, index, exit_layer, expected):
    """The vector env on the hand table pays the hand-worked reward at the exit step, 0 before."""
    venv = ConsistentEEVectorEnv(num_envs=2, table=hand_table(), reward=reward, alpha=ALPHA)
    venv.reset(options={"index": [index, index]})
    plan = exit_plan(exit_layer, L_HAND)
    for step, action in enumerate(plan):
        _, paid, terminated, _, info = venv.step(np.array([action, EXIT]))
        if step == 0:  # the second sub-env exits at layer 1 and starts over
            assert terminated[1] and info["final_info"]["exit_layer"][1] == 1
        assert terminated[0] == (step == len(plan) - 1)
        assert paid[0] == (pytest.approx(expected, abs=HAND_ATOL) if terminated[0] else 0.0)
    assert info["final_info"]["exit_layer"][0] == exit_layer
    hand_ce = CE[exit_layer] if index == 0 else math.log(4 / 3)
    assert info["final_info"]["cross_entropy"][0] == pytest.approx(hand_ce, abs=HAND_ATOL)


# =========================================================================== 3. live vs cached


@pytest.mark.parametrize(("name", "obs_mode"), [(n, m) for n, m in ID_OBS_MODES if n in TASK_IDS])
def test_live_and_cached_modes_agree(assets, name, obs_mode):
    """Same inputs and actions: live and cached give the same observations, rewards and infos."""
    live = make(assets, name, mode="live", obs_mode=obs_mode)
    cached = make(assets, name, obs_mode=obs_mode)
    num_layers = cached.unwrapped.num_layers
    plans = [exit_plan(t, num_layers) for t in (1, 2, num_layers)] + [[CONTINUE] * (num_layers - 1) + [EXIT]]
    for index in range(0, N_TRAIN, 4):
        for plan in plans:
            obs_live, paid_live, info_live = run_episode(live, plan, index=index)
            obs_cached, paid_cached, info_cached = run_episode(cached, plan, index=index)
            assert_same(obs_live, obs_cached, atol=2e-3, where=f"input {index} obs")
            np.testing.assert_allclose(paid_live, paid_cached, rtol=0, atol=1e-4)
            assert_same(info_live, info_cached, atol=1e-4, where=f"input {index} info")
            assert all(live.observation_space.contains(obs) for obs in obs_live)


def test_live_mode_refuses_a_table():
    """Live mode needs a model; a table alone is refused with a clear message."""
    with pytest.raises(ValueError, match="live mode runs a model"):
        ConsistentEEEnv(table=hand_table(), mode="live")


# =========================================================================== 4. the vector env


def test_make_vec_returns_the_native_same_step_vector_env(assets):
    """gym.make_vec gives ConsistentEEVectorEnv, autoresetting in the same step."""
    venv = make_vec(assets, MNLI, num_envs=3)
    assert isinstance(venv, ConsistentEEVectorEnv)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert venv.single_observation_space == make(assets, MNLI).observation_space


@pytest.mark.parametrize("obs_mode", OBS_MODES)
def test_vector_env_agrees_with_single_envs(assets, obs_mode):
    """Sub-env i and a single env on the same input and actions: same obs, rewards and final infos."""
    n = 5
    venv = make_vec(assets, MNLI, num_envs=n, obs_mode=obs_mode)
    singles = [make(assets, MNLI, obs_mode=obs_mode).unwrapped for _ in range(n)]
    obs, _ = venv.reset(seed=0)
    expected = [s.reset(options={"index": int(i)})[0] for s, i in zip(singles, venv.index, strict=True)]
    rng = np.random.default_rng(1)
    exits = 0
    for _ in range(40):
        for i in range(n):
            assert_same(_row(obs, i), expected[i], atol=1e-6, where=f"env {i} obs")
        actions = rng.integers(2, size=n)
        obs, paid, terminated, truncated, info = venv.step(actions)
        assert not truncated.any()
        for i, single in enumerate(singles):
            single_obs, reward, done, _, single_info = single.step(int(actions[i]))
            assert done == terminated[i] and reward == pytest.approx(paid[i], abs=1e-12)
            expected[i] = single_obs
            if done:
                exits += 1
                assert_same(_row(info["final_obs"], i), single_obs, atol=1e-6, where=f"env {i} final obs")
                final = {key: info["final_info"][key][i].item() for key in single_info}
                assert_same(final, single_info, atol=1e-9, where=f"env {i} final info")
                expected[i] = single.reset(options={"index": int(venv.index[i])})[0]
    assert exits > 20


def _row(obs, i):
    return {key: value[i] for key, value in obs.items()} if isinstance(obs, dict) else obs[i]


def test_vector_final_masks_equal_the_terminations(assets):
    """final_obs / final_info (and each final_info key) are masked by exactly the exits."""
    venv = make_vec(assets, "ConsistentEE-RTE-v0", num_envs=8)
    venv.reset(seed=2)
    rng = np.random.default_rng(0)
    for _ in range(10):
        _, _, terminated, _, info = venv.step(rng.integers(2, size=8))
        if not terminated.any():
            assert "final_info" not in info
            continue
        np.testing.assert_array_equal(info["_final_obs"], terminated)
        np.testing.assert_array_equal(info["_final_info"], terminated)
        for key in ("exit_layer", "prediction", "correct", "cross_entropy"):
            np.testing.assert_array_equal(info["final_info"]["_" + key], terminated)
        assert (info["final_info"]["exit_layer"][terminated] >= 1).all()
        assert (info["final_info"]["exit_layer"][~terminated] == 0).all()


def test_record_episode_statistics_on_the_vector_env(assets):
    """Gymnasium's RecordEpisodeStatistics reports the returns and lengths computed by hand."""
    n = 6
    venv = RecordEpisodeStatistics(make_vec(assets, "ConsistentEE-SST2-v0", num_envs=n))
    venv.reset(seed=1)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    rng = np.random.default_rng(5)
    finished = 0
    for _ in range(30):
        _, paid, terminated, _, info = venv.step(rng.integers(2, size=n))
        returns += paid
        lengths += 1
        if terminated.any():
            np.testing.assert_array_equal(info["_episode"], terminated)
            np.testing.assert_allclose(info["episode"]["r"][terminated], returns[terminated], atol=1e-12)
            np.testing.assert_array_equal(info["episode"]["l"][terminated], lengths[terminated])
            np.testing.assert_array_equal(lengths[terminated], info["final_info"]["exit_layer"][terminated])
            finished += int(terminated.sum())
            returns[terminated], lengths[terminated] = 0.0, 0
    assert finished > 20 and venv.episode_count == finished


def test_vector_env_with_4096_sub_envs(assets):
    """4096 sub-envs: nobody exits before L when all continue, all exit at L with the table's rewards."""
    n = 4096
    venv = make_vec(assets, "ConsistentEE-RTE-v0", num_envs=n, obs_mode="stats")
    obs, _ = venv.reset(seed=0)
    table, num_layers = venv.table, venv.num_layers
    assert obs.shape == (n, *venv.single_observation_space.shape)
    assert set(venv.index.tolist()) == set(range(N_TRAIN))  # 4096 seeded draws hit every input
    index = venv.index.copy()
    for layer in range(1, num_layers + 1):
        assert venv.observation_space.contains(obs)
        np.testing.assert_array_equal(StatsView(obs, num_layers, 2).layer_number, layer)
        obs, paid, terminated, _, info = venv.step(np.zeros(n, dtype=np.int64))
        if layer < num_layers:
            assert not terminated.any() and not paid.any()
    assert terminated.all()
    expected = rewards.hardness(
        table.cross_entropy[index, -1], None, num_layers, table.memorized[index], num_layers, venv.alpha
    )
    np.testing.assert_allclose(paid, expected, atol=1e-12)
    np.testing.assert_array_equal(info["final_info"]["index"], index)
    np.testing.assert_array_equal(StatsView(obs, num_layers, 2).layer_number, 1)  # the next inputs


@pytest.mark.parametrize(
    "actions",
    [[0.5, 0, 0], ["x", "x", "x"], [2, 0, 0], [-1, 0, 0], [None, 0, 0], [0, 1], [[0], [1], [0]], 1],
    ids=["half", "string", "two", "minus-one", "none", "too-few", "2d", "scalar"],
)
def test_vector_env_refuses_invalid_actions(assets, actions):
    """Non-binary actions and wrongly shaped action arrays raise ValueError."""
    venv = make_vec(assets, "ConsistentEE-RTE-v0", num_envs=3)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        venv.step(actions)
    venv.step(np.zeros(3, dtype=int))  # still usable


def test_vector_env_step_before_reset_raises(assets):
    """The vector env refuses to step before its first reset."""
    venv = make_vec(assets, "ConsistentEE-RTE-v0", num_envs=3)
    with pytest.raises(EpisodeOverError, match="reset"):
        venv.step(np.zeros(3, dtype=int))


def test_vector_env_seeding_is_deterministic(assets):
    """Equal seeds give equal vector rollouts; other seeds draw other inputs."""

    def rollout(seed):
        venv = make_vec(assets, MNLI, num_envs=16, obs_mode="full")
        trace = [venv.reset(seed=seed)[0], venv.index.copy()]
        rng = np.random.default_rng(0)
        for _ in range(15):
            trace.append(venv.step(rng.integers(2, size=16)))
        return trace

    first, second, other = rollout(11), rollout(11), rollout(12)
    assert_same(first, second)
    assert not np.array_equal(first[1], other[1])


def test_vector_env_walks_the_dev_split_in_order(assets):
    """On dev without options, sub-envs take inputs in order, new inputs in exit order, wrapping."""
    venv = make_vec(assets, "ConsistentEE-QNLI-v0", num_envs=5, split="dev")
    venv.reset()
    np.testing.assert_array_equal(venv.index, [0, 1, 2, 3, 4])
    _, _, _, _, info = venv.step(np.ones(5, dtype=int))
    np.testing.assert_array_equal(info["final_info"]["index"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(venv.index, [5, 6, 7, 8, 9])
    venv.step(np.array([1, 0, 1, 0, 1]))
    np.testing.assert_array_equal(venv.index, [10, 6, 11, 8, 0])


# =========================================================================== 5. rendering

LINE = re.compile(r"input\s+(\d+) layer\s+(\d+)/(\d+): predicts (\d+) \(p=([0-9.]+)\) -> (continue|EXIT)")


@pytest.mark.parametrize("plan", [[CONTINUE, CONTINUE, EXIT], [CONTINUE] * 4], ids=["exit-3", "forced"])
def test_ansi_render_has_one_line_per_step(assets, plan):
    """render() gives one line per step: input, layer, the head's prediction and confidence, action."""
    env = make(assets, MNLI, render_mode="ansi")
    table, num_layers = env.unwrapped.table, env.unwrapped.num_layers
    env.reset(options={"index": 5})
    assert env.render().strip() == ""
    run_episode(env, plan, index=5)
    lines = env.render().strip().splitlines()
    assert len(lines) == len(plan)
    for layer, line in enumerate(lines, start=1):
        match = LINE.fullmatch(line)
        assert match, line
        probs = table.probs[5, layer - 1]
        assert match.groups()[:4] == ("5", str(layer), str(num_layers), str(probs.argmax()))
        assert float(match[5]) == pytest.approx(probs.max(), abs=5e-4)
        assert match[6] == ("EXIT" if layer == len(plan) else "continue")
    checked(gym_check_env, env.unwrapped)


def test_render_modes_are_checked():
    """No render mode renders nothing; an unknown one is refused."""
    assert hand_env().render() is None
    with pytest.raises(ValueError, match="ansi"):
        hand_env(render_mode="human")


# =========================================================================== 6. the stats observation


def test_stats_view_decodes_hand_worked_values():
    """On the hand table: probs, layer one-hot, prediction and entropy histories by hand."""
    env = hand_env(obs_mode="stats")
    observations, _, _ = run_episode(env, [CONTINUE] * L_HAND, index=0)
    h34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)  # H(3/4, 1/4) / log 2
    probs = [[0.75, 0.25], [0.25, 0.75], [0.75, 0.25], [0.5, 0.5]]
    preds, entropies = [0, 1, 0, 0], [h34, h34, h34, 1.0]
    for layer, obs in enumerate(observations[:L_HAND], start=1):
        view = StatsView(obs, L_HAND, 2)
        np.testing.assert_allclose(view.probs, probs[layer - 1], atol=1e-6)
        np.testing.assert_array_equal(view.layer, np.eye(L_HAND)[layer - 1])
        assert view.layer_number == layer
        history = np.zeros((L_HAND, 2))
        history[np.arange(layer), preds[:layer]] = 1.0
        np.testing.assert_array_equal(view.pred_history, history)
        np.testing.assert_allclose(
            view.entropy_history, entropies[:layer] + [0.0] * (L_HAND - layer), atol=1e-6
        )


@pytest.mark.parametrize("name", TASK_IDS)
def test_stats_view_structure_on_every_task(assets, name):
    """probs sum to 1, the layer one-hot is the env's layer, histories filled to l and zero after."""
    env = make(assets, name, obs_mode="full")
    table, num_layers, k = env.unwrapped.table, env.unwrapped.num_layers, spec_of(name).num_labels
    for index in (0, 7):
        observations, _, infos = run_episode(env, [CONTINUE] * num_layers, index=index)
        for obs, info in zip(observations[:-1], infos[:-1], strict=True):
            view, layer = StatsView(obs["stats"], num_layers, k), info["layer"]
            assert view.layer_number == layer and view.layer.sum() == 1.0
            if k == 1:  # regression: the head's values in place of probabilities and one-hots
                values = table.logits[index, :layer, 0]
                assert view.probs[0] == pytest.approx(values[-1], abs=1e-6)
                np.testing.assert_allclose(view.pred_history[:layer, 0], values, atol=1e-6)
                assert not view.pred_history[layer:].any() and not view.entropy_history.any()
                continue
            assert view.probs.sum() == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_array_equal(
                view.pred_history[:layer].argmax(-1), table.predictions[index, :layer]
            )
            assert (view.pred_history[:layer].sum(-1) == 1).all() and not view.pred_history[layer:].any()
            assert (view.entropy_history[:layer] > 0).all() and not view.entropy_history[layer:].any()


# =========================================================================== 7. user tasks


def test_user_task_from_files_gets_its_own_env(tmp_path, tokenizer, monkeypatch, request):
    """task_from_files registers ConsistentEE-<Name>-v0, and gym.make / make_vec run on it."""
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the task stays in this test
    rng = random.Random(0)
    for split, n in (("train", 16), ("dev", 8)):
        rows = ["review,sentiment"] + [f"{_sentence(rng)},{('neg', 'pos')[i % 2]}" for i in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    spec = task_from_files(
        "MyReviews",
        train=tmp_path / "train.csv",
        dev=tmp_path / "dev.csv",
        text_columns="review",
        label_column="sentiment",
    )
    name = env_id(spec)
    request.addfinalizer(lambda: gym.registry.pop(name, None))  # the id goes with the test
    assert name == "ConsistentEE-MyReviews-v0" and name in registered_ids()
    model = tiny_model(spec.num_labels, tokenizer).save_pretrained(tmp_path / "model")
    env = gym.make(name, model=str(model), progress=False, split="dev", cache_dir=tmp_path / "cache")
    assert env.unwrapped.task == "myreviews" and env.unwrapped.num_inputs == 8
    _, info = env.reset()
    assert info["index"] == 0
    checked(gym_check_env, env.unwrapped)
    venv = gym.make_vec(
        name, num_envs=2, model=str(model), progress=False, split="dev", cache_dir=tmp_path / "cache"
    )
    assert isinstance(venv, ConsistentEEVectorEnv) and venv.reset()[0].shape[0] == 2
