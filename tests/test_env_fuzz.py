"""Property-based tests of the env API (issue 15, item 16): random call sequences on a synthetic table.

Each example is one sequence of up to 30 calls: ``reset`` with random seeds and options (valid and
invalid indices, wrong types, wrong shapes), ``step`` with random actions (mostly valid, some invalid:
2, -1, inf, nan, strings, None, wrong shapes), on the single env and on the vector env in both autoreset
modes. Asserted: only the documented exceptions are ever raised (ValueError, whose ConfigError and
InputIndexError subclasses carry the message, for bad values; EpisodeOverError for a step after the end
or before the first reset), a refused call changes nothing, and the invariants hold: the layer stays
within 1..L, a reward is paid only at termination, and an episode terminates exactly at the first EXIT
or at layer L. Derandomized (the same sequences on every run) and without an example database.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ee_gym.envs import ConsistentEEEnv, ConsistentEEVectorEnv, EpisodeOverError, ExitTable

N_INPUTS, NUM_LAYERS, STATE_SIZE, NUM_ENVS = 7, 4, 3, 3
DOCUMENTED = (ValueError, EpisodeOverError)
SINGLE_SEQUENCES, VECTOR_SEQUENCES = 800, 600  # per parameter: 2 x 800 + 2 x 600 = 2800 in all
RUN = settings(
    max_examples=SINGLE_SEQUENCES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz_table(split: str) -> ExitTable:
    rng = np.random.default_rng(0)
    states = rng.uniform(-1, 1, (N_INPUTS, NUM_LAYERS, STATE_SIZE)).astype(np.float32)
    logits = rng.normal(0, 2, (N_INPUTS, NUM_LAYERS, 2)).astype(np.float32)
    labels, memorized = rng.integers(0, 2, N_INPUTS), rng.integers(1, NUM_LAYERS + 1, N_INPUTS)
    return ExitTable(states, logits, labels, memorized, split=split)


TABLES = {split: fuzz_table(split) for split in ("train", "dev")}

# -- strategies -------------------------------------------------------------------------------------
junk = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=2),
    st.booleans(),
    st.lists(st.integers(-2, 9), max_size=3),
    st.dictionaries(st.text(max_size=1), st.integers(), max_size=1),
)
seeds = st.one_of(st.none(), st.none(), st.integers(-3, 2**40), junk)
single_index = st.one_of(st.integers(-2, N_INPUTS + 1), st.integers(0, N_INPUTS - 1), junk)
vector_index = st.one_of(
    st.lists(st.integers(0, N_INPUTS - 1), min_size=NUM_ENVS, max_size=NUM_ENVS),
    st.lists(st.integers(-2, N_INPUTS + 1), min_size=NUM_ENVS, max_size=NUM_ENVS),
    st.lists(st.integers(0, N_INPUTS - 1), max_size=NUM_ENVS + 1),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=NUM_ENVS, max_size=NUM_ENVS),
    st.lists(junk, min_size=NUM_ENVS, max_size=NUM_ENVS),
    junk,
    st.integers(-2, N_INPUTS),
)


def options_of(index):
    return st.one_of(
        st.none(), st.just({}), st.fixed_dictionaries({"index": index}), st.integers(), st.text(max_size=1)
    )


valid_action = st.sampled_from([0, 1, 0, 1, 1.0, 0.0, True, np.int64(1), np.int64(0)])
single_action = st.one_of(valid_action, valid_action, valid_action, st.integers(-2, 3), junk)
vector_action = st.one_of(
    *[st.lists(st.sampled_from([0, 1]), min_size=NUM_ENVS, max_size=NUM_ENVS).map(np.array)] * 4,
    st.lists(st.integers(-1, 2), min_size=NUM_ENVS, max_size=NUM_ENVS),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=NUM_ENVS, max_size=NUM_ENVS),
    st.lists(st.sampled_from([0, 1]), max_size=NUM_ENVS + 1),
    st.lists(junk, min_size=NUM_ENVS, max_size=NUM_ENVS),
    junk,
    st.integers(-1, 2),
)


def calls(index, action):
    reset = st.tuples(st.just("reset"), seeds, options_of(index))
    step = st.tuples(st.just("step"), action)
    return st.lists(st.one_of(reset, step, step, step, step), max_size=30)


def is_valid_single_action(action) -> bool:
    return (
        isinstance(action, int | float | np.integer) and not isinstance(action, np.bool_) and action in (0, 1)
    )


def is_valid_vector_action(action) -> bool:
    try:
        array = np.asarray(action)
    except ValueError:
        return False
    return array.shape == (NUM_ENVS,) and array.dtype.kind in "biuf" and bool(np.isin(array, (0, 1)).all())


def documented(call):
    """Run ``call``: (result, None), or (None, error) for a documented error; any other error fails."""
    try:
        return call(), None
    except DOCUMENTED as error:
        assert str(error), f"{type(error).__name__} without a message"
        return None, error


COUNT = {"single": 0, "vector": 0}  # sequences run, by env kind


@pytest.fixture(scope="module", autouse=True)
def report_count():
    """Print how many sequences ran (``pytest -s`` shows it)."""
    yield
    print(f"\nfuzzed call sequences: single env {COUNT['single']}, vector env {COUNT['vector']}")


# -- the single env ---------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "dev"])
@RUN
@given(sequence=calls(single_index, single_action))
def test_single_env_random_call_sequences(split, sequence):
    COUNT["single"] += 1
    env = ConsistentEEEnv(table=TABLES[split], split=split, alpha=0.05)
    layer, done = 0, True  # the episode under way (done: none)
    for call, *args in sequence:
        if call == "reset":
            seed, options = args
            out, error = documented(partial(env.reset, seed=seed, options=options))
            if error is None:
                obs, info = out
                assert info["layer"] == 1 and 0 <= info["index"] < N_INPUTS
                assert env.observation_space.contains(obs)
                layer, done = 1, False
            continue
        (action,) = args
        out, error = documented(partial(env.step, action))
        if done:
            assert isinstance(error, EpisodeOverError), f"step after the end gave {error!r}"
            continue
        if not is_valid_single_action(action):
            assert isinstance(error, ValueError), f"action {action!r} gave {error!r}"
            continue
        assert error is None, f"valid action {action!r} raised {error!r}"
        obs, reward, terminated, truncated, info = out
        assert not truncated and env.observation_space.contains(obs)
        assert terminated == (action == 1 or layer == NUM_LAYERS)
        if terminated:
            assert info["exit_layer"] == layer and math.isfinite(reward) and reward != 0.0
            done = True
        else:
            assert reward == 0.0 and info["layer"] == layer + 1
            layer += 1
        assert 1 <= env.unwrapped._layer <= NUM_LAYERS


# -- the vector env ---------------------------------------------------------------------------------
@pytest.mark.parametrize("autoreset_mode", ["same-step", "next-step"])
@settings(RUN, max_examples=VECTOR_SEQUENCES)
@given(sequence=calls(vector_index, vector_action))
def test_vector_env_random_call_sequences(autoreset_mode, sequence):
    COUNT["vector"] += 1
    split = "dev" if COUNT["vector"] % 2 else "train"
    next_step = autoreset_mode == "next-step"
    mode = {"autoreset_mode": autoreset_mode} if next_step else {}  # same-step: the default
    env = ConsistentEEVectorEnv(NUM_ENVS, table=TABLES[split], split=split, alpha=0.05, **mode)
    started = False
    layer = np.zeros(NUM_ENVS, dtype=np.int64)
    restart = np.zeros(NUM_ENVS, dtype=bool)  # next-step: ended at the last step
    for call, *args in sequence:
        if call == "reset":
            seed, options = args
            before = env.index.copy()
            out, error = documented(partial(env.reset, seed=seed, options=options))
            if error is None:
                obs, _ = out
                assert env.observation_space.contains(obs)
                started, layer[:], restart[:] = True, 1, False
            else:
                np.testing.assert_array_equal(env.index, before)  # a refused reset changes nothing
            np.testing.assert_array_equal(env.layer, layer)
            continue
        (action,) = args
        out, error = documented(partial(env.step, action))
        if not started:
            assert error is not None, "step before reset did not raise"
            continue
        if not is_valid_vector_action(action):
            assert isinstance(error, ValueError), f"actions {action!r} gave {error!r}"
            np.testing.assert_array_equal(env.layer, layer)
            continue
        assert error is None, f"valid actions {action!r} raised {error!r}"
        obs, rewards, terminated, truncated, info = out
        actions = np.asarray(action)
        exits = ((actions == 1) | (layer == NUM_LAYERS)) & ~restart
        assert env.observation_space.contains(obs) and not truncated.any()
        np.testing.assert_array_equal(terminated, exits)
        assert (rewards[~exits] == 0.0).all() and np.isfinite(rewards).all()
        if exits.any():
            fields = info if next_step else info["final_info"]
            np.testing.assert_array_equal(fields["exit_layer"][exits], layer[exits])
        if next_step:
            layer = np.where(restart, 1, np.where(exits, layer, layer + 1))
            restart = exits
        else:
            layer = np.where(exits, 1, layer + 1)
        np.testing.assert_array_equal(env.layer, layer)
        assert ((env.layer >= 1) & (env.layer <= NUM_LAYERS)).all()
