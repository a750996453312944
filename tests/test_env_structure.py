"""The env package's structure (issue 16, items 5, 6 and 8): a light ``import ee_gym``, string entry
points whose specs round-trip through JSON for every id, observation modes as objects, and a cached
env that holds its table, not the model."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec

import ee_gym
from ee_gym import observations, tasks
from ee_gym.envs import ConsistentEEEnv, ConsistentEEVectorEnv, ExitTable, env_id, env_tasks, registered_ids
from ee_gym.envs.base import LayerSource, TableSource
from ee_gym.observations import (
    LAYER_ONE_HOT_MODES,
    OBS_MODE_REGISTRY,
    OBS_MODES,
    STATE_OBS_MODES,
    ObservationEncoder,
    ObsMode,
    get_obs_mode,
)
from ee_gym.validation import ConfigError
from tests.conftest import write_tiny_glue

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "stable_baselines3", "accelerate")


def fresh_modules(code: str) -> set[str]:
    """The modules loaded after running ``code`` in a fresh interpreter (this checkout first)."""
    script = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


# =========================================================================== item 8: a light import
def test_import_ee_gym_loads_no_torch_transformers_sb3_accelerate_or_decoder():
    loaded = fresh_modules("import ee_gym; import gymnasium as gym; gym.spec('ConsistentEE-RTE-v0')")
    assert not [m for m in HEAVY if m in loaded]
    assert "ee_gym.generation" not in loaded  # the decoder stack loads when a token env is made
    assert not {"ee_gym.envs.classification", "ee_gym.envs.vector", "ee_gym.cache"} & loaded
    assert {"agents", "benchmarks"}.isdisjoint(loaded)


def test_lazy_names_still_resolve():
    """What ``ee_gym`` and ``ee_gym.envs`` exported eagerly before is still there, loaded on use."""
    from ee_gym.envs import OBS_MODES as from_envs
    from ee_gym.envs import ConsistentEETokenEnv, SB3VecEnv, make_sb3_vec_env

    assert from_envs == OBS_MODES
    assert ee_gym.MultiExitModel.__name__ == "MultiExitModel"
    assert ee_gym.build_cache.__module__ == "ee_gym.cache"
    assert ee_gym.Stage1Config.__module__ == "ee_gym.training"
    assert ee_gym.cache.StaleCacheError is ee_gym.StaleCacheError  # submodules as attributes
    assert callable(make_sb3_vec_env) and SB3VecEnv and ConsistentEETokenEnv
    assert set(ee_gym.__all__) <= set(dir(ee_gym))
    with pytest.raises(AttributeError):
        ee_gym.no_such_name  # noqa: B018
    with pytest.raises(AttributeError):
        ee_gym.envs.no_such_name  # noqa: B018


def test_a_bad_env_keyword_fails_without_loading_torch(tmp_path):
    """Checking keywords needs no model code: in a fresh interpreter a bad obs_mode fails before torch."""
    code = (
        "import gymnasium as gym, ee_gym\n"
        "try:\n    gym.make('ConsistentEE-RTE-v0', obs_mode='bar')\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    script = f"{code}import sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**__import__("os").environ, "EE_GYM_HOME": str(tmp_path)},
    )
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("refused: unknown observation mode 'bar'")
    assert json.loads(lines[-1]) == []


# =========================================================================== item 6: registration
def test_every_id_is_registered_in_one_loop_with_string_entry_points():
    ids = {task.id for task in env_tasks()}
    assert {env_id(spec) for spec in tasks.BUILTIN_TASKS} <= ids <= set(registered_ids())
    assert "ConsistentEE-XSum-v0" in ids  # the generation task is a task like the GLUE ones
    for name in registered_ids():
        spec = gym.spec(name)
        assert isinstance(spec.entry_point, str) and isinstance(spec.vector_entry_point, str)


def test_env_spec_json_round_trips_for_every_id(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the task stays in this test
    data = write_tiny_glue(tmp_path / "data")
    spec = tasks.task_from_files(
        "structure-reviews",
        train=data / "glue" / "SST-2" / "train.tsv",
        dev=data / "glue" / "SST-2" / "dev.tsv",
        text_columns=["sentence"],
        label_column="label",
    )
    ids = registered_ids()
    user_id = env_id(spec)
    try:
        assert user_id in ids
        for name in ids:
            spec = gym.spec(name)
            again = EnvSpec.from_json(spec.to_json())
            assert again == spec, name
            assert again.kwargs == spec.kwargs
        assert "task_spec" in gym.spec(user_id).kwargs  # the user task travels in its id
    finally:
        gym.registry.pop(user_id, None)


# =========================================================================== item 5: observation modes
def test_modes_are_objects_registered_once():
    assert OBS_MODES == ("state", "state+layer", "state+confidence", "stats", "full")
    assert all(isinstance(m, ObsMode) and m.name == n for n, m in OBS_MODE_REGISTRY.items())
    # the groups code used to spell out as strings, now read off the modes' properties
    assert LAYER_ONE_HOT_MODES == ("state+layer", "state+confidence", "state+probe")
    assert STATE_OBS_MODES == ("state", "state+layer", "state+confidence", "state+probe")
    assert observations.modes_where(uses_confidence=True) == ("state+confidence", "state+probe")
    assert observations.modes_where(generation_only=True) == ("state+probe",)  # not in OBS_MODES
    assert observations.modes_where(is_dict=True) == ("full",)
    assert observations.modes_where(uses_state=False) == ("stats",)
    assert get_obs_mode("full") is OBS_MODE_REGISTRY["full"]
    with pytest.raises(ConfigError, match="unknown observation mode 'bar'"):
        get_obs_mode("bar")


def tiny_table(n: int = 7, big_l: int = 4, d: int = 5, k: int = 3, seed: int = 0) -> ExitTable:
    rng = np.random.default_rng(seed)
    states = np.tanh(rng.normal(size=(n, big_l, d))).astype(np.float32)
    logits = (2 * rng.normal(size=(n, big_l, k))).astype(np.float32)
    return ExitTable(states, logits, rng.integers(0, k, n), rng.integers(1, big_l + 1, n))


@pytest.mark.parametrize("mode", OBS_MODES)
def test_each_mode_gives_the_same_observation_on_the_table_and_the_live_path(mode):
    """The table gather (vector env, cached env) and the live path (live env, inference) agree, for
    every mode, and the observations are in the mode's space with the sizes it declares."""
    table = tiny_table()
    n, big_l, d, k = table.num_inputs, table.num_layers, table.hidden_size, table.num_labels
    encoder = ObservationEncoder(mode, big_l, d, k)
    kind = get_obs_mode(mode)
    assert encoder.kind is kind and encoder.space == kind.space(encoder)

    def assert_same(a, b):
        if kind.is_dict:
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    for layer in range(1, big_l + 1):
        out = encoder.allocate(n)
        encoder.batch(table, np.arange(n), np.full(n, layer), out)
        assert_same(out, encoder.from_outputs(table.states[:, layer - 1], table.logits[:, :layer]))
        for i in range(n):
            gathered = {key: v[i] for key, v in out.items()} if kind.is_dict else out[i]
            assert encoder.space.contains(gathered)
            assert_same(gathered, encoder.single(table.states[i, layer - 1], table.logits[i, :layer]))
            assert_same(gathered, encoder.at(table, i, layer))
        if kind.has_layer_one_hot:
            assert (out[:, encoder.feature_size + layer - 1] == 1).all()


# =========================================================================== item 6: the env over a source
class CountingSource(LayerSource):
    """A source written here, over nothing but numbers: the env base does episodes and rewards."""

    def __init__(self):
        self.num_layers, self.hidden_size, self.num_labels, self.num_inputs = 3, 2, 2, 5

    def observation(self, index, layer):
        return self.encoder.join(np.full((1, 2), index / 10, np.float32), layer)[0]

    def exit_info(self, index, layer):
        return dict(
            index=index,
            exit_layer=layer,
            prediction=0,
            label=0,
            correct=True,
            memorized_layer=1,
            cross_entropy=0.0,
        )

    def describe(self, index, layer):
        return f"item {index} layer {layer}"


def test_the_env_base_runs_any_source():
    from ee_gym.envs.base import LayerEpisodeEnv
    from ee_gym.rewards import get_reward

    class Env(LayerEpisodeEnv):
        def __init__(self):
            self.split, self.render_mode = "dev", "ansi"
            self.reward_fn, self.alpha = get_reward("plain"), 0.5
            self._init_episodes(CountingSource(), "state+layer")

    env = Env()
    obs, info = env.reset(seed=0)
    assert info == {"index": 0, "layer": 1} and obs.shape == (2 + 3,)
    assert env.step(0)[1] == 0.0
    _, reward, terminated, _, info = env.step(1)
    assert terminated and info["exit_layer"] == 2 and reward == pytest.approx(-1.0)
    assert env.render().splitlines() == ["item 0 layer 1 -> continue", "item 0 layer 2 -> EXIT"]
    assert env.reset()[1]["index"] == 1  # dev walks in order


def test_a_cached_env_holds_its_table_not_the_model(tmp_path, tiny_model):
    """A cached env made from a model keeps the table only: pickling it carries no model, and it is
    as small as its table (the tiny model's weights alone pickle larger than this env)."""
    data = write_tiny_glue(tmp_path / "data")
    kwargs = dict(model=tiny_model, data_dir=data, cache_dir=tmp_path / "cache", progress=False)
    env = ConsistentEEEnv("sst2", "train", **kwargs)
    assert env.model is None and isinstance(env.source, TableSource)
    size = len(pickle.dumps(env))
    table_size = len(pickle.dumps(env.table))
    model_size = len(pickle.dumps(tiny_model))
    print(f"pickled cached env {size} bytes, its table {table_size}, the model {model_size}")
    assert size < table_size + 200_000 < model_size
    copy = pickle.loads(pickle.dumps(env))
    assert copy.model is None
    np.testing.assert_array_equal(copy.reset(seed=3)[0], env.reset(seed=3)[0])
    venv = ConsistentEEVectorEnv(4, "sst2", "train", **kwargs)
    assert not any(v is tiny_model for v in vars(venv).values())
    assert len(pickle.dumps(venv)) < table_size + 200_000


def test_a_live_env_runs_the_model_and_keeps_it(tmp_path, tiny_model):
    data = write_tiny_glue(tmp_path / "data")
    env = ConsistentEEEnv("sst2", "dev", model=tiny_model, data_dir=data, mode="live", progress=False)
    assert env.model is tiny_model and env.table is None
    env.reset(options={"index": 2})
    assert env.step(1)[4]["exit_layer"] == 1
