"""rl-zoo3 with ee-gym's shipped hyperparameter files: every id covered, the suite's own settings,
and the zoo training a user task through ``--gym-packages`` (dummy and subproc vector envs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import yaml

import ee_gym  # noqa: F401  (registers the ids)
from agents.sb3 import A2CPolicy, DQNPolicy, PPOPolicy, QRDQNPolicy
from ee_gym.validation import ConfigError
from ee_gym.zoo import ZOO_ALGOS, conf_file
from tests.conftest import new_tiny_model

pytest.importorskip("rl_zoo3")  # the zoo extra; `.[dev]` (and so CI) installs it
ROOT = Path(__file__).resolve().parents[1]
SUITE = {"ppo": PPOPolicy, "a2c": A2CPolicy, "dqn": DQNPolicy, "qrdqn": QRDQNPolicy}
EE_GYM_IDS = [i for i, spec in gym.registry.items() if i.startswith("ConsistentEE-") and "zootiny" not in i
              and str(spec.entry_point).startswith("ee_gym")]  # fmt: skip


@pytest.mark.parametrize("algo", ZOO_ALGOS)
def test_every_id_has_an_entry_and_default_is_the_suites_setting(algo):
    entries = yaml.safe_load(conf_file(algo).read_text())
    assert set(EE_GYM_IDS) <= set(entries) and "default" in entries
    default, suite = entries["default"], SUITE[algo]
    for key, value in suite.default_kwargs.items():
        if key in ("n_steps", "train_freq", "policy_kwargs"):
            continue
        assert default[key] == pytest.approx(value), key
    assert default["n_timesteps"] == 100_000 and default["env_kwargs"] == {"obs_mode": suite.obs_mode}
    if "n_steps" in suite.default_kwargs:  # the same steps per update as the suite's vector env
        assert default["n_envs"] * default["n_steps"] == suite.num_envs * suite.default_kwargs["n_steps"]
    else:
        assert (
            default["n_envs"] * default["train_freq"] == suite.num_envs * suite.default_kwargs["train_freq"]
        )
    for env_id, entry in entries.items():  # every entry is a full setting (merged on the default)
        assert {"policy", "n_envs", "n_timesteps", "env_kwargs"} <= set(entry), env_id
    with pytest.raises(ConfigError, match="ppo"):
        conf_file("sac")


def _tiny_task(tmp_path: Path, tokenizer) -> tuple[Path, Path]:
    """(data folder, model folder) of the tiny user task ``tests.zoo_package`` registers."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split, n in (("train", 24), ("dev", 12)):
        rows = [f"it was {'good' if i % 2 else 'bad'} number {i}\t{i % 2}" for i in range(n)]
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    model = tmp_path / "model"
    if not model.exists():
        new_tiny_model(tokenizer, task="zootiny").save_pretrained(model)
    return data, model


def _zoo(algo: str, tmp_path: Path, tokenizer, *extra: str) -> subprocess.CompletedProcess:
    """Train ``algo`` with the shipped file for a few hundred steps on a tiny user task."""
    data, model = _tiny_task(tmp_path, tokenizer)
    env = {**os.environ, "EE_GYM_ZOO_DATA": str(data), "EE_GYM_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [
        sys.executable, "-m", "rl_zoo3.train", "--algo", algo, "--env", "ConsistentEE-zootiny-v0",
        "--gym-packages", "tests.zoo_package", "--conf-file", str(conf_file(algo)), "-n", "512",
        "--env-kwargs", f"model:'{model}'", "obs_mode:'state+layer'", "progress:False",
        "-f", str(tmp_path / "logs"), "--eval-freq", "-1", "--seed", "0", *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("algo", "vec_env"), [("ppo", "dummy"), ("a2c", "subproc")])
def test_the_zoo_trains_a_user_task_with_the_shipped_file(algo, vec_env, tmp_path, tokenizer):
    done = _zoo(algo, tmp_path, tokenizer, "--vec-env", vec_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Using 'default' hyperparameters" in done.stdout  # a user task: the default entry
    saved = list((tmp_path / "logs" / algo).glob("ConsistentEE-zootiny-v0_*/ConsistentEE-zootiny-v0.zip"))
    assert len(saved) == 1


def test_the_zoo_benchmark_scores_the_shipped_file_and_the_fallback(
    tmp_path, tokenizer, monkeypatch, request
):
    from benchmarks import zoo
    from ee_gym import tasks

    data, model = _tiny_task(tmp_path, tokenizer)
    for name, value in (("EE_GYM_ZOO_DATA", data), ("EE_GYM_HOME", tmp_path / "home"), ("HF_HUB_OFFLINE", "1"),
                        ("OMP_NUM_THREADS", "1")):  # fmt: skip
        monkeypatch.setenv(name, str(value))  # the zoo's subprocesses and this process alike
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the tiny task stays in this test
    request.addfinalizer(lambda: gym.registry.pop("ConsistentEE-zootiny-v0", None))
    request.addfinalizer(lambda: sys.modules.pop("tests.zoo_package", None))  # its data folder is this test's
    monkeypatch.chdir(ROOT)  # the zoo's subprocesses import tests.zoo_package from here
    out = tmp_path / "out"
    common = ["--env", "ConsistentEE-zootiny-v0", "--gym-packages", "tests.zoo_package", "--output-dir", str(out),
              "--env-kwargs", f"model:'{model}'", "progress:False"]  # fmt: skip
    with pytest.raises(SystemExit, match="unknown --algo 'sac': ee-gym ships rl-zoo3 files for ppo"):
        zoo.main([*common, "--algo", "sac"])
    assert not out.exists()  # refused before any training
    with pytest.raises(SystemExit, match="not an ee-gym id"):
        zoo.main(["--env", "CartPole-v1"])

    assert zoo.main([*common, "--algo", "ppo", "--timesteps", "256", "--fallback-timesteps", "256"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert set(record["runs"]) == {"shipped", "fallback"} and record["num_layers"] == 4
    for name, run in record["runs"].items():
        assert math.isfinite(run["metric"]) and 1.0 <= run["speedup"] <= record["num_layers"], name
        assert run["obs_mode"] == "state+layer" and run["timesteps_cap"] == 256 and run["timesteps"] >= 256
        assert "-n 256" in run["command"]
    assert record["runs"]["shipped"]["entry"] == record["runs"]["fallback"]["entry"] == "default"
    assert "--conf-file" in record["runs"]["shipped"]["command"]
    assert "--conf-file" not in record["runs"]["fallback"]["command"]
    assert record["runs"]["fallback"]["hyperparameters"]["n_timesteps"] == 1_000_000  # the zoo's own default
    assert math.isfinite(record["full_model_metric"]) and {"rl_zoo3", "torch"} <= set(record["versions"])
    assert "capped" in (out / "results.md").read_text()
    # paired verdicts: shipped against fallback, each against the full model, differences of the points
    pairs = [(r["policy"], r["reference"]) for r in record["paired"]]
    assert pairs == [("shipped", "fallback"), ("shipped", "full model"), ("fallback", "full model")]
    for r in record["paired"]:
        assert r["low"] <= r["delta"] <= r["high"] and r["statistic"].startswith("metric@")
    shipped, fallback = record["runs"]["shipped"]["metric"], record["runs"]["fallback"]["metric"]
    assert record["paired"][0]["delta"] == pytest.approx(shipped - fallback)
    assert "95%" in (out / "results.md").read_text()
    # the results contract: one point per run, the verdicts' own interval as the detectable difference
    assert record["protocol"] == f"model {model}" and record["mde_auc"] is None  # the env's model= keyword
    assert record["curves"]["shipped"] == [[record["runs"]["shipped"]["speedup"], shipped]]
    assert record["mde_metric"] == pytest.approx(
        (record["paired"][0]["high"] - record["paired"][0]["low"]) / 2
    )
