"""benchmarks.paired: paired bootstrap differences of policies scored on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import compare, paired
from benchmarks.paired import BootstrapSettings, Curve, Outcome, Setup
from ee_gym.tasks import TaskSpec, compute_metrics

L = 12


def _at_layer(layer: int, n: int) -> np.ndarray:
    return np.full(n, layer)


def _known_gap_case(n: int = 200, gap: int = 12):
    """Two policies that share every input's outcome except ``gap`` inputs, where only A is right.

    Both exit at the same layers (runs at 2x and 4x, the faster one worse). About half the inputs are right for both, so an
    unpaired interval carries the dev-set noise of each (about +-7 points) and the 6-point gap drowns,
    while the paired difference only varies with how many of the 12 inputs a replicate draws.
    """
    rng = np.random.default_rng(7)
    shared = rng.random(n) < 0.5  # right for both at 2x
    fewer = shared & (rng.random(n) < 0.8)  # right for both at 4x
    differ = np.flatnonzero(~shared)[:gap]
    a2, a4 = shared.copy(), fewer.copy()
    a2[differ] = a4[differ] = True  # A right, B wrong on exactly these inputs, at both settings
    full = Outcome(rng.random(n) < 0.6, _at_layer(L, n))
    first = Outcome(rng.random(n) < 0.15, _at_layer(1, n))  # far below every run: off their frontiers
    setup = Setup("accuracy", 2, L, None, full, first)
    curve_a = Curve("a", (Outcome(a2, _at_layer(6, n)), Outcome(a4, _at_layer(3, n))))
    curve_b = Curve("b", (Outcome(shared, _at_layer(6, n)), Outcome(fewer, _at_layer(3, n))))
    return setup, curve_a, curve_b, gap / n


def _by_statistic(records):
    return {r["statistic"]: r for r in records}


def test_paired_interval_excludes_zero_where_an_unpaired_one_does_not():
    setup, a, b, gap = _known_gap_case()
    settings = BootstrapSettings(resamples=2000, seed=0)
    pair = _by_statistic(paired.paired_difference(setup, a, b, settings))
    apart = _by_statistic(paired.unpaired_difference(setup, a, b, settings))
    # at 2x and 3x both curves sit on their own runs: the difference is the known 6 points
    for stat in ("metric@2x", "metric@3x"):
        assert pair[stat]["delta"] == pytest.approx(100 * gap)
        assert pair[stat]["low"] > 0, pair[stat]
        assert apart[stat]["low"] < 0 < apart[stat]["high"], apart[stat]
    assert pair["auc"]["delta"] > 0 and pair["auc"]["low"] > 0, pair["auc"]
    assert apart["auc"]["low"] < 0 < apart["auc"]["high"], apart["auc"]
    assert apart["auc"]["delta"] == pytest.approx(pair["auc"]["delta"])  # same point estimate
    for record in pair.values():
        assert set(record) == {"policy", "reference", "statistic", "delta", "low", "high"}
        assert (record["policy"], record["reference"]) == ("a", "b")
        assert record["low"] <= record["delta"] <= record["high"]


def test_a_policy_against_itself_differs_by_exactly_zero_over_inputs_and_seeds():
    rng = np.random.default_rng(3)
    n = 150
    labels = rng.integers(0, 2, n)
    full = Outcome(np.where(rng.random(n) < 0.85, labels, 1 - labels), _at_layer(L, n))
    first = Outcome(rng.integers(0, 2, n), _at_layer(1, n))
    runs = tuple(
        Outcome(np.where(rng.random(n) < 0.8, labels, 1 - labels), rng.integers(1, L + 1, n), seed=s)
        for s in range(3)
        for _ in range(2)
    )
    setup = Setup.for_task("mrpc", L, labels, full, first)
    records, reps = paired.compare_policies(
        setup, [Curve("x", runs), Curve("y", runs)], ["y"], BootstrapSettings(resamples=300)
    )
    assert records and all(r["low"] == r["high"] == r["delta"] == 0 for r in records)
    assert np.ptp(reps.auc["x"]) > 0  # the replicates do move; only the joint draw cancels them
    apart = paired.unpaired_difference(
        setup, Curve("x", runs), Curve("y", runs), BootstrapSettings(resamples=300)
    )
    assert apart[0]["low"] < 0 < apart[0]["high"]


def test_matched_speedups_interpolate_hand_made_curves():
    n = 100
    right = lambda k: np.arange(n) < k  # noqa: E731 - k of the n inputs right
    full = Outcome(right(90), _at_layer(L, n))
    first = Outcome(right(50), _at_layer(1, n))
    setup = Setup("accuracy", 2, L, None, full, first)
    deep = Curve("deep", (Outcome(right(80), _at_layer(6, n)), Outcome(right(70), _at_layer(4, n))))  # 2x, 3x
    shallow = Curve("shallow", (Outcome(right(85), _at_layer(8, n)),))  # only reaches 1.5x
    flat = Curve("full model", (full,), flat=True)
    settings = BootstrapSettings(resamples=200)
    records, reps = paired.compare_policies(setup, [deep, shallow, flat], ["full model", "shallow"], settings)
    # deep's curve: (1, .90) (2, .80) (3, .70) then on to (12, .50)
    assert reps.point_at["deep"] == pytest.approx([0.875, 0.85, 0.80, 0.70])
    # shallow's: (1, .90) (1.5, .85) then straight to (12, .50)
    assert reps.point_at["shallow"][:2] == pytest.approx([0.875, 0.85])
    got = {(r["policy"], r["reference"], r["statistic"]): r for r in records}
    assert got["deep", "full model", "metric@1.5x"]["delta"] == pytest.approx(-5.0)
    assert got["deep", "full model", "metric@3x"]["delta"] == pytest.approx(-20.0)
    assert got["deep", "full model", "auc"]["delta"] == pytest.approx(
        100 * (compare.curve_auc([(2, 0.8), (3, 0.7)], 0.9, 0.5, L) - 0.9)
    )
    # shallow reaches only 1.5x: no matched comparison past it, in either direction
    stats = {r["statistic"] for r in records if "shallow" in (r["policy"], r["reference"])}
    assert stats == {"auc", "metric@1.25x", "metric@1.5x"}
    assert got["deep", "shallow", "metric@1.5x"]["delta"] == pytest.approx(0.0)
    # the full model as a flat line against itself is not compared
    assert not any(r["policy"] == r["reference"] for r in records)


def test_auc_and_frontier_agree_with_the_comparison():
    rng = np.random.default_rng(11)
    for _ in range(200):
        speeds = rng.choice([1, 1.5, 2, 3, 4, 6], 6)  # ties and duplicates on purpose
        metrics = rng.choice([0.5, 0.6, 0.7, 0.8], 6)
        points = [(float(s), float(m)) for s, m in zip(speeds, metrics, strict=True)]
        full, first = float(rng.choice([0.7, 0.8])), float(rng.choice([0.5, 0.6]))
        assert paired.auc_of(points, full, first, L) == pytest.approx(
            compare.curve_auc(points, full, first, L)
        )
        pts = np.asarray(points)
        keep = paired._frontier_mask(pts[None, :, 0], pts[None, :, 1])[0]
        assert sorted(map(tuple, pts[keep].tolist())) == sorted(map(tuple, compare.frontier(points).tolist()))


@pytest.mark.parametrize(
    "metric,labels", [("accuracy", 2), ("f1", 2), ("f1", 3), ("matthews", 2), ("matthews", 3)]
)
def test_resampled_metrics_equal_the_task_scorer(metric, labels):
    rng = np.random.default_rng(5)
    n = 90
    gold = rng.integers(0, labels, n)
    spec = TaskSpec("t", tuple(str(i) for i in range(labels)), metric, ("text",))
    runs = [Outcome(rng.integers(0, labels, n), rng.integers(1, L + 1, n)) for _ in range(3)]
    runs.append(Outcome(np.zeros(n, dtype=int), _at_layer(L, n)))  # constant predictions: F1 / MCC edge
    setup = Setup(metric, labels, L, gold, runs[0])
    idx = rng.integers(0, n, size=(20, n))
    weights = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
    values, speed = paired._score_runs(setup, runs, weights)
    for r, row in enumerate(idx):
        for j, run in enumerate(runs):
            want = compute_metrics(spec, run.predictions[row], gold[row])[metric]
            assert values[r, j] == pytest.approx(want, abs=1e-12)
            assert speed[r, j] == pytest.approx(L / run.exit_layers[row].mean())


def test_resampled_correlation_equals_the_task_scorer():
    """Regression: each replicate's Pearson and Spearman (ties averaged, as scipy ranks them) from
    weighted moments and mid-ranks equal ee_gym.tasks' scorer on the resampled inputs."""
    rng = np.random.default_rng(6)
    n = 80
    gold = rng.integers(0, 11, n) / 2  # a 0-5 score with many ties, as STS-B's
    spec = TaskSpec("t", ("score",), "correlation", ("text",), kind="regression", tolerance=0.5)
    runs = [Outcome(gold + rng.normal(0, s, n), rng.integers(1, L + 1, n)) for s in (0.3, 1.0, 3.0)]
    runs.append(Outcome(np.round(gold + rng.normal(0, 1, n)), rng.integers(1, L + 1, n)))  # tied predictions
    runs.append(Outcome(np.full(n, 2.5), _at_layer(L, n)))  # constant: no correlation, scored 0
    setup = Setup("correlation", 1, L, gold, runs[0])
    idx = rng.integers(0, n, size=(25, n))
    weights = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
    values, speed = paired._score_runs(setup, runs, weights)
    for r, row in enumerate(idx):
        for j, run in enumerate(runs):
            want = compute_metrics(spec, run.predictions[row], gold[row])["correlation"]
            assert values[r, j] == pytest.approx(want, abs=1e-9)
            assert speed[r, j] == pytest.approx(L / run.exit_layers[row].mean())
    with pytest.raises(ValueError, match="finite"):
        paired.compare_policies(setup, [Curve("x", (Outcome(np.full(n, np.nan), _at_layer(L, n)),))], ["x"])


def test_same_seed_same_records_other_seed_other_intervals():
    setup, a, b, _ = _known_gap_case()
    one = paired.paired_difference(setup, a, b, BootstrapSettings(resamples=500, seed=4))
    again = paired.paired_difference(setup, a, b, BootstrapSettings(resamples=500, seed=4))
    other = paired.paired_difference(setup, a, b, BootstrapSettings(resamples=500, seed=5))
    assert one == again
    assert [r["delta"] for r in one] == [r["delta"] for r in other]
    assert [(r["low"], r["high"]) for r in one] != [(r["low"], r["high"]) for r in other]


def test_minimum_detectable_auc_is_the_median_half_width():
    records = [
        {"policy": p, "reference": "best", "statistic": "auc", "delta": 0.0, "low": -w, "high": w}
        for p, w in (("a", 0.2), ("b", 0.4), ("c", 0.9))
    ] + [{"policy": "a", "reference": "best", "statistic": "metric@2x", "delta": 0, "low": -5, "high": 5}]
    assert paired.minimum_detectable_auc(records) == pytest.approx(0.4)
    assert paired.minimum_detectable_auc(records, reference="best") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no paired AUC"):
        paired.minimum_detectable_auc(records, reference="other")
    setup, a, b, _ = _known_gap_case()
    found = paired.minimum_detectable_auc(
        paired.paired_difference(setup, a, b, BootstrapSettings(resamples=300))
    )
    assert 0 < found < 5


def test_mismatched_inputs_fail_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("resampled before checking the inputs")

    monkeypatch.setattr(paired, "_weights", no_work)
    setup, a, b, _ = _known_gap_case(n=200)
    short = Curve("short", (Outcome(np.ones(199, dtype=int), _at_layer(6, 199)),))
    with pytest.raises(ValueError, match=r"short: .*must both be \(200,\)"):
        paired.paired_difference(setup, a, short)
    deep = Curve("deep", (Outcome(np.ones(200, dtype=int), _at_layer(L + 1, 200)),))
    with pytest.raises(ValueError, match="exit layers must lie in 1..12"):
        paired.paired_difference(setup, a, deep)
    with pytest.raises(ValueError, match="distinct"):
        paired.paired_difference(setup, a, a)
    with pytest.raises(ValueError, match="not among the curves"):
        paired.compare_policies(setup, [a, b], ["best rule"])
    labelled = Setup("f1", 2, L, np.zeros(150, dtype=int), setup.full)
    with pytest.raises(ValueError, match="labels have shape"):
        paired.paired_difference(labelled, a, b)
    ids = np.asarray([f"i{k}" for k in range(200)])
    named = Setup("accuracy", 2, L, None, setup.full, ids=ids)
    moved = Curve("moved", (Outcome(np.ones(200, dtype=int), _at_layer(6, 200), ids=np.roll(ids, 1)),))
    with pytest.raises(ValueError, match="moved: the runs' input ids differ first at position 0"):
        paired.paired_difference(named, a, moved)
    with pytest.raises(ValueError, match="differ first at position 2"):
        paired.check_same_inputs(["i0", "i1", "i2"], ["i0", "i1", "x"])
    with pytest.raises(ValueError, match="3 and 2 inputs"):
        paired.check_same_inputs(["i0", "i1", "i2"], ["i0", "i1"])
    with pytest.raises(ValueError, match="resamples"):
        BootstrapSettings(resamples=0)


def test_metric_difference_of_two_settings_at_their_own_exits():
    setup, a, b, gap = _known_gap_case()
    fast_a = Curve("a", (a.runs[0],))  # A at 2x against B at 2x: the known 6-point gap
    record = paired.metric_difference(setup, fast_a, Curve("b", (b.runs[0],)))
    assert record["statistic"] == "metric@2.00x" and record["delta"] == pytest.approx(100 * gap)
    assert 0 < record["low"] <= record["delta"] <= record["high"]
    # against itself, over two seeds: exactly 0 on every replicate
    twice = Curve("a", (Outcome(a.runs[0].predictions, a.runs[0].exit_layers, 0),
                        Outcome(a.runs[0].predictions, a.runs[0].exit_layers, 1)))  # fmt: skip
    same = paired.metric_difference(setup, twice, Curve("b", (a.runs[0],)))
    assert same["delta"] == same["low"] == same["high"] == 0


def test_tie_speedup_is_where_a_curve_stops_keeping_the_full_models_metric():
    """A policy right on every input the full model is right on, exiting at 2x (layer 6 of 12), and
    much worse at 4x: it ties the full model up to 2x (past it, the line towards its 4x run loses on
    inputs every replicate draws some of); a policy worse at once ties only at 1x; a copy of the full
    model at 3x (what oracle-consistent is) ties up to 3x and is not read past its run."""
    n = 400
    rng = np.random.default_rng(5)
    full_right = rng.random(n) < 0.7
    full = Outcome(full_right, _at_layer(L, n))
    first = Outcome(rng.random(n) < 0.3, _at_layer(1, n))
    setup = Setup("accuracy", 2, L, None, full, first)
    bad_4x = full_right & (rng.random(n) < 0.5)
    keeps = Curve("keeps", (Outcome(full_right, _at_layer(6, n)), Outcome(bad_4x, _at_layer(3, n))))
    worse = Curve("worse", (Outcome(full_right & (rng.random(n) < 0.6), _at_layer(11, n)),))
    copy = Curve("copy", (Outcome(full_right, _at_layer(4, n)),))
    flat = Curve("full model", (full,), flat=True)
    ties = paired.tie_speedups(setup, [keeps, worse, copy, flat], settings=BootstrapSettings(resamples=500))
    assert set(ties) == {"keeps", "worse", "copy"}
    assert 2.0 <= ties["keeps"] < 4.0
    assert ties["worse"] == 1.0
    assert ties["copy"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="reference"):
        paired.tie_speedups(setup, [keeps], reference="full model")


def test_a_tie_share_needs_a_ceiling_past_one():
    from benchmarks.paired import tie_share

    assert tie_share({"ppo": 2.0, "oracle-consistent": 4.0}, "ppo") == 0.5
    assert tie_share({"ppo": 2.0}, "ppo") is None
    # a ceiling that ties the full model nowhere past 1x (regression's within-tolerance oracle): no share
    assert tie_share({"ppo": 1.6, "oracle-consistent": 1.0}, "ppo") is None
