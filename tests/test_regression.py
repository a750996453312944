"""Regression tasks (STS-B): the loss, metric, memorized layer, reward and PABEE's regression rule by
hand-worked values; what refuses a one-output head; user files with a numeric label."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import agents
from agents.evaluate import evaluate
from ee_gym import tasks
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.hardness import memorized_layer
from ee_gym.multiexit import MultiExitModel
from ee_gym.rewards import hardness
from ee_gym.targets import Target
from ee_gym.tasks import REGRESSION_HEAD_LEARNING_RATE, compute_metrics, get_task, load_split, task_from_files
from ee_gym.training import Stage1Config, _warn_if_heads_miss_the_scale, train_stage1, weighted_exit_loss
from ee_gym.validation import ConfigError
from tests.conftest import tiny_bert_config

STSB = get_task("stsb")


def test_stsb_is_a_builtin_regression_task():
    assert STSB.is_regression and STSB.num_labels == 1 and STSB.metric == "correlation"
    assert STSB.tolerance == 0.5 and STSB.env_name == "STSB"


def test_regression_heads_learn_at_their_own_rate_by_default():
    # at the backbone's rate a regression head never reaches the label scale (tasks.REGRESSION_HEAD_LEARNING_RATE)
    assert Stage1Config(task="stsb").resolved().head_learning_rate == REGRESSION_HEAD_LEARNING_RATE
    assert Stage1Config(task="stsb", head_learning_rate=2e-4).resolved().head_learning_rate == 2e-4
    assert Stage1Config(task="rte").resolved().head_learning_rate is None  # classification: the backbone's


def test_heads_that_miss_the_label_scale_are_reported():
    labels = np.array([1.0, 3.0], dtype=np.float32)  # variance 1
    config = Stage1Config(task="stsb").resolved()
    with pytest.warns(UserWarning, match="raise head_learning_rate"):
        _warn_if_heads_miss_the_scale({"epoch": 1, "train_loss": 1.5}, labels, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_heads_miss_the_scale({"epoch": 1, "train_loss": 0.5}, labels, config)
        _warn_if_heads_miss_the_scale({"epoch": 1, "train_loss": 9.0}, np.array([0, 1]), config)  # class ids


def test_depth_weighted_squared_error_by_hand():
    logits = torch.tensor([[[1.0], [4.0]]])  # one input, two layers, one output
    labels = torch.tensor([2.0])
    # squared errors 1 and 4, weighted by depth 1 and 2: (1 * 1 + 2 * 4) / 3 = 3
    assert float(weighted_exit_loss(logits, labels)) == pytest.approx(3.0)


def test_correlation_metric_by_hand():
    metrics = compute_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    pearson = 6.5 / np.sqrt(5.0 * 8.75)  # covariance 6.5, variances 5 and 8.75 (sums of squares)
    assert metrics["pearson"] == pytest.approx(pearson) and metrics["spearman"] == pytest.approx(1.0)
    assert metrics["correlation"] == pytest.approx((pearson + 1.0) / 2)
    assert next(iter(metrics)) == "correlation"  # the headline first
    assert metrics["accuracy"] == pytest.approx(0.75)  # within 0.5: three of four
    assert metrics["mse"] == pytest.approx(0.25)
    assert compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["correlation"] == 0.0  # constant
    with pytest.raises(ValueError, match="finite"):
        compute_metrics("stsb", [np.nan, 1.0], [1.0, 2.0])


def test_memorized_layer_within_the_tolerance():
    target = Target(tolerance=0.5)
    predictions = np.array([[3.0, 1.9, 2.2, 2.4], [2.0, 2.1, 3.0, 2.0], [2.0, 2.0, 2.0, 3.0]])
    labels = np.array([2.0, 2.0, 2.0])
    # right from layer 2 on; wrong at layer 3 (so m = 4); last head wrong (m = L)
    assert memorized_layer(predictions, labels, target).tolist() == [2, 4, 4]
    assert Target.of_task("stsb") == target and not Target.of_task("rte").regression


def regression_table(values: np.ndarray, labels: np.ndarray, d: int = 4) -> ExitTable:
    n, num_layers = values.shape
    states = np.random.default_rng(0).uniform(-1, 1, (n, num_layers, d)).astype(np.float32)
    memorized = memorized_layer(values, labels, Target.of_task("stsb"))
    return ExitTable(
        states, values[..., None].astype(np.float32), labels, memorized, task="stsb", split="dev"
    )


def test_the_table_pays_squared_error_and_the_hardness_reward_by_hand():
    table = regression_table(np.array([[3.0, 1.9, 2.2, 2.4]]), np.array([2.0]))
    np.testing.assert_allclose(table.cross_entropy[0], [1.0, 0.01, 0.04, 0.16], atol=1e-6)
    assert table.correct[0].tolist() == [False, True, True, True] and table.memorized[0] == 2
    env = ConsistentEEVectorEnv(
        1, table=table, split="dev", reward="hardness", alpha=0.1, obs_mode="state+layer"
    )
    env.reset(options={"index": np.array([0])})
    env.step(np.array([0]))  # continue at layer 1
    _, reward, done, _, info = env.step(np.array([1]))  # exit at layer 2
    assert done[0] and info["final_info"]["exit_layer"][0] == 2
    # R = -SE - alpha * t * (1 - m / L) = -0.01 - 0.1 * 2 * (1 - 2 / 4)
    assert reward[0] == pytest.approx(-0.01 - 0.1 * 2 * 0.5, abs=1e-6)
    assert reward[0] == pytest.approx(hardness(0.01, True, 2, 2, 4, 0.1), abs=1e-6)
    assert info["final_info"]["prediction"][0] == pytest.approx(1.9)


def test_pabee_regression_patience_by_hand():
    # |z_l - z_(l-1)|: -, 0.05, 0.03, 0.92: with threshold 0.1 and patience 2 the run ends at layer 3
    table = regression_table(np.array([[1.0, 1.05, 1.08, 2.0], [1.0, 2.0, 3.0, 4.0]]), np.array([1.0, 4.0]))
    rule = agents.make("patience", patience=2, threshold=0.1)
    result = evaluate(rule, table)
    assert result.exit_layers.tolist() == [3, 4]
    assert evaluate(agents.make("patience", patience=1, threshold=0.04), table).exit_layers.tolist() == [3, 4]
    sweep = type(rule).sweep(4, num_labels=1)
    assert {"patience": 1, "threshold": 0.5} in sweep and all("threshold" in p for p in sweep)
    assert all("threshold" not in p for p in type(rule).sweep(4))  # classification: patience only


def test_oracle_consistent_agrees_within_the_tolerance_on_regression():
    # STS-B's tolerance is 0.5: the first layer within 0.5 of the last layer's value (not of the label)
    values = np.array([[3.0, 2.0, 2.2, 2.4], [0.0, 4.0, 4.6, 4.1], [1.0, 3.0, 3.0, 5.0]])
    table = regression_table(values, np.array([2.0, 0.0, 5.0]))
    assert evaluate(agents.make("oracle-consistent"), table).exit_layers.tolist() == [2, 2, 4]
    assert evaluate(agents.make("oracle"), table).exit_layers.tolist() == [2, 1, 4]  # the label's


def test_rules_that_read_a_softmax_refuse_a_regression_head():
    table = regression_table(np.array([[1.0, 1.5, 2.0, 2.0]]), np.array([2.0]))
    for name in ("maxprob", "entropy", "normentropy", "top2gap", "pcee"):
        with pytest.raises(ConfigError, match="regression"):
            evaluate(agents.make(name), table)
    assert evaluate(agents.make("static", layer=2), table).exit_layers.tolist() == [2]
    with pytest.raises(ConfigError, match="top-2 gap"):
        ConsistentEEVectorEnv(1, table=table, split="dev", obs_mode="state+confidence")


def test_user_files_with_a_numeric_label_declare_regression(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the tasks made here stay here
    lines = ["text\tscore"] + [f"sentence number {i}\t{i / 4:.2f}" for i in range(12)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="kind='regression'"):
        task_from_files("scores", train=tmp_path / "train.tsv", text_columns="text", label_column="score")
    spec = task_from_files("scores", train=tmp_path / "train.tsv", text_columns="text", label_column="score",
                           kind="regression", tolerance=0.25)  # fmt: skip
    assert spec.is_regression and spec.labels == ("score",) and spec.metric == "correlation"
    examples = load_split("scores", "train")
    assert examples.labels.dtype == np.float32 and examples.labels[-1] == pytest.approx(2.75)
    (tmp_path / "bad.tsv").write_text("text\tscore\nfine\t1.0\nbroken\tnot-a-number\n")
    with pytest.raises(ValueError, match="not a finite number"):
        task_from_files("bad", train=tmp_path / "bad.tsv", text_columns="text", label_column="score",
                        kind="regression", tolerance=0.25)  # fmt: skip
    with pytest.raises(ValueError, match="tolerance"):
        task_from_files("notol", train=tmp_path / "train.tsv", text_columns="text", label_column="score",
                        kind="regression")  # fmt: skip


def write_tiny_stsb(root, n: int = 64):
    """A GLUE-layout STS-B folder whose 0-5 score is in the words (learnable by a tiny model)."""
    lines = ["index\tsentence1\tsentence2\tscore"]
    rng = np.random.default_rng(0)
    for i in range(n):
        score = float(rng.integers(0, 6))
        word = "good" if score >= 3 else "bad"
        lines.append(f"{i}\tit was {word} {'very ' * int(score)}\tsaid {word}\t{score:.1f}")
    folder = root / "glue" / "STS-B"
    folder.mkdir(parents=True)
    for split in ("train", "dev"):
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_stage1_learns_a_tiny_regression_task(tokenizer, tmp_path):
    write_tiny_stsb(tmp_path / "data")
    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(tiny_bert_config(), num_labels=1, tokenizer=tokenizer, task="stsb")
    config = Stage1Config(task="stsb", data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "run"),
                          epochs=6, batch_size=8, learning_rate=3e-3, max_length=32, warmup_ratio=0.0,
                          progress=False)  # fmt: skip
    result = train_stage1(config, model=model)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    last = result.history[-1]["dev"][-1]
    assert set(last) == {"correlation", "pearson", "spearman", "accuracy", "mse"}
    assert last["correlation"] > 0.5  # the score is in the words: a tiny model finds it


def test_learners_train_on_a_regression_table():
    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 5, 64)
    # heads converge on the label with depth: layer l is off by (4 - l) / 2 points, plus noise
    values = labels[:, None] + (np.arange(4, 0, -1)[None, :] - 1) / 2 * rng.choice([-1, 1], (64, 1))
    table = regression_table(values + rng.normal(0, 0.05, values.shape), labels)
    for name, budget in (
        ("reinforce", {"epochs": 2}),
        ("learned-exit", {}),
        ("ppo", {"total_timesteps": 256}),
    ):
        policy = agents.make(name)
        env = ConsistentEEVectorEnv(8, table=table, split="train", obs_mode=policy.obs_mode, final_obs=False)
        policy.learn(env, **budget, progress=False)
        result = evaluate(policy, table)
        assert result.exit_layers.min() >= 1 and result.exit_layers.max() <= 4
        assert "correlation" in result.metrics


def test_the_comparison_runs_a_regression_task_with_the_rules_that_fit(tokenizer, tmp_path, monkeypatch):
    import json

    from benchmarks import compare

    with pytest.raises(ConfigError, match="maxprob read the heads' softmax"):
        compare.CompareArgs(task="stsb", agents="static,maxprob").resolved()
    assert compare.CompareArgs(task="stsb").resolved().agents == compare.REGRESSION_AGENTS
    monkeypatch.setenv("EE_GYM_HOME", str(tmp_path / "home"))
    data = write_tiny_stsb(tmp_path / "data")
    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(tiny_bert_config(), num_labels=1, tokenizer=tokenizer, task="stsb")
    model.save_pretrained(tmp_path / "model")
    argv = [
        "--task", "stsb", "--model", str(tmp_path / "model"), "--data-dir", str(data),
        "--agents", "reinforce,learned-exit,patience,static,oracle", "--seeds", "1", "--alpha-scales", "1",
        "--rewards", "hardness", "--reward-variants", "", "--sweep-points", "3", "--wall-limit", "4",
        "--wall-repeat", "1", "--wall-batch-size", "4", "--output-dir", str(tmp_path / "out"), "--no-progress",
    ]  # fmt: skip
    assert compare.main(argv) == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["metric"] == "correlation" and record["best_rule"] in {"patience", "static"}
    assert {r["label"] for r in record["table"]} >= {"reinforce", "learned-exit", "patience", "static"}
    assert all(p["low"] <= p["delta"] <= p["high"] for p in record["paired"])
    # reinforce's state+confidence candidate cannot read a regression head: not tried
    modes = [c["params"].get("obs_mode") for c in record["tuning"]["learners"]["reinforce"]["candidates"]]
    assert "state+confidence" not in modes
