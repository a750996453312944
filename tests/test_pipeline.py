"""The whole method: stage 1, memorized layer, rounds of (stage 2, stage 3); resume; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents.reinforce import Reinforce
from ee_gym import pipeline
from ee_gym.multiexit import MultiExitModel
from tests.conftest import new_tiny_model


def _pipeline(tokenizer, tiny_data, output_dir, **overrides):
    model = new_tiny_model(tokenizer)
    settings = dict(
        task="sst2",
        data_dir=str(tiny_data),
        output_dir=str(output_dir),
        rounds=1,
        max_length=32,
        train_limit=24,
        dev_limit=16,
        stage1_epochs=1,
        stage1_learning_rate=5e-3,
        stage1_batch_size=8,
        policy_batch_size=8,
        replicas=2,
        stage3_batch_size=8,
        stage3_learning_rate=5e-3,
        progress=False,
    )
    settings.update(overrides)
    return pipeline.train_pipeline(pipeline.PipelineConfig(**settings), model=model)


def test_pipeline_runs_every_stage_and_resumes_after_the_last_finished(
    tokenizer, tiny_data, tmp_path, monkeypatch
):
    run = tmp_path / "run"

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # undone at the end of the block; EE_GYM_HOME stays set
        patch.setattr(pipeline, "train_stage3", die)
        with pytest.raises(KeyboardInterrupt):
            _pipeline(tokenizer, tiny_data, run)
    stages = [json.loads(line)["stage"] for line in (run / "pipeline.jsonl").read_text().splitlines()]
    assert stages == ["stage1", "memorized", "stage2-round1"]

    monkeypatch.setattr(Reinforce, "learn", die)  # stage 2 is finished: not run again
    result = _pipeline(tokenizer, tiny_data, run)
    assert [s["stage"] for s in result.stages] == ["stage1", "memorized", "stage2-round1", "stage3-round1"]
    assert 1 <= result.stages[-1]["dev"]["mean_exit_layer"] <= 4
    assert result.model_dir == run / "round1" / "stage3" / "model"
    assert MultiExitModel.from_pretrained(result.model_dir).fingerprint() == result.model.fingerprint()
    assert np.load(run / "memorized.npy").shape == (24,)
    again = _pipeline(tokenizer, tiny_data, run)  # everything finished: nothing runs
    assert again.stages == result.stages


def test_pipeline_with_an_sb3_agent_retrains_it_each_round_and_holds_it_in_stage_3(
    tokenizer, tiny_data, tmp_path
):
    from agents.base import load_policy

    result = _pipeline(tokenizer, tiny_data, tmp_path / "run", agent="ppo", rounds=2, policy_timesteps=512)
    assert [s["stage"] for s in result.stages] == [
        "stage1",
        "memorized",
        "stage2-round1",
        "stage3-round1",
        "stage2-round2",
        "stage3-round2",
    ]
    round1 = load_policy(tmp_path / "run" / "round1" / "stage2")
    held = load_policy(tmp_path / "run" / "round1" / "stage3" / "policy")
    round2 = load_policy(tmp_path / "run" / "round2" / "stage2")
    weights = [p.model.policy.state_dict() for p in (round1, held, round2)]
    for name in weights[0]:  # stage 3 holds the agent fixed...
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)
    assert any(not torch.equal(weights[0][n], weights[2][n]) for n in weights[0])  # ...stage 2 retrains it
    stage3 = json.loads(
        (tmp_path / "run" / "round1" / "stage3" / "metrics.jsonl").read_text().splitlines()[0]
    )
    assert stage3["policy_loss"] == 0.0
    for record in result.stages[2:]:
        assert 1 <= record["dev"]["mean_exit_layer"] <= 4


def test_cli_train_builds_the_pipeline_config(monkeypatch):
    from ee_gym import cli

    seen = []
    monkeypatch.setattr(pipeline, "train_pipeline", lambda config: seen.append(config) or _Done())
    argv = ["train", "--task", "rte", "--agent", "ppo", "--rounds", "2", "--train-limit", "5"]
    assert cli.main([*argv, "--no-progress"]) == 0
    config = seen[0]
    assert (config.task, config.agent, config.rounds, config.train_limit, config.progress) == (
        "rte",
        "ppo",
        2,
        5,
        False,
    )


class _Done:
    model_dir, policy_dir = "m", "p"
    stages = [
        {
            "stage": "stage3-round1",
            "dev": {"accuracy": 1.0, "mean_exit_layer": 2.0, "speedup": 3.0, "full_depth": {"accuracy": 0.5}},
        }
    ]
