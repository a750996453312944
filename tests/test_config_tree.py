"""One configuration tree and one protocol (issue 16, items 1 and 2).

The run's shared setup reaches every stage, the CLI is generated from the nested dataclasses, every
per-task default is read from the task's spec, and the protocol picks the same stage-1 model and
policy split in ``gym.make``, ``ee-gym train``, ``ee-gym predict`` and ``policy_tables``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from ee_gym import cli, pipeline, tasks, training
from ee_gym.config import RunSetup, config_dict
from ee_gym.joint import Stage3Config
from ee_gym.pipeline import PipelineConfig, PolicyTraining
from ee_gym.protocols import DEFAULT_PROTOCOL, POLICY_PROTOCOLS, PROTOCOLS, get_protocol
from ee_gym.tasks import TaskDefaults, TaskSpec, task_default
from ee_gym.training import Stage1Config, default_stage1_dir
from ee_gym.validation import ConfigError
from tests.conftest import new_tiny_model, tiny_bert_config


# -- the tree ------------------------------------------------------------------------------------
def test_pipeline_config_holds_its_stages_and_one_shared_setup():
    config = PipelineConfig(
        task="sst2",
        seed=7,
        train_limit=20,
        protocol="paper",
        stage1=Stage1Config(epochs=2),
        stage2=PolicyTraining(batch_size=4),
        stage3=Stage3Config(learning_rate=1e-5),
    )
    assert isinstance(config, RunSetup)
    stage1 = pipeline._stage1_config(config, None)
    stage3 = pipeline._stage3_config(config, None, 2)
    # the setup reaches every stage; nothing is copied by hand
    assert (stage1.task, stage1.seed, stage1.train_limit, stage1.epochs) == ("sst2", 7, 20, 2)
    assert (stage3.task, stage3.train_limit, stage3.learning_rate, stage3.seed) == ("sst2", 20, 1e-5, 9)
    # the protocol decides the splits: stage 1 and stage 3's model loss on its stage-1 split
    assert stage1.train_split == stage3.train_split == "train"
    held_out = dataclasses.replace(config, protocol="held-out")
    assert pipeline._stage1_config(held_out, None).train_split == "train[:90%]"
    assert pipeline._stage3_config(held_out, None, 1).train_split == "train[:90%]"
    # a stage's own value of a shared setting, where set, wins for that stage
    own = dataclasses.replace(config, stage3=Stage3Config(train_limit=5))
    assert pipeline._stage3_config(own, None, 1).train_limit == 5
    assert pipeline._stage1_config(own, None).train_limit == 20


def test_config_json_describes_the_whole_run_nested():
    data = config_dict(PipelineConfig(task="sst2", protocol="paper", stage1=Stage1Config(epochs=2)))
    assert data["protocol"] == "paper" and data["task"] == "sst2"
    assert data["stage1"]["epochs"] == 2 and data["stage2"]["batch_size"] == 32
    assert data["stage3"]["learning_rate"] == 2e-5
    # the sections hold only their own settings: no second task, split or folder to disagree with
    for section in ("stage1", "stage2", "stage3"):
        assert not {"task", "train_split", "output_dir", "protocol", "seed"} & set(data[section])
    json.dumps(data)


def test_the_flat_keywords_of_earlier_releases_still_work_and_warn():
    with pytest.warns(DeprecationWarning, match="stage1.epochs"):
        config = PipelineConfig(stage1_epochs=2, policy_batch_size=4, replicas=3, stage3_train_limit=9)
    assert config.stage1.epochs == 2 and config.stage2.batch_size == 4
    assert config.stage2.replicas == config.stage3.replicas == 3 and config.stage3.train_limit == 9
    with pytest.warns(DeprecationWarning):
        again = dataclasses.replace(config, stage3_learning_rate=1e-4)
    assert again.stage3.learning_rate == 1e-4 and again.stage1.epochs == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match="stage3_batch_size"):
            PipelineConfig(stage3_batch_size=0)
        both = PipelineConfig(rollout="threshold", separate_replicas=True)  # go together: one replace
    assert both.stage3.rollout == "threshold" and both.stage3.separate_replicas


def test_bad_values_anywhere_in_the_tree_are_refused():
    for bad in ({"protocol": "nope"}, {"seed": -1}, {"stage2": "x"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PipelineConfig(**bad)
    with pytest.raises(ConfigError, match="rollout"):
        PolicyTraining(rollout="foo")
    with pytest.raises(ConfigError, match="protocol 'nope'.*'paper'"):
        get_protocol("nope")


# -- the CLI ------------------------------------------------------------------------------------
def test_nested_cli_flags_parse_into_the_nested_config(monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "train_pipeline", lambda config: seen.append(config) or _Done())
    argv = ["train", "--task", "sst2", "--protocol", "paper", "--stage1.epochs", "2"]
    argv += ["--stage1.head-learning-rate", "1e-4", "--stage2.timesteps", "64", "--stage3.learning-rate"]
    argv += ["1e-5", "--stage3.separate-replicas", "--no-progress"]
    assert cli.main(argv) == 0
    config = seen[0]
    assert (config.task, config.protocol, config.progress) == ("sst2", "paper", False)
    assert (config.stage1.epochs, config.stage1.head_learning_rate) == (2, 1e-4)
    assert config.stage2.timesteps == 64
    assert config.stage3.learning_rate == 1e-5 and config.stage3.separate_replicas is True
    # the earlier flat flags still reach the same fields
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert cli.main(["train", "--stage1-epochs", "3", "--policy-epochs", "4", "--no-progress"]) == 0
    assert (seen[1].stage1.epochs, seen[1].stage2.epochs, seen[1].protocol) == (3, 4, DEFAULT_PROTOCOL)
    # every section field is an option; the setup's are not repeated per section
    options = cli.build_parser()._subparsers._group_actions[0].choices["train"]._option_string_actions
    assert {"--stage1.warmup-ratio", "--stage3.max-grad-norm", "--stage2.rollout", "--protocol"} <= set(
        options
    )
    assert not {"--stage1.task", "--stage3.train-split", "--stage1.output-dir"} & set(options)


class _Done:
    model_dir, policy_dir, stages = "m", "p", []


def test_ee_gym_train_records_its_protocol(tokenizer, tiny_data, tmp_path, capsys):
    folder = tmp_path / "stage1-model"
    new_tiny_model(tokenizer, task="sst2", labels=["negative", "positive"]).save_pretrained(folder)
    run = tmp_path / "run"
    argv = ["train", "--task", "sst2", "--protocol", "held-out", "--data-dir", str(tiny_data)]
    argv += ["--stage1-model", str(folder), "--output-dir", str(run), "--max-length", "32"]
    argv += ["--train-limit", "16", "--dev-limit", "8", "--stage2.batch-size", "4"]
    argv += ["--stage2.replicas", "2", "--stage3.replicas", "2", "--stage3.batch-size", "4", "--no-progress"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (run / "pipeline.jsonl").read_text().splitlines()]
    stage1 = records[0]
    assert stage1["stage"] == "stage1" and stage1["protocol"] == "held-out"
    assert (stage1["train_split"], stage1["policy_split"]) == POLICY_PROTOCOLS["held-out"]
    assert records[1]["policy_split"] == "train[90%:]"
    saved = json.loads((run / "config.json").read_text())
    assert saved["protocol"] == "held-out" and saved["stage2"]["batch_size"] == 4
    # the resume check reads the nested config.json: another stage setting is refused by name
    assert cli.main([*argv, "--stage3.learning-rate", "1e-3"]) == 2
    assert "stage3.learning_rate" in capsys.readouterr().err


# -- the protocol --------------------------------------------------------------------------------
def test_one_protocol_definition_read_everywhere():
    from ee_gym.envs import prepare

    assert prepare.POLICY_PROTOCOLS is POLICY_PROTOCOLS and prepare.POLICY_PROTOCOL == DEFAULT_PROTOCOL
    assert set(PROTOCOLS) == {"paper", "held-out", "cross-fit"} and DEFAULT_PROTOCOL == "paper"
    assert RunSetup().protocol == PipelineConfig().protocol == DEFAULT_PROTOCOL
    assert pipeline.default_run_dir("rte", "minilm-l6", "ppo").name == "rte-minilm-l6-ppo"
    assert (
        pipeline.default_run_dir("rte", "minilm-l6", "ppo", "held-out").name == "rte-minilm-l6-ppo-held-out"
    )


def _tiny_backbone(monkeypatch, tokenizer, counter: list):
    """Stage 1 from the default backbone builds a tiny random model instead, and counts its steps."""
    original = training.MultiExitModel.from_backbone

    def tiny(backbone, **kwargs):
        torch.manual_seed(0)
        return original(tiny_bert_config(), tokenizer=tokenizer, **kwargs)

    monkeypatch.setattr(training.MultiExitModel, "from_backbone", tiny)
    real_loss = training.weighted_exit_loss

    def counted(*args):
        counter.append(1)
        return real_loss(*args)

    monkeypatch.setattr(training, "weighted_exit_loss", counted)


def test_gym_make_after_the_main_jobs_stage1_trains_nothing_new(tokenizer, tiny_data, monkeypatch):
    from ee_gym.envs.prepare import policy_tables

    steps: list = []
    _tiny_backbone(monkeypatch, tokenizer, steps)
    train, dev = policy_tables("sst2", "paper", data_dir=str(tiny_data), progress=False)  # the main job
    assert steps and train.split == "train"
    checkpoints = sorted(p.name for p in (default_stage1_dir("sst2", "minilm-l6").parent).iterdir())
    steps.clear()
    env = gym.make("ConsistentEE-SST2-v0", data_dir=str(tiny_data), progress=False)
    venv = gym.make_vec("ConsistentEE-SST2-v0", num_envs=4, data_dir=str(tiny_data), progress=False)
    assert steps == []  # no stage-1 step ran: the main job's model is used
    assert sorted(p.name for p in default_stage1_dir("sst2", "minilm-l6").parent.iterdir()) == checkpoints
    for table in (env.unwrapped.table, venv.unwrapped.table):
        assert table.split == "train"  # the default protocol's policy split
        np.testing.assert_array_equal(table.logits, train.logits)  # the same model's outputs
    held = gym.make("ConsistentEE-SST2-v0", data_dir=str(tiny_data), progress=False, protocol="held-out")
    assert steps and held.unwrapped.table.split == "train[90%:]"  # held-out has its own model


def test_predict_finds_the_protocols_stage1_model(tokenizer, tiny_data, tmp_path, capsys):
    folder = default_stage1_dir("sst2", "minilm-l6", get_protocol("paper").stage1_split) / "model"
    new_tiny_model(tokenizer, task="sst2").save_pretrained(folder)
    argv = ["predict", "--task", "sst2", "--data-dir", str(tiny_data), "--limit", "4", "--max-length", "32"]
    assert cli.main(argv) == 0  # the default protocol's model: found
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert cli.main([*argv, "--protocol", "held-out"]) == 2  # no held-out model was trained
    assert "stage1" in capsys.readouterr().err


# -- per-task defaults ------------------------------------------------------------------------
def test_every_per_task_default_is_read_from_the_spec(tokenizer, monkeypatch):
    from ee_gym.envs.prepare import default_max_length
    from ee_gym.rewards import default_alpha

    assert training.TASK_DEFAULTS["sst2"] == {
        "learning_rate": 3e-5,
        "epochs": 1,
        "max_length": 64,
        "batch_size": 32,
    }
    own = TaskDefaults(learning_rate=1e-4, epochs=7, max_length=40, batch_size=5, alpha=0.07)
    spec = dataclasses.replace(tasks.get_task("sst2"), defaults=own)
    monkeypatch.setitem(tasks._REGISTRY, tasks._key("sst2"), spec)  # restored after the test
    resolved = Stage1Config(task="sst2").resolved()
    assert (resolved.learning_rate, resolved.epochs, resolved.max_length, resolved.batch_size) == (
        1e-4,
        7,
        40,
        5,
    )
    assert task_default("sst2", "max_length") == default_max_length("sst2") == 40
    assert PipelineConfig(task="sst2").resolved_max_length() == 40
    model = new_tiny_model(tokenizer, task="sst2")
    assert Stage3Config(task="sst2").resolved(model).max_length == 40
    assert default_alpha("sst2", 12) == pytest.approx(0.07)
    assert default_alpha("sst2", model.num_layers) == pytest.approx(0.07 * 12 / 4)
    # a spec carried as plain data (a user task's env id) keeps its defaults
    again = tasks.task_spec_from_dict(tasks.task_spec_to_dict(spec))
    assert again.defaults == own and isinstance(again, TaskSpec)
