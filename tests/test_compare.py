"""benchmarks.compare end to end on a tiny model and synthetic data: table, plot and JSON agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import compare
from ee_gym.validation import ConfigError
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


def _run(label, metric, speedup, val_metric, val_speedup, default=False, policy="p", params=None):
    return compare.Run(label, policy, "rule", params or {}, metric, {"accuracy": metric}, 4 / speedup,
                       1 - 1 / speedup, speedup, default, validation_metric=val_metric,
                       validation_speedup=val_speedup)  # fmt: skip


def _anchors(full=0.6, first=0.5):
    return [_run("full model", full, 1.0, full, 1.0, True, "static", {"layer": 4}),
            _run("static", first, 4.0, first, 4.0, True, "static", {"layer": 1})]  # fmt: skip


def test_curves_are_chosen_on_the_validation_slice_and_read_on_dev():
    runs = _anchors() + [
        _run("p", 0.70, 1.5, 0.62, 1.5),  # on the validation frontier
        _run("p", 0.40, 2.0, 0.61, 2.0),  # on it too: dev's poor value stays on the curve
        _run("p", 0.90, 1.8, 0.55, 1.7),  # beaten on validation by (2.0, 0.61): off, however good on dev
        _run("p", 0.45, 3.0, 0.45, 3.0),  # below layer 1's validation metric: off
        _run("p", 0.30, 1.2, 0.30, 1.2, default=True),  # the operating point is always on the curve
    ]
    compare.choose_curves(runs)
    assert [r.on_curve for r in runs if r.label == "p"] == [True, True, False, False, True]
    rows, anchors = compare.summarise(runs, 4, {})
    auc = next(row["auc"] for row in rows if row["label"] == "p")
    # the full model reads as a flat line at its metric, as the paired statistics read it
    assert next(row["auc"] for row in rows if row["label"] == "full model") == pytest.approx(0.6)
    chosen = [(1.5, 0.70), (2.0, 0.40), (1.2, 0.30)]
    assert auc == pytest.approx(compare.curve_auc(chosen, 0.6, 0.5, 4, frontier=False))
    assert auc < compare.curve_auc(
        [(r.speedup, r.metric) for r in runs[2:]], 0.6, 0.5, 4
    )  # dev frontier: higher


def test_choosing_on_validation_removes_the_many_settings_bias():
    # K settings of one policy with the same true accuracy; the dev frontier's AUC grows with K (it
    # keeps the luckiest draws), the validation-chosen curve read on dev does not
    rng = np.random.default_rng(0)
    n, truth = 300, 0.6

    def mean_aucs(k: int) -> tuple[float, float]:
        on_dev, chosen = [], []
        for _ in range(200):
            speedups = np.linspace(1.1, 2.0, k)
            dev, val = rng.binomial(n, truth, (2, k)) / n
            runs = _anchors(truth, 0.5) + [
                _run("p", d, s, v, s, default=i == 0)
                for i, (d, v, s) in enumerate(zip(dev, val, speedups, strict=True))
            ]
            compare.choose_curves(runs)
            rows, _ = compare.summarise(runs, 4, {})
            chosen.append(next(row["auc"] for row in rows if row["label"] == "p"))
            on_dev.append(compare.curve_auc(list(zip(speedups, dev, strict=True)), truth, 0.5, 4))
        return float(np.mean(on_dev)), float(np.mean(chosen))

    few, many = mean_aucs(3), mean_aucs(40)
    # measured: the dev frontier reads 61.6 with 3 settings and 65.3 with 40 (truth 60); chosen on
    # validation, 60.0 and 60.1 (standard error of each mean about 0.1)
    assert few[0] > truth + 0.01 and many[0] - few[0] > 0.02  # optimism, growing with the settings
    assert abs(few[1] - truth) < 0.005 and abs(many[1] - truth) < 0.005  # the chosen reading: none


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
    # the curves hold the runs the validation slice chose (and every default), read on dev
    assert record["fit_inputs"] + record["validation_inputs"] == record["policy_inputs"]
    for label, points in record["curves"].items():
        mine = [r for r in record["runs"] if r["label"] == label]
        assert all(r["validation_metric"] is not None for r in mine)
        assert all(r["on_curve"] for r in mine if r["default"])
        assert sorted(points) == sorted([r["speedup"], 100 * r["metric"]] for r in mine if r["on_curve"])
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
    # how far each curve keeps the full model's metric: 1x at least, oracle-consistent at its own run
    ties = record["tie_speedups"]
    assert set(ties) == labels - {"full model"} and all(1.0 <= t <= 4.0 for t in ties.values())
    oracle_consistent = next(r for r in record["runs"] if r["label"] == "oracle-consistent")
    assert ties["oracle-consistent"] == pytest.approx(oracle_consistent["speedup"], abs=0.05)
    assert any("keeps the full model's metric" in claim for claim in record["claims"])
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

    # a page per folder: the same task on another backbone is a column of its own, after the task's
    for name, task in (("sst2", "sst2"), ("rte", "rte"), ("rte-mpnet-base", "rte")):
        folder = tmp_path / "all" / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({**record, "task": task}))
    assert summary.main(["--results", str(tmp_path / "all")]) == 0
    page = (tmp_path / "all" / "README.md").read_text()
    main_table, ties_table = page.split("How far each policy goes at the full model's metric")
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "mean rank" not in line]
    tie_rows = {line.split("|")[1].strip(): line for line in ties_table.splitlines() if line.startswith("| ")}
    assert f"{record['tie_speedups']['oracle-consistent']:.2f}x (1.00)" in tie_rows["oracle-consistent"]
    deployable = {r["label"] for r in record["table"] if r["deployable"] and r["label"] != "full model"}
    assert {line.split("|")[1].strip() for line in rows} == deployable | {"full model (metric)"}
    assert "| policy | rte | rte-mpnet-base | sst2 | mean rank |" in page
    assert "[rte-mpnet-base](rte-mpnet-base/results.md)" in page
    assert (tmp_path / "all" / "summary.png").stat().st_size > 10_000
    assert summary.main(["--results", str(tmp_path / "nothing")]) == 2
    # a page written to a folder that does not exist yet: made, with its plot beside it
    assert (
        summary.main(["--results", str(tmp_path / "all"), "--output", str(tmp_path / "new" / "page.md")]) == 0
    )
    assert (tmp_path / "new" / "summary.png").is_file()

    # the protocol page reads the same records: one table per learner, one row per folder given
    from benchmarks import protocols

    assert protocols.main([str(out), str(out), "--output", str(tmp_path / "protocols.md")]) == 0
    text = (tmp_path / "protocols.md").read_text()
    assert "**reinforce**" in text and "**learned-exit**" in text
    # two records of one protocol (stage 1's spread: the same protocol on two stage-1 models) are told
    # apart by their model's fingerprint
    label = f"{record['protocol']}, model {record['model_fingerprint']}"
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 2 * len({r["label"] for r in record["table"] if r["kind"] == "learner"})
    best = next(r["auc"] for r in record["table"] if r["label"] == record["best_rule"])
    assert f"{label} {record['best_rule']} {100 * best:.1f}" in text


def test_a_carved_evaluation_split_is_read_first_and_dev_second(tokenizer, tiny_data, tmp_path):
    model = new_tiny_model(tokenizer, task="sst2")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "results"
    argv = [
        "--task", "sst2", "--model", str(tmp_path / "model"), "--data-dir", str(tiny_data),
        "--protocol", "paper,eval=25%", "--agents", "reinforce,entropy,static", "--seeds", "1",
        "--alpha-scales", "1", "--sweep-points", "3", "--no-tune", "--wall-limit", "4", "--wall-repeat", "1",
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    assert compare.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["evaluation"] == "train[75%:]" and record["policy_split"] == "train[:75%]"
    assert record["dev_inputs"] == 16 and record["policy_inputs"] == 48  # 64 train rows, carved 48 / 16
    second = record["dev"]
    assert second["inputs"] == 32 and isinstance(second["mde_auc"], float)
    assert set(second["auc"]) == {row["label"] for row in record["table"]}
    # each run's own dev numbers, same setting; the curve points were chosen once, on validation
    run = next(r for r in record["runs"] if r["label"] == "entropy" and r["default"])
    assert set(run["dev"]) >= {"metric", "speedup"} and run["on_curve"]
    assert len(second["curves"]["entropy"]) == len(record["curves"]["entropy"])
    assert "## The same runs on dev" in (out / "results.md").read_text()


def test_an_interrupted_comparison_resumes_where_it_stopped(tokenizer, tiny_data, tmp_path, monkeypatch):
    """The journal keeps every finished planned run: a second start tunes nothing, trains only what
    was left, and writes the results an uninterrupted comparison writes."""
    import agents.__main__ as agents_main
    from benchmarks.journal import Journal

    monkeypatch.setenv("EE_GYM_HOME", str(tmp_path / "home"))
    new_tiny_model(tokenizer, task="sst2").save_pretrained(tmp_path / "model")
    argv = [
        "--task", "sst2", "--model", str(tmp_path / "model"), "--data-dir", str(tiny_data),
        "--agents", "reinforce,learned-exit,entropy,static", "--seeds", "1", "--alpha-scales", "1,2",
        "--rewards", "hardness", "--reward-variants", "", "--sweep-points", "3", "--wall-limit", "4",
        "--wall-repeat", "1", "--wall-batch-size", "4", "--no-progress",
    ]  # fmt: skip
    assert compare.main([*argv, "--output-dir", str(tmp_path / "whole")]) == 0

    record, finished = Journal.record, []

    def dies_on_the_fourth(self, index, runs, policy=None):
        if len(finished) == 3:
            raise KeyboardInterrupt
        finished.append(index)
        record(self, index, runs, policy)

    monkeypatch.setattr(Journal, "record", dies_on_the_fourth)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        compare.main([*argv, "--output-dir", str(out)])
    assert (out / compare.JOURNAL_NAME).is_file() and not (out / "results.json").exists()

    monkeypatch.setattr(Journal, "record", record)
    monkeypatch.setattr(compare, "choose_settings", lambda *a, **k: pytest.fail("tuned again on resume"))
    trained, train_policy = [], agents_main.train_policy
    monkeypatch.setattr(
        agents_main, "train_policy", lambda name, *a, **k: trained.append(name) or train_policy(name, *a, **k)
    )
    assert compare.main([*argv, "--output-dir", str(out)]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    planned_learners = sum(
        1 for r in whole["runs"] if r["kind"] == "learner" and "exit_threshold" not in r["params"]
    )
    done_learners = sum(1 for i in finished if compare.plan_runs(compare.parse_args(argv).resolved(), 4,
                        compare.Settings.from_dict(whole["tuning"]))[i].kind == "learner")  # fmt: skip
    assert len(trained) == planned_learners - done_learners  # the finished ones were not trained again
    key = ("label", "params", "metric", "speedup", "seed", "alpha_scale", "default", "on_curve")
    assert [[r[k] for k in key] for r in resumed["runs"]] == [[r[k] for k in key] for r in whole["runs"]]
    assert [(r["label"], r["auc"]) for r in resumed["table"]] == [
        (r["label"], r["auc"]) for r in whole["table"]
    ]
    assert len(finished) == 3
    assert (resumed["resumed_runs"], whole["resumed_runs"]) == (3, 0)  # says its time is one leg's
    # the journal of a finished comparison is kept as runs.jsonl, never resumed by itself ...
    assert not (out / compare.JOURNAL_NAME).exists() and (out / "runs.jsonl").is_file()
    # ... but --rescore reads every run back from it: no training, no tuning, the same numbers
    monkeypatch.setattr(
        agents_main, "train_policy", lambda *a, **k: pytest.fail("trained a policy on --rescore")
    )
    assert compare.main([*argv, "--output-dir", str(out), "--rescore"]) == 0
    rescored = json.loads((out / "results.json").read_text())
    assert [[r[k] for k in key] for r in rescored["runs"]] == [[r[k] for k in key] for r in whole["runs"]]
    assert rescored["paired"] == resumed["paired"] and rescored["resumed_runs"] == len(
        compare.plan_runs(compare.parse_args(argv).resolved(), 4, compare.Settings.from_dict(whole["tuning"]))
    )
    # refused before any work: nothing to rescore, or runs of other settings (left as they are)
    with pytest.raises(ConfigError, match="runs.jsonl"):
        compare.main([*argv, "--output-dir", str(tmp_path / "empty"), "--rescore"])
    other = [
        *argv[: argv.index("--alpha-scales")],
        "--alpha-scales",
        "1",
        *argv[argv.index("--alpha-scales") + 2 :],
    ]
    before = (out / "runs.jsonl").read_text()
    with pytest.raises(ConfigError, match="other settings"):
        compare.main([*other, "--output-dir", str(out), "--rescore"])
    assert (out / "runs.jsonl").read_text() == before


def test_a_finished_journal_is_kept_until_a_comparison_starts_afresh(tmp_path):
    from benchmarks.journal import COMPLETE_NAME, Journal

    journal = Journal.open(tmp_path / "runs.partial.jsonl", {"args": {"seeds": 1}})
    journal.start({"learners": {}, "rules": {}})
    journal.record(0, [{"label": "x"}])
    journal.finish()
    assert (tmp_path / COMPLETE_NAME).is_file() and not journal.path.exists()
    again = Journal.open(tmp_path / "runs.partial.jsonl", {"args": {"seeds": 1}})
    assert again.done(0) is None  # never resumed by itself
    again.start({"learners": {}, "rules": {}})  # a fresh start: the old runs go with their policies
    assert not (tmp_path / COMPLETE_NAME).exists()


def test_a_journal_of_other_settings_is_not_resumed(tmp_path):
    from benchmarks.journal import Journal

    journal = Journal.open(tmp_path / "j.jsonl", {"args": {"seeds": 1}})
    journal.start({"learners": {}, "rules": {}})
    journal.record(0, [{"label": "x"}])
    again = Journal.open(tmp_path / "j.jsonl", {"args": {"seeds": 1}})
    assert again.done(0) == {"runs": [{"label": "x"}], "policy": None} and again.settings == {
        "learners": {},
        "rules": {},
    }
    other = Journal.open(tmp_path / "j.jsonl", {"args": {"seeds": 2}})
    assert other.done(0) is None and other.settings is None and "starting over" in other.note
    with (tmp_path / "j.jsonl").open("a") as handle:  # a run cut off mid-write: run again
        handle.write('{"item": 1, "run": {"lab')
    assert Journal.open(tmp_path / "j.jsonl", {"args": {"seeds": 2}}).done(1) is None


def test_the_summary_states_stage_one_noise_beside_the_verdicts(tmp_path):
    """Fold models' spread and a second stage-1 seed of the page's protocol, read from protocols/."""
    from benchmarks import summary

    def record(fingerprint: str, protocol: str, delta: float, full: float, spread=None) -> dict:
        return {
            "task": "sst2", "protocol": protocol, "model_fingerprint": fingerprint, "best_rule": "entropy",
            "stage1_spread": spread,
            "table": [
                {"label": "full model", "kind": "reference", "metric": full, "auc": full},
                {"label": "entropy", "kind": "rule", "metric": 0.9, "auc": 0.9},
                {"label": "reinforce", "kind": "learner", "metric": 0.9, "auc": 0.9 + delta / 100},
            ],
            "paired": [{"policy": "reinforce", "reference": "entropy", "statistic": "auc", "delta": delta,
                        "low": delta - 0.2, "high": delta + 0.2}],
        }  # fmt: skip

    page = record("aaaa", "paper", 0.1, 0.917)
    protocols = tmp_path / "protocols" / "sst2"
    for name, rec in {
        "paper": page,  # the page's own model: nothing to say
        "paper-seed7": record("bbbb", "paper", -0.3, 0.912),
        "held-out": record("cccc", "held-out", -0.5, 0.915),  # another protocol: not stage-1 noise
        "cross-fit": record("aaaa", "cross-fit", 0.0, 0.917, {"std": 1.0, "text": "fold models 87.2, 88.0"}),
    }.items():
        (protocols / name).mkdir(parents=True)
        (protocols / name / "results.json").write_text(json.dumps(rec))
    lines = summary.stage1_noise(tmp_path, {"sst2": page})
    assert lines[0] == "- sst2 (cross-fit): fold models 87.2, 88.0."
    assert len(lines) == 2 and "`bbbb`" in lines[1] and "held-out" not in lines[1]
    assert "full model 91.7 -> 91.2" in lines[1]
    assert "reinforce +0.1 [-0.1, +0.3] -> -0.3 [-0.5, -0.1]" in lines[1]
    assert summary.stage1_noise(tmp_path / "none", {"sst2": page}) == []
