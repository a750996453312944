"""Settings chosen on a validation slice (benchmarks/tuning.py) and rules calibrated to a model
(agents.rules.calibrated_rule), on synthetic tables whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

import agents
from agents.evaluate import evaluate
from agents.rules import calibrated_rule
from benchmarks.tuning import choose_learner_settings, validation_auc, validation_split
from ee_gym.envs import ExitTable
from ee_gym.evaluation import curve_anchors
from ee_gym.validation import ConfigError
from tests.test_learned_exit import train_env
from tests.test_reinforce import easy_layer_table


def near_uniform_table(n: int = 400, num_layers: int = 6, seed: int = 0) -> ExitTable:
    """Heads whose top probability never passes 0.6 (a short stage 1), right from layer 3 on: a
    fixed max-prob threshold of 0.9 never fires, and a threshold read off the table does."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    logits = np.zeros((n, num_layers, 2), dtype=np.float32)
    for layer in range(num_layers):
        margin = 0.1 + 0.05 * layer  # top probability about 0.52 to 0.65
        right = layer >= 2
        winner = labels if right else 1 - labels
        logits[np.arange(n), layer, winner] = margin
    states = rng.normal(size=(n, num_layers, 4)).astype(np.float32)
    return ExitTable(states, logits, labels, np.full(n, 3), task="custom", split="train")


def test_a_calibrated_rule_fires_where_the_default_threshold_never_does():
    table = near_uniform_table()
    default = evaluate(agents.make("maxprob"), table)
    assert default.mean_exit_layer == table.num_layers  # the default never fires on these heads
    params = calibrated_rule("maxprob", table)
    tuned = evaluate(agents.make("maxprob", **params), table)
    full, _ = curve_anchors(table)
    assert tuned.score >= full - 0.01 and tuned.mean_exit_layer <= 4.0  # exits early, still right
    with pytest.raises(ConfigError, match="not a rule"):
        calibrated_rule("reinforce", table)


def test_validation_split_partitions_the_rows_with_a_seed():
    table = easy_layer_table(seed=0)
    fit, held = validation_split(table, 0.2, seed=0)
    assert fit.num_inputs + held.num_inputs == table.num_inputs
    assert held.num_inputs == int(np.ceil(0.2 * table.num_inputs))
    rows = {tuple(r) for r in table.states[:, 0]}
    assert {tuple(r) for r in fit.states[:, 0]} | {tuple(r) for r in held.states[:, 0]} == rows
    again = validation_split(table, 0.2, seed=0)[1]
    np.testing.assert_array_equal(again.labels, held.labels)


def test_the_search_keeps_the_candidate_with_the_best_validation_auc(monkeypatch):
    from agents.learned_exit import LearnedExit

    table = easy_layer_table(seed=0)
    fit, held = validation_split(table)
    # two candidates: the defaults and a crippled one (one epoch at a tiny learning rate)
    monkeypatch.setattr(LearnedExit, "candidates", (({}, {"epochs": 1, "learning_rate": 1e-6}), ({}, {})))
    choice = choose_learner_settings("learned-exit", fit, held, alpha=0.1, reward="hardness", sweep_points=6)
    aucs = [c["validation_auc"] for c in choice.candidates]
    assert choice.chosen == int(np.argmax(aucs)) == 1 and aucs[1] > aucs[0]
    assert choice.budget == {} and choice.to_dict()["chosen"] == 1
    trained = agents.make("learned-exit").learn(train_env(fit), progress=False)
    assert validation_auc(trained, held, 6) == pytest.approx(aucs[1], abs=0.05)
