"""The exit-policy protocol lives in the core: ee_gym never imports agents, a policy written to the
protocol (here, in this file) runs through the whole pipeline, and REINFORCE's min_layer and
observation mode hold in stage 3 as in stage 2 and inference, because it decides in one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import agents
from ee_gym import joint, pipeline
from ee_gym import policy as protocol
from ee_gym.inference import predict
from ee_gym.joint import Stage3Config, train_stage3
from ee_gym.policy import ExitPolicy, TrainingBudget, load_policy
from ee_gym.runner import NetworkExits, model_env_stand_in, run_layers
from ee_gym.validation import ConfigError
from tests.conftest import new_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_importing_every_ee_gym_module_imports_neither_agents_nor_benchmarks():
    code = (
        "import importlib, pkgutil, sys\n"
        "import ee_gym\n"
        "for module in pkgutil.walk_packages(ee_gym.__path__, 'ee_gym.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'agents', 'benchmarks'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=600
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_entry_points_declare_exactly_the_bundled_policies():
    """pyproject.toml's ``ee_gym.policies`` group and ``agents.REGISTRY`` name the same classes."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][protocol.ENTRY_POINT_GROUP] == agents.REGISTRY


# -- the registry -------------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch):
    """The policy registry, restored after the test."""
    protocol.policy_names()  # filled before the copy
    monkeypatch.setattr(protocol, "_REGISTRY", dict(protocol._REGISTRY))
    return protocol._REGISTRY


def test_a_third_party_entry_point_joins_the_registry_without_an_import(registry, monkeypatch):
    from importlib.metadata import EntryPoint

    point = EntryPoint("third-party", f"{__name__}:PerLayerBias", protocol.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        "importlib.metadata.entry_points", lambda group: [point] if group == point.group else []
    )
    monkeypatch.setattr(protocol, "_plugins_loaded", False)
    assert "third-party" in protocol.policy_names() and "reinforce" in protocol.policy_names()
    assert registry["third-party"] == point.value  # a string until first made
    assert isinstance(protocol.make_policy("third-party", num_layers=4), PerLayerBias)
    assert "third-party" in agents.names()


def test_registry_errors_name_the_choices(registry):
    with pytest.raises(ConfigError, match="unknown policy 'nope'.*reinforce"):
        protocol.make_policy("nope")
    with pytest.raises(ConfigError, match="takes no argument 'colour'"):
        protocol.make_policy("entropy", colour="red")
    with pytest.raises(ConfigError, match="taken by"):
        protocol.register_policy("entropy", f"{__name__}:PerLayerBias")
    with pytest.raises(ConfigError, match="module:Class"):
        protocol.register_policy("mine", "no_colon")


def test_one_training_budget_for_every_learner():
    assert TrainingBudget.of(epochs=3, lr=1e-3) == TrainingBudget(epochs=3, learning_rate=1e-3)
    assert TrainingBudget.of(TrainingBudget(seed=2), timesteps=64) == TrainingBudget(
        seed=2, total_timesteps=64
    )
    with pytest.raises(ConfigError, match="no setting 'epoch'.*epochs"):
        TrainingBudget.of(epoch=3)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        TrainingBudget(epochs=0)
    with pytest.raises(ConfigError, match="unknown rollout"):
        TrainingBudget(rollout="greedy")


# -- a policy written to the protocol, here, not registered in agents ---------------------------
class _Biases(nn.Module):
    """One exit logit per layer, whatever the state: ``net(features, layers) -> logits``."""

    def __init__(self, num_layers: int, start: float):
        super().__init__()
        self.bias = nn.Parameter(torch.full((num_layers,), float(start)))

    def forward(self, features: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        return self.bias[layers - 1]


class PerLayerBias(ExitPolicy):
    """Exit at layer l with probability sigmoid(b_l): a learner of one number per layer, trained by
    REINFORCE in stage 2 (on the table) and jointly with the model in stage 3 (on the live model)."""

    name: ClassVar[str] = "per-layer-bias"
    obs_mode: ClassVar[str] = "state+layer"
    learns: ClassVar[bool] = True
    trains_jointly: ClassVar[bool] = True

    def __init__(self, num_layers: int | None = None, bias: list[float] | None = None, start: float = 0.0):
        self.start, self.net = start, None
        if num_layers is not None:
            self.net = _Biases(num_layers, start)
            if bias is not None:
                self.net.bias.data = torch.tensor(bias, dtype=torch.float32)
        self.fits: list[TrainingBudget] = []

    def _ensure(self, num_layers: int) -> _Biases:
        if self.net is None:
            self.net = _Biases(num_layers, self.start)
        return self.net

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        layers = np.asarray(obs)[:, -self.net.bias.shape[0] :].argmax(1)
        exits = self.net.bias.detach().numpy()[layers] > 0
        return (exits | (layers == len(self.net.bias) - 1)).astype(np.int64)

    def bind(self, env: Any) -> None:
        super().bind(env)
        self._ensure(env.num_layers)

    def fit(self, env: Any, budget: TrainingBudget) -> None:
        self._learned_on(env, fresh=self.net is None)
        self._ensure(env.num_layers)
        self.fits.append(budget)

    def joint_module(self, model: Any) -> nn.Module:
        self.bind(model_env_stand_in(model))
        return self.net

    def joint_decider(self, model: Any, replicas: int = 1, generator=None, rollout: str | None = None):
        return NetworkExits(self.joint_module(model), replicas, rollout or "sample", generator)

    def joint_loss(self, rollout: Any, rewards: torch.Tensor, group: int) -> torch.Tensor:
        from agents.reinforce import group_baseline, trajectory_log_prob

        advantage = rewards - group_baseline(rewards, group)
        log_prob = trajectory_log_prob(rollout.policy_logits, rollout.exit_layer, rollout.exit_chosen)
        return -(advantage * log_prob).mean()

    def get_params(self) -> dict[str, Any]:
        if self.net is None:
            return {"start": self.start}
        return {"num_layers": len(self.net.bias), "bias": self.net.bias.tolist(), "start": self.start}


def test_a_policy_written_to_the_protocol_runs_through_the_pipeline(registry, tokenizer, tiny_data, tmp_path):
    protocol.register_policy(PerLayerBias.name, PerLayerBias)
    config = pipeline.PipelineConfig(
        task="sst2",
        agent=PerLayerBias.name,
        data_dir=str(tiny_data),
        output_dir=str(tmp_path / "run"),
        rounds=1,
        max_length=32,
        train_limit=24,
        dev_limit=16,
        stage1_epochs=1,
        stage1_batch_size=8,
        policy_epochs=2,
        replicas=2,
        stage3_batch_size=8,
        policy_learning_rate=0.5,
        progress=False,
    )
    result = pipeline.train_pipeline(config, model=new_tiny_model(tokenizer))
    assert [s["stage"] for s in result.stages] == ["stage1", "memorized", "stage2-round1", "stage3-round1"]
    stage2 = load_policy(tmp_path / "run" / "round1" / "stage2")
    assert isinstance(stage2, PerLayerBias) and stage2.shapes["num_layers"] == 4
    # stage 3 trained its one number per layer with the model (a learning rate of 0.5 moves it)
    assert not torch.equal(result.policy.net.bias, stage2.net.bias)
    assert isinstance(load_policy(result.policy_dir), PerLayerBias)
    assert 1 <= result.stages[-1]["dev"]["mean_exit_layer"] <= 4
    # ... and runs batched inference like any other policy
    out = predict(result.model, ["a good film", "a dull plot"], policy=result.policy, max_length=32)
    assert out.exit_layers.tolist() == [out.exit_layers[0]] * 2


def test_the_pipeline_gives_every_learner_one_budget(registry, tokenizer, tiny_data, tmp_path, monkeypatch):
    protocol.register_policy(PerLayerBias.name, PerLayerBias)
    seen = []
    monkeypatch.setattr(PerLayerBias, "fit", lambda self, env, budget: seen.append(budget) or self._ensure(4))
    settings = dict(task="sst2", data_dir=str(tiny_data), max_length=32, train_limit=24, progress=False)
    config = pipeline.PipelineConfig(
        agent=PerLayerBias.name, policy_epochs=3, policy_timesteps=64, **settings
    )
    from ee_gym.envs.table import ExitTable

    rng = np.random.default_rng(0)
    small = ExitTable(
        rng.uniform(-1, 1, (8, 4, 32)).astype(np.float32),
        rng.normal(size=(8, 4, 2)).astype(np.float32),
        rng.integers(0, 2, 8),
        np.ones(8, int),
    )
    pipeline._learn(PerLayerBias(), config, small, seed=7)
    assert seen == [
        TrainingBudget(
            epochs=3,
            total_timesteps=64,
            batch_size=32,
            replicas=8,
            learning_rate=3e-4,
            rollout="sample",
            seed=7,
            progress=False,
        )
    ]


# -- one rollout for REINFORCE, in every stage ----------------------------------------------------
def _stage3(tokenizer, tiny_data, tmp_path, policy, monkeypatch, **overrides):
    """Stage 3 on the tiny model; returns the result and every exit layer its rollouts took."""
    exits = []
    rollout = joint.joint_rollout

    def recording(*args, **kwargs):
        out = rollout(*args, **kwargs)
        exits.extend(out.exit_layer.tolist())
        return out

    monkeypatch.setattr(joint, "joint_rollout", recording)
    settings = dict(
        task="sst2",
        data_dir=str(tiny_data),
        output_dir=str(tmp_path / "stage3"),
        batch_size=8,
        replicas=4,
        max_length=32,
        train_limit=24,
        policy_learning_rate=1e-2,
        progress=False,
    )
    settings.update(overrides)
    model = new_tiny_model(tokenizer)
    result = train_stage3(Stage3Config(**settings), model=model, policy=policy, memorized=np.ones(24, int))
    return result, exits


@pytest.mark.parametrize("obs_mode", ["state+layer", "state+confidence"])
def test_stage3_reinforce_never_exits_below_its_min_layer(
    tokenizer, tiny_data, tmp_path, monkeypatch, obs_mode
):
    policy = agents.make("reinforce", min_layer=3, obs_mode=obs_mode, seed=0)
    result, exits = _stage3(tokenizer, tiny_data, tmp_path, policy, monkeypatch)
    assert len(exits) == 24 * 4 and min(exits) >= 3
    assert result.history[0]["mean_exit_layer"] >= 3
    # inference with the policy stage 3 trained: no exit below 3 either
    with torch.no_grad():
        for head in result.policy.net.layers:
            head[-1].bias.fill_(100.0)  # the networks now say EXIT everywhere
    out = predict(result.model, ["a good film", "fine", "a dull plot"], policy=result.policy, max_length=32)
    assert out.exit_layers.tolist() == [3, 3, 3]


def test_stage3_reads_what_stage2_learned_on(tokenizer, tiny_data, tmp_path, monkeypatch):
    """A state+confidence network reads d + C inputs in both stages (stage 3 once built it for d)."""
    from ee_gym.envs.observations import CONFIDENCE_WIDTH

    policy = agents.make("reinforce", obs_mode="state+confidence", seed=0)
    result, exits = _stage3(tokenizer, tiny_data, tmp_path, policy, monkeypatch)
    assert result.policy.net.state_size == 32 + CONFIDENCE_WIDTH
    assert (
        json.loads((tmp_path / "stage3" / "policy" / "policy.json").read_text())["shapes"]["hidden_size"]
        == 32
    )


def test_the_runner_decides_stage2_and_stage3_alike(tiny_model):
    """The live decider and the table rollout share NetworkExits.decide: the same network, the same
    generator state, the same features give the same exits."""
    policy = agents.make("reinforce", seed=0, min_layer=2)
    decider = policy.joint_decider(tiny_model, replicas=1, generator=torch.Generator().manual_seed(5))
    batch = tiny_model.tokenize(["the film was good", "a bad story", "fine"], max_length=32)
    with torch.no_grad():
        live = run_layers(tiny_model, batch, decider)
        full = tiny_model(**batch).states  # [3, L, d]
    table = NetworkExits(policy.net, 1, "sample", torch.Generator().manual_seed(5), min_layer=2)
    expected, running = np.full(3, 4), np.ones(3, bool)
    for layer in range(1, 5):
        rows = np.flatnonzero(running)
        with torch.no_grad():
            chosen, _ = table.decide(layer, full[rows, layer - 1])
        for row, exits in zip(rows, chosen[:, 0].tolist(), strict=True):
            if exits:
                expected[row], running[row] = layer, False
    assert live.exit_layer.tolist() == expected.tolist()
    assert min(live.exit_layer.tolist()) >= 2
