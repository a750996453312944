"""Issue 15, part B2: bad input to the envs and the agents gets a clear, early error.

One test per item of the issue (3, 5, 7, 8, 9, 14, 16, 17), on synthetic tables and tiny models. New
names (ConfigError, CorruptFileError, ...) are imported inside the tests or matched by name, so that on
the code before the fix each test fails on its own assertion, not on an import.
"""

from __future__ import annotations

import math
import random
import time

import gymnasium as gym
import numpy as np
import pytest

import agents
from agents.evaluate import evaluate, run_policy
from ee_gym import tasks
from ee_gym.envs import CONTINUE, EXIT, ConsistentEEEnv, ConsistentEEVectorEnv, EpisodeOverError, ExitTable
from tests.conftest import FILLER, NEGATIVE, POSITIVE, new_tiny_model


def synthetic_table(
    n: int = 12, num_layers: int = 4, d: int = 8, k: int = 2, seed: int = 0, split: str = "train"
) -> ExitTable:
    rng = np.random.default_rng(seed)
    states = rng.uniform(-1, 1, (n, num_layers, d)).astype(np.float32)
    logits = rng.normal(0, 2, (n, num_layers, k)).astype(np.float32)
    return ExitTable(states, logits, rng.integers(0, k, n), rng.integers(1, num_layers + 1, n), split=split)


# =========================================================================== item 3


def test_item3_learned_policies_refuse_tables_of_other_shapes(tmp_path):
    """A learner records (L, d, K, obs_mode) on learn, saves them, and refuses an env of other shapes
    (same observation width included); a garbage policy.json is a CorruptFileError naming the file."""
    small, other = synthetic_table(num_layers=4, d=8), synthetic_table(num_layers=6, d=6, seed=1)
    ppo = agents.make("ppo", total_timesteps=32, num_envs=4, n_steps=8, batch_size=32, n_epochs=1)
    ppo.learn(ConsistentEEVectorEnv(4, table=small))
    assert evaluate(ppo, small).exit_layers.max() <= 4  # its own table: fine
    shapes = (
        r"L=4 layers, d=8, K=2 labels.*L=6 layers, d=6, K=2 labels.*train the policy on this model's table"
    )
    with pytest.raises(ValueError, match=shapes):  # d + L = 12 both: acted silently before
        evaluate(ppo, other)
    ppo.save(tmp_path / "ppo")
    with pytest.raises(ValueError, match=shapes):  # the shapes travel in policy.json
        evaluate(agents.load_policy(tmp_path / "ppo"), other)

    two, three = synthetic_table(k=2), synthetic_table(k=3, seed=2)
    reinforce = agents.make("reinforce").learn(ConsistentEEVectorEnv(1, table=two), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"K=2 labels.*K=3 labels.*train the policy on this model's table"):
        evaluate(reinforce, three)
    assert evaluate(agents.make("maxprob"), three).exit_layers.min() >= 1  # rules fit any shape

    folder = tmp_path / "garbage"
    folder.mkdir()
    (folder / "policy.json").write_text('{"name": "ppo", "par')
    with pytest.raises(Exception, match=r"garbage[/\\]policy\.json") as error:
        agents.load_policy(folder)
    assert type(error.value).__name__ == "CorruptFileError"


# =========================================================================== item 5


def test_item5_predict_takes_a_string_as_one_input_and_rule_names(tiny_model):
    """A str is one input (text_a and text_b); a rule's name is agents.make(name); other names say
    what to pass."""
    from ee_gym.inference import predict

    assert len(predict(tiny_model, "the film was good")) == 1
    assert len(predict(tiny_model, "a man sleeps", text_b="nobody sleeps")) == 1
    texts = ["the film was good", "a dreadful plot", "superb acting"]
    by_name = predict(tiny_model, texts, policy="entropy")
    by_policy = predict(tiny_model, texts, policy=agents.make("entropy"))
    np.testing.assert_array_equal(by_name.exit_layers, by_policy.exit_layers)
    np.testing.assert_array_equal(by_name.predictions, by_policy.predictions)
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*agents\.make"):
        predict(tiny_model, texts, policy="nope")
    with pytest.raises(ValueError, match=r"'reinforce' learns.*trained policy"):
        predict(tiny_model, texts, policy="reinforce")


# =========================================================================== item 7


def _vec(**kwargs):
    return ConsistentEEVectorEnv(2, table=synthetic_table(), **kwargs)


def _reset_single(index):
    return ConsistentEEEnv(table=synthetic_table()).reset(options={"index": index})


def _reset_vector(index):
    return _vec().reset(options={"index": index})


#: (what, call, the setting the message names): each was accepted before the fix
BAD_SETTINGS = [
    ("alpha=-1", lambda: ConsistentEEEnv(table=synthetic_table(), alpha=-1), "alpha must be >= 0"),
    ("alpha=nan", lambda: ConsistentEEEnv(table=synthetic_table(), alpha=math.nan), "alpha must be a finite"),
    ("vector alpha=-1", lambda: _vec(alpha=-1.0), "alpha must be >= 0"),
    ("reinforce hidden_size=0", lambda: agents.make("reinforce", hidden_size=0), "hidden_size must be >= 1"),
    (
        "threshold dropout=1",
        lambda: agents.make("reinforce", rollout="threshold", dropout=1.0),
        "dropout must be < 1",
    ),
    ("reinforce epochs=-1", lambda: agents.make("reinforce").learn(_vec(), epochs=-1), "epochs must be >= 1"),
    (
        "ppo total_timesteps=-5",
        lambda: agents.make("ppo", total_timesteps=-5),
        "total_timesteps must be >= 1",
    ),
    (
        "ppo learn(total_timesteps=-5)",
        lambda: agents.make("ppo", num_envs=2).learn(_vec(), total_timesteps=-5),
        "total_timesteps must be >= 1",
    ),
    (
        "maxprob threshold=2",
        lambda: agents.make("maxprob", threshold=2.0),
        r"maxprob threshold must be <= 1.*max p_l",
    ),
    ("maxprob threshold=0", lambda: agents.make("maxprob", threshold=0.0), "maxprob threshold must be > 0"),
    (
        "entropy threshold=-0.1",
        lambda: agents.make("entropy", threshold=-0.1),
        "entropy threshold must be >= 0",
    ),
    (
        "normentropy threshold=1.5",
        lambda: agents.make("normentropy", threshold=1.5),
        "normentropy threshold must be <= 1",
    ),
    (
        "top2gap threshold=-0.2",
        lambda: agents.make("top2gap", threshold=-0.2),
        "top2gap threshold must be >= 0",
    ),
    ("pcee threshold=2", lambda: agents.make("pcee", threshold=2.0), "pcee threshold must be <= 1"),
    ("patience=1.5", lambda: agents.make("patience", patience=1.5), "patience must be a whole number"),
    ("static layer=2.7", lambda: agents.make("static", layer=2.7), "layer must be a whole number"),
    (
        "num_envs=2.5",
        lambda: ConsistentEEVectorEnv(2.5, table=synthetic_table()),
        "num_envs must be a whole number",
    ),
    ("single index=1.7", lambda: _reset_single(1.7), "index.*must be a whole number"),
    ("vector index=1.7", lambda: _reset_vector([1.7, 0]), "index.*whole number"),
    (
        "unknown keyword",
        lambda: agents.make("entropy", treshold=0.2),
        r"no argument 'treshold'.*accepts threshold",
    ),
    ("unknown sb3 keyword", lambda: agents.make("ppo", lerning_rate=1e-3), r"'lerning_rate'.*learning_rate"),
]


@pytest.mark.parametrize(("what", "call", "message"), BAD_SETTINGS, ids=[case[0] for case in BAD_SETTINGS])
def test_item7_settings_that_cannot_be_right_are_refused(what, call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert type(error.value).__name__ == "ConfigError", what


# =========================================================================== item 8


def test_item8_vector_env_walks_the_dev_split_like_the_single_env():
    """reset() continues the walk, reset(seed=...) starts it at 0, in both envs; evaluate still scores
    every input exactly once."""
    dev = synthetic_table(n=5, split="dev")
    single, vector = ConsistentEEEnv(table=dev, split="dev"), ConsistentEEVectorEnv(1, table=dev, split="dev")

    def vector_reset(**kwargs) -> int:
        vector.reset(**kwargs)
        return int(vector.index[0])

    walked = [single.reset(seed=0)[1]["index"]] + [single.reset()[1]["index"] for _ in range(6)]
    assert walked == [vector_reset(seed=0)] + [vector_reset() for _ in range(6)] == [0, 1, 2, 3, 4, 0, 1]
    assert single.reset(seed=3)[1]["index"] == vector_reset(seed=3) == 0
    wide = ConsistentEEVectorEnv(2, table=dev, split="dev")
    wide.reset(seed=0)
    np.testing.assert_array_equal(wide.index, [0, 1])
    wide.reset()
    np.testing.assert_array_equal(wide.index, [2, 3])  # the single env's next two inputs
    exit_layers, _ = run_policy(agents.make("static", layer=2), dev, batch_size=2)
    np.testing.assert_array_equal(exit_layers, 2)  # every input once, at layer 2


# =========================================================================== item 9


class ExpensiveWorkStarted(Exception):
    pass


@pytest.mark.filterwarnings("ignore:.*render_mode='human'")
def test_item9_keywords_are_checked_before_stage1_or_the_cache(monkeypatch, isolated_home):
    """On an empty EE_GYM_HOME every bad keyword fails at once: no stage 1, no cache, no decoder."""
    import ee_gym.envs.generation
    import ee_gym.envs.prepare

    def tripwire(*args, **kwargs):
        raise ExpensiveWorkStarted("stage 1 / cache building / decoder loading started")

    for name in ("train_stage1", "build_cache"):
        monkeypatch.setattr(ee_gym.envs.prepare, name, tripwire)
    for name in ("load_decoder", "load_token_table"):
        monkeypatch.setattr(ee_gym.envs.generation, name, tripwire)
    bad = [
        dict(obs_mode="bar"),
        dict(alpha="x"),
        dict(reward="foo"),
        dict(mode="x"),
        dict(split="train[:x]"),
        dict(split="tran"),
        dict(max_inputs=0),
        dict(max_length=0),
        dict(max_length=100_000),
    ]
    rte = "ConsistentEE-RTE-v0"
    started = time.perf_counter()
    with pytest.raises(ValueError, match="unknown observation mode 'bar'"):
        gym.make(rte, obs_mode="bar")
    seconds = time.perf_counter() - started
    print(f"gym.make(obs_mode='bar') on an empty EE_GYM_HOME: error after {seconds * 1000:.1f} ms")
    assert seconds < 2.0
    for kwargs in bad:
        with pytest.raises(ValueError):
            gym.make(rte, **kwargs)
        with pytest.raises(ValueError):
            gym.make_vec(rte, num_envs=2, **kwargs)
    with pytest.raises(ValueError, match="render_mode"):
        gym.make(rte, render_mode="human")
    for kwargs in (dict(alpha="x"), dict(max_prompts=0), dict(alpha=-1.0)):
        with pytest.raises(ValueError):
            gym.make("ConsistentEE-XSum-v0", **kwargs)
        with pytest.raises(ValueError):
            gym.make_vec("ConsistentEE-XSum-v0", num_envs=2, **kwargs)
    assert not (isolated_home / "checkpoints").exists() and not (isolated_home / "cache").exists()


# =========================================================================== item 14


def _write_reviews(folder) -> None:
    rng = random.Random(0)
    for split, n in (("train", 12), ("dev", 6)):
        rows = ["review,sentiment"]
        for i in range(n):
            words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE + NEGATIVE)]
            rows.append(f"{' '.join(words)},{('neg', 'pos')[i % 2]}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_item14_user_tasks_work_in_spawned_workers(tmp_path, tokenizer, monkeypatch, request):
    """A user task's id carries its spec as JSON data; an async vector env with the spawn context
    (fresh processes that never made the task) rebuilds it and runs."""
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the task stays in this test
    _write_reviews(tmp_path)
    spec = tasks.task_from_files(
        "SpawnReviews",
        train=tmp_path / "train.csv",
        dev=tmp_path / "dev.csv",
        text_columns="review",
        label_column="sentiment",
    )
    name = "ConsistentEE-SpawnReviews-v0"
    request.addfinalizer(lambda: gym.registry.pop(name, None))
    model = new_tiny_model(tokenizer).save_pretrained(tmp_path / "model")
    kwargs = dict(model=str(model), split="dev", cache_dir=str(tmp_path / "cache"), progress=False)
    assert gym.make(name, **kwargs).unwrapped.num_inputs == 6  # builds the cache the workers read
    venv = gym.make_vec(
        name, num_envs=2, vectorization_mode="async", vector_kwargs={"context": "spawn"}, **kwargs
    )
    try:
        _, info = venv.reset(seed=0)
        assert list(info["index"]) == [0, 0]  # each sub-env its own walk of dev
        _, rewards, terminated, _, info = venv.step(np.array([EXIT, EXIT]))
        assert terminated.all() and (rewards != 0).all() and list(info["exit_layer"]) == [1, 1]
    finally:
        venv.close()
    assert tasks.get_task("spawnreviews") == spec


# =========================================================================== item 16


def test_item16_bad_calls_raise_the_documented_errors():
    """reset/step outside the documented set: ValueError (ConfigError) with a message, IndexError-compatible
    out-of-range indices, EpisodeOverError after the end; an empty split and num_envs=0 at construction."""
    env, venv = ConsistentEEEnv(table=synthetic_table()), _vec()
    for index in (None, math.inf, math.nan, [1, 2], "3"):
        with pytest.raises(ValueError, match="index"):
            env.reset(options={"index": index})
    for index in ([0], [0, 1, 2], [[0, 1]], [None, 1], [0, math.inf], "ab", [[0], [1, 2]]):
        with pytest.raises(ValueError, match="index"):
            venv.reset(options={"index": index})
    for index in (12, -1):
        with pytest.raises(IndexError, match="out of range"):
            env.reset(options={"index": index})
        with pytest.raises(IndexError, match="out of range"):
            venv.reset(options={"index": [0, index]})
    for seed in (-1, 1.5, "x"):
        with pytest.raises(ValueError, match="seed"):
            env.reset(seed=seed)
        with pytest.raises(ValueError, match="seed"):
            venv.reset(seed=seed)
    with pytest.raises(ValueError, match="options"):
        env.reset(options=5)
    env.reset(seed=0)
    for action in (math.inf, -math.inf, math.nan, None, "1", 2, [0, 1]):
        with pytest.raises(ValueError, match="action"):
            env.step(action)
    env.step(EXIT)
    with pytest.raises(EpisodeOverError):
        env.step(CONTINUE)
    empty = ExitTable(
        np.zeros((0, 4, 8), np.float32), np.zeros((0, 4, 2), np.float32), np.zeros(0), np.zeros(0)
    )
    for make in (lambda: ConsistentEEEnv(table=empty), lambda: ConsistentEEVectorEnv(2, table=empty)):
        with pytest.raises(ValueError, match="no inputs"):
            make()
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        ConsistentEEVectorEnv(0, table=synthetic_table())


# =========================================================================== item 17


def test_item17_next_step_autoreset_serves_vector_wrappers():
    """autoreset_mode='next-step': the exit step returns the exit, the next one starts the next input
    (reward 0, not terminated, its action ignored); NormalizeObservation wraps it; EnvSpecs holding a
    table compare."""
    from gymnasium.vector import AutoresetMode
    from gymnasium.wrappers.vector import NormalizeObservation, RecordEpisodeStatistics

    table = synthetic_table(n=6, num_layers=4, split="dev")
    venv = ConsistentEEVectorEnv(2, table=table, split="dev", autoreset_mode="next-step", alpha=0.1)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert ConsistentEEVectorEnv(2, table=table).metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    single = ConsistentEEEnv(table=table, split="dev", alpha=0.1)
    obs, _ = venv.reset(seed=0)
    np.testing.assert_array_equal(venv.index, [0, 1])
    # sub-env 0 exits at layer 1, sub-env 1 continues to layer 2 and exits there
    obs1, rewards, terminated, _, info = venv.step(np.array([EXIT, CONTINUE]))
    single.reset(options={"index": 0})
    _, expected, _, _, _ = single.step(EXIT)
    assert terminated.tolist() == [True, False] and rewards[0] == pytest.approx(expected) and rewards[1] == 0
    np.testing.assert_array_equal(obs1[0], obs[0])  # the exit layer's observation, not the next input's
    assert info["exit_layer"][0] == 1 and info["_exit_layer"].tolist() == [True, False]
    obs2, rewards, terminated, _, _ = venv.step(np.array([EXIT, EXIT]))  # sub-env 0's action is ignored
    assert terminated.tolist() == [False, True] and rewards[0] == 0.0
    np.testing.assert_array_equal(obs2[0], single.reset(options={"index": 2})[0])  # layer 1 of input 2
    assert venv.index.tolist() == [2, 1] and venv.layer.tolist() == [1, 2]

    wrapped = RecordEpisodeStatistics(
        NormalizeObservation(ConsistentEEVectorEnv(3, table=table, autoreset_mode="next-step"))
    )
    wrapped.reset(seed=1)
    exit_layers = []
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, rewards, terminated, _, info = wrapped.step(rng.integers(0, 2, 3))
        assert (rewards[~terminated] == 0).all() and (rewards[terminated] != 0).all()
        exit_layers += info["exit_layer"][terminated].tolist() if terminated.any() else []
    assert exit_layers and list(wrapped.length_queue) == exit_layers[-len(wrapped.length_queue) :]

    first, second = (gym.make("ConsistentEE-RTE-v0", table=table) for _ in range(2))
    assert first.spec == first.spec  # tables compare by identity: no "truth value of an array"
    assert isinstance(first.spec == second.spec, bool)  # each spec holds its own copy of the table
