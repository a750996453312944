"""benchmarks.compare end to end on a tiny model and synthetic data: table, plot and JSON agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import compare
from tests.conftest import new_tiny_model


def test_auc_reads_the_frontier_between_its_anchors():
    # full model 0.8 at 1x, layer 1 at 0.5 (L = 4); one point (2x, 0.8): flat to 2x, then down to L
    auc = compare.curve_auc([(2.0, 0.8)], full=0.8, first_layer=0.5, num_layers=4)
    assert auc == pytest.approx(0.8)  # the range 1x..L/2 = 1x..2x lies on the flat part
    worse = compare.curve_auc([(1.5, 0.6)], full=0.8, first_layer=0.5, num_layers=4)
    grid = np.linspace(1, 2, 101)
    assert worse == pytest.approx(np.interp(grid, [1, 1.5, 4], [0.8, 0.6, 0.5]).mean())
    dominated = compare.curve_auc([(1.5, 0.6), (1.2, 0.55)], full=0.8, first_layer=0.5, num_layers=4)
    assert dominated == pytest.approx(worse)  # (1.2, 0.55) is beaten by (1.5, 0.6)
    assert compare.frontier([(1, 0.5), (2, 0.7), (3, 0.6), (2.5, 0.4)]).tolist() == [[2, 0.7], [3, 0.6]]


def test_mean_ci_brackets_the_mean():
    mean, low, high = compare.mean_ci([0.5, 0.6, 0.7])
    assert low <= mean <= high and mean == pytest.approx(0.6)
    assert np.isnan(compare.mean_ci([0.5])[1])
    assert compare.mean_ci([0.4, 0.4]) == (0.4, 0.4, 0.4)


def test_compare_writes_a_table_a_plot_and_json_that_agree(tokenizer, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EE_GYM_HOME", str(tmp_path / "home"))
    model = new_tiny_model(tokenizer, task="sst2")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "results"
    argv = [
        "--task", "sst2", "--model", str(tmp_path / "model"), "--data-dir", str(tiny_data),
        "--agents", "reinforce,ppo,learned-exit,entropy,static,oracle,oracle-consistent", "--seeds", "2",
        "--alpha-scales", "1,2", "--rewards", "hardness,plain", "--sb3-timesteps", "256", "--sweep-points", "4",
        "--wall-limit", "8", "--wall-repeat", "1", "--wall-batch-size", "4",
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    assert compare.main(argv) == 0

    record = json.loads((out / "results.json").read_text())
    args = compare.CompareArgs(seeds=2, alpha_scales="1,2", rewards="hardness,plain",
                               agents="reinforce,ppo,learned-exit,entropy,static,oracle,oracle-consistent")  # fmt: skip
    planned = [r for r in record["runs"] if "exit_threshold" not in r["params"]]
    assert len(planned) == compare.count_runs(args, 4)
    # learned-exit ignores the price: one training per seed, at the default price, under one reward
    assert sorted(r["seed"] for r in planned if r["policy"] == "learned-exit") == [0, 1]
    # every trained sweeping learner adds its threshold sweep (same seed and price) to its curve
    for run in planned:
        if run["policy"] in ("reinforce", "ppo", "learned-exit"):
            swept = [
                r for r in record["runs"]
                if "exit_threshold" in r["params"] and (r["label"], r["seed"], r["alpha_scale"])
                == (run["label"], run["seed"], run["alpha_scale"])
            ]  # fmt: skip
            assert 2 <= len(swept) <= 5 and not any(r["default"] for r in swept)
            layers = [
                r["mean_exit_layer"] for r in sorted(swept, key=lambda r: r["params"]["exit_threshold"])
            ]
            assert layers == sorted(layers)  # a higher threshold never exits earlier
    labels = {row["label"] for row in record["table"]}
    by_label_auc = {row["label"]: row["auc"] for row in record["table"]}
    assert labels == {"reinforce", "reinforce (plain)", "ppo", "learned-exit", "entropy", "static", "oracle",
                      "oracle-consistent", "full model"}  # fmt: skip
    assert record["command"].startswith("python -m benchmarks.compare --task sst2")
    # the results contract: paired differences of every curve to the best rule and the full model
    assert isinstance(record["protocol"], str) and isinstance(record["mde_auc"], float)
    assert set(record["curves"]) == labels
    assert all(len(point) == 2 for points in record["curves"].values() for point in points)
    best = record["best_rule"]
    assert best in {"entropy", "static"}
    for item in record["paired"]:
        assert set(item) == {"policy", "reference", "statistic", "delta", "low", "high"}
        assert item["reference"] in {best, "full model"} and item["policy"] != item["reference"]
        assert item["statistic"] == "auc" or item["statistic"].startswith("metric@")
        assert item["low"] <= item["delta"] <= item["high"]
    aucs = {(p["policy"], p["reference"]): p["delta"] for p in record["paired"] if p["statistic"] == "auc"}
    assert "Minimum detectable AUC difference" in (out / "results.md").read_text()
    assert aucs["ppo", best] == pytest.approx(100 * (by_label_auc["ppo"] - by_label_auc[best]))
    assert "torch" in record["versions"]
    assert not (out / "runs.partial.jsonl").exists()  # the run log goes once results.json is written
    assert compare._json_value(np.float32(0.5)) == 0.5 and compare._json_value(dict) == "builtins.dict"

    # every table row of results.md carries the JSON's numbers
    lines = (out / "results.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| policy | setting"))
    table = [line for line in lines[start + 2 :] if line.startswith("| ")]
    table = table[
        : next((i for i, line in enumerate(lines[start + 2 :]) if not line.startswith("| ")), len(table))
    ]
    # what the validation slice chose is on the page and in the JSON, for every learner and rule
    assert set(record["tuning"]["learners"]) == {"reinforce", "ppo", "learned-exit"}
    assert set(record["tuning"]["rules"]) == {"entropy", "static"}
    for choice in record["tuning"]["learners"].values():
        assert 0 <= choice["chosen"] < len(choice["candidates"]) >= 1
        assert all(np.isfinite(c["validation_auc"]) for c in choice["candidates"])
    assert "## Settings chosen on the validation slice" in "\n".join(lines)
    assert len(table) == len(record["table"])
    by_label = {row["label"]: row for row in record["table"]}
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = by_label[cells[0].removesuffix(" (reference)")]
        assert cells[2] == f"{100 * row['metric']:.1f}"
        assert cells[5] == f"{row['speedup']:.2f}x"
        assert cells[8] == f"{100 * row['auc']:.1f}"
        assert (cells[6] == "") == (row["wall_speedup"] is None)
    # learners: the table's metric is the mean over seeds of the default-price runs
    runs = [r for r in record["runs"] if r["label"] == "ppo" and r["default"]]
    assert len(runs) == 2 and by_label["ppo"]["metric"] == pytest.approx(np.mean([r["metric"] for r in runs]))
    assert by_label["oracle"]["wall_speedup"] is None and by_label["entropy"]["wall_speedup"] > 0

    import matplotlib.image

    image = matplotlib.image.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200

    # the summary page reads the same contract: one row per deployable policy, one column per task
    from benchmarks import summary

    for task in ("sst2", "rte"):
        folder = tmp_path / "all" / task
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({**record, "task": task}))
    assert summary.main(["--results", str(tmp_path / "all")]) == 0
    page = (tmp_path / "all" / "README.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and "mean rank" not in line]
    deployable = {r["label"] for r in record["table"] if r["deployable"] and r["label"] != "full model"}
    assert {line.split("|")[1].strip() for line in rows} == deployable | {"full model (metric)"}
    assert "| policy | rte | sst2 | mean rank |" in page or "| policy | sst2 | rte | mean rank |" in page
    assert (tmp_path / "all" / "summary.png").stat().st_size > 10_000
    assert summary.main(["--results", str(tmp_path / "nothing")]) == 2

    # the protocol page reads the same records: one table per learner, one row per folder given
    from benchmarks import protocols

    assert protocols.main([str(out), str(out), "--output", str(tmp_path / "protocols.md")]) == 0
    text = (tmp_path / "protocols.md").read_text()
    assert "**reinforce**" in text and "**learned-exit**" in text
    rows = [line for line in text.splitlines() if line.startswith(f"| {record['protocol']} |")]
    assert len(rows) == 2 * len({r["label"] for r in record["table"] if r["kind"] == "learner"})
