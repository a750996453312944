"""The classic exit rules and the oracles: hand-worked exits on a tiny table, brute force on a random one."""

from __future__ import annotations

import numpy as np
import pytest

import agents
from agents.evaluate import evaluate, run_policy
from agents.oracles import Oracle, OracleConsistent
from agents.rules import (
    PCEE,
    Entropy,
    MaxProb,
    NormalizedEntropy,
    Patience,
    Static,
    Top2Gap,
    infer_dims,
)
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.envs.observations import stats_features

RULES = ["static", "entropy", "normentropy", "maxprob", "top2gap", "patience", "pcee"]
ORACLES = ["oracle", "oracle-consistent"]


def make_table(logits: np.ndarray, labels: np.ndarray) -> ExitTable:
    n, num_layers, _ = logits.shape
    return ExitTable(
        states=np.zeros((n, num_layers, 4), np.float32),
        logits=logits,
        labels=labels,
        memorized=np.full(n, num_layers),
        split="dev",
    )


# 3 inputs x 4 layers x 3 classes, logits = log p. Per layer (1..4):
#   p                                      H (nats)  H/log3  max   gap   argmax
# input 0, label 1
#   .5 .3 .2 | .6 .3 .1 | .2 .7 .1 | .95 .03 .02
#            H 1.030 .898 .802 .232 | H/log3 .937 .817 .730 .211 | max .5 .6 .7 .95 | gap .2 .3 .5 .92 | 0 0 1 0
# input 1, label 1
#   .2 .45 .35 | .1 .8 .1 | .05 .92 .03 | .1 .6 .3
#            H 1.049 .639 .332 .898 | H/log3 .955 .582 .302 .817 | max .45 .8 .92 .6 | gap .1 .7 .87 .3 | 1 1 1 1
# input 2, label 2
#   .34 .33 .33 | .3 .3 .4 | .1 .2 .7 | .2 .1 .7
#            H 1.099 1.089 .802 .802 | H/log3 1.0 .991 .730 .730 | max .34 .4 .7 .7 | gap .01 .1 .5 .5 | 0 2 2 2
PROBS = np.array(
    [
        [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.95, 0.03, 0.02]],
        [[0.2, 0.45, 0.35], [0.1, 0.8, 0.1], [0.05, 0.92, 0.03], [0.1, 0.6, 0.3]],
        [[0.34, 0.33, 0.33], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.2, 0.1, 0.7]],
    ]
)
PREDS = np.array([[0, 0, 1, 0], [1, 1, 1, 1], [0, 2, 2, 2]])
LABELS = np.array([1, 1, 2])

HAND_WORKED = [
    (Static(), [2, 2, 2]),  # ceil(4 / 2)
    (Static(layer=1), [1, 1, 1]),
    (Static(layer=3), [3, 3, 3]),
    (Static(layer=9), [4, 4, 4]),  # beyond L: exits at L
    (Entropy(threshold=0.7), [4, 2, 4]),
    (Entropy(threshold=0.9), [2, 2, 3]),
    (NormalizedEntropy(threshold=0.6), [4, 2, 4]),
    (NormalizedEntropy(threshold=0.75), [3, 2, 3]),
    (MaxProb(threshold=0.75), [4, 2, 4]),
    (MaxProb(threshold=0.65), [3, 2, 3]),
    (Top2Gap(threshold=0.45), [3, 2, 3]),
    (Top2Gap(threshold=0.6), [4, 2, 4]),
    (Patience(patience=1), [2, 2, 3]),  # first layer agreeing with the one before
    (Patience(patience=2), [4, 3, 4]),  # input 0: 0 0 1 0 never has 3 agreeing in a row
    (Patience(patience=3), [4, 4, 4]),
    (PCEE(patience=1, threshold=0.75), [3, 2, 3]),  # = normalized entropy 0.75
    (PCEE(patience=2, threshold=0.75), [4, 3, 4]),  # confident: [F F T T] [F T T F] [F F T T]
    (PCEE(patience=2, threshold=0.85), [3, 3, 4]),  # confident: [F T T T] [F T T T] [F F T T]
    (Oracle(), [3, 1, 2]),  # first correct head
    (OracleConsistent(), [1, 1, 2]),  # first head agreeing with layer 4
]


@pytest.fixture(scope="module")
def hand_table() -> ExitTable:
    return make_table(np.log(PROBS), LABELS)


@pytest.fixture(scope="module")
def random_table() -> ExitTable:
    rng = np.random.default_rng(0)
    n, num_layers, k = 200, 6, 3
    labels = rng.integers(k, size=n)
    drift = np.linspace(0.0, 3.0, num_layers)[None, :, None] * np.eye(k)[labels][:, None, :]
    return make_table(rng.normal(0.0, 1.5, (n, num_layers, k)) + drift, labels)


@pytest.mark.parametrize(
    "policy, expected", HAND_WORKED, ids=lambda x: repr(x) if not isinstance(x, list) else ""
)
def test_hand_worked_exits(hand_table, policy, expected):
    for batch_size in (3, 2):  # 2: the second batch runs in a fresh env
        layers, predictions = run_policy(policy, hand_table, batch_size=batch_size)
        np.testing.assert_array_equal(layers, expected)
        np.testing.assert_array_equal(predictions, PREDS[np.arange(3), layers - 1])
    result = evaluate(policy, hand_table)
    np.testing.assert_array_equal(result.exit_layers, expected)
    assert result.metrics["accuracy"] == pytest.approx(
        np.mean(PREDS[np.arange(3), result.exit_layers - 1] == LABELS)
    )
    assert result.mean_exit_layer == pytest.approx(np.mean(expected))


def test_thresholds_at_the_boundary():
    # layer 1: p = (.5, .5) exactly; layer 2: p = (1, 0) exactly (exp(-200) underflows), entropy 0
    table = make_table(np.array([[[0.0, 0.0], [0.0, -200.0], [0.0, 0.0]]]), np.array([0]))

    def layer(policy):
        return int(run_policy(policy, table)[0][0])

    assert layer(MaxProb(threshold=0.5)) == 1  # >=
    assert layer(MaxProb(threshold=0.5001)) == 2
    assert layer(MaxProb(threshold=1.0)) == 2
    assert layer(Top2Gap(threshold=0.0)) == 1  # >=
    assert layer(Top2Gap(threshold=1e-6)) == 2
    assert layer(Top2Gap(threshold=1.0)) == 2
    assert layer(NormalizedEntropy(threshold=0.0)) == 3  # strict <: entropy 0 is not < 0
    assert layer(NormalizedEntropy(threshold=1e-6)) == 2
    assert layer(Entropy(threshold=0.0)) == 3
    assert layer(Entropy(threshold=1e-6)) == 2
    assert layer(PCEE(patience=1, threshold=0.0)) == 3
    assert layer(PCEE(patience=2, threshold=1e-6)) == 3  # only layer 2 is confident


def test_entropy_is_in_nats(hand_table):
    # H(.2 .45 .35) = 1.049 nats = 0.955 normalized: a threshold of 1.0 reads nats for one, a fraction for the other
    assert run_policy(Entropy(threshold=1.0), hand_table)[0][1] == 2
    assert run_policy(NormalizedEntropy(threshold=0.96), hand_table)[0][1] == 1
    assert run_policy(Entropy(threshold=1.06), hand_table)[0][1] == 1


def test_act_without_bind_infers_dims(hand_table):
    env = ConsistentEEVectorEnv(num_envs=3, table=hand_table, split="dev", obs_mode="stats")
    obs, _ = env.reset(options={"index": np.arange(3)})
    bound = MaxProb(threshold=0.45)
    bound.bind(env)
    unbound = MaxProb(threshold=0.45)
    np.testing.assert_array_equal(unbound.act(obs), bound.act(obs))
    assert unbound.act(obs[1]).shape == ()  # one observation -> one action
    assert bound.act(obs).dtype == np.int64
    # width 50 (S + 2 = 52) fits (L, K) = (12, 2), (3, 11) and (1, 24): only the contents tell
    rng = np.random.default_rng(1)
    stats = stats_features(rng.normal(size=(5, 12, 2)), 12).reshape(-1, 50)
    assert infer_dims(stats) == (12, 2)
    with pytest.raises(ValueError, match="bind"):
        Patience().act(np.zeros((2, 50), np.float32))


def test_oracles_need_bind(hand_table):
    with pytest.raises(RuntimeError, match="bind"):
        Oracle().act(np.zeros((3, 23), np.float32))


def test_oracles_match_brute_force(random_table):
    table = random_table
    num_layers = table.num_layers
    first_correct = np.array(
        [next((j + 1 for j in range(num_layers) if row[j]), num_layers) for row in table.correct]
    )
    first_final = np.array([1 + list(row).index(row[-1]) for row in table.predictions])

    layers, predictions = run_policy(Oracle(), table, batch_size=64)
    np.testing.assert_array_equal(layers, first_correct)
    oracle_acc = np.mean(predictions == table.labels)
    for k in range(1, num_layers + 1):
        assert oracle_acc >= np.mean(table.correct[:, k - 1])
    assert oracle_acc == pytest.approx(np.mean(table.correct.any(1)))

    layers, predictions = run_policy(OracleConsistent(), table, batch_size=64)
    np.testing.assert_array_equal(layers, first_final)
    np.testing.assert_array_equal(predictions, table.predictions[:, -1])


@pytest.mark.parametrize("name", RULES + ORACLES)
def test_make_save_load(name, tmp_path, random_table):
    policy = agents.make(name)
    assert policy.name == name and policy.obs_mode == "stats"
    assert policy.deployable is (name in RULES)
    sweep = type(policy).sweep(6) if name in RULES else [{}]
    assert sweep
    configured = agents.make(name, **sweep[len(sweep) // 2])
    loaded = agents.load_policy(configured.save(tmp_path / name))
    assert type(loaded) is type(configured) and loaded.get_params() == configured.get_params()
    np.testing.assert_array_equal(
        run_policy(loaded, random_table)[0], run_policy(configured, random_table)[0]
    )


def test_static_and_patience_sweeps_follow_num_layers():
    assert Static.sweep(6) == [{"layer": k} for k in range(1, 7)]
    assert Patience.sweep(6) == [{"patience": p} for p in range(1, 6)]


@pytest.mark.parametrize("cls", [Static, Entropy, NormalizedEntropy, MaxProb, Top2Gap, Patience, PCEE])
def test_sweeps_are_monotone(cls, random_table):
    """Along a sweep (for PCEE: within each patience) the mean exit layer never falls."""
    groups: dict[int, list[float]] = {}
    for kwargs in cls.sweep(random_table.num_layers):
        means = groups.setdefault(kwargs.get("patience", 0) if cls is PCEE else 0, [])
        means.append(run_policy(cls(**kwargs), random_table)[0].mean())
    for means in groups.values():
        assert np.all(np.diff(means) >= 0), means
        assert means[-1] > means[0]


def test_pcee_sweep_spans_the_normalized_entropy_range():
    """pcee's sweep reaches confident-only exits (H / log K near 1, max prob near 1/K) down to the
    strictest, earliest exits first: a sweep stopping at 0.5 left a 12-layer curve at 1.27x."""
    from agents.rules import PCEE

    thresholds = [setting["threshold"] for setting in PCEE.sweep(12, 2) if setting["patience"] == 1]
    assert max(thresholds) >= 0.9 and min(thresholds) <= 0.05
    assert thresholds == sorted(thresholds, reverse=True)
