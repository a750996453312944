"""benchmarks.stage3 end to end on a tiny model: the search, the kept settings, the paired verdicts."""

from __future__ import annotations

import json

import pytest
from conftest import new_tiny_model

from benchmarks import stage3
from ee_gym.protocols import get_protocol
from ee_gym.tasks import load_split
from ee_gym.validation import ConfigError


def test_the_validation_tail_is_left_out_of_stage_3(tiny_data):
    paper = stage3.plan_splits("rte", get_protocol("paper"), str(tiny_data))  # 64 train rows
    assert (paper.fit_rows, paper.validation, paper.stage3) == (52, "train[52:64]", "train[0:52]")
    assert paper.seen_by_stage1
    held = stage3.plan_splits("rte", get_protocol("held-out"), str(tiny_data))  # stage 1: rows 0..56
    assert held.validation == "train[63:64]" and held.stage3 == "train[0:57]" and not held.seen_by_stage1
    carved = stage3.plan_splits("rte", get_protocol("cross-fit,eval=25%"), str(tiny_data))
    assert (carved.validation, carved.stage3) == ("train[39:48]", "train[0:39]")
    for splits in (paper, held, carved):
        tail = set(load_split("rte", splits.validation, str(tiny_data)).text_a)
        assert not tail & set(load_split("rte", splits.stage3, str(tiny_data)).text_a)
    # a slice of the policy split: stage 3 trains on it without its tail, not on the whole stage-1 split
    part = stage3.plan_splits("rte", get_protocol("paper,eval=25%"), str(tiny_data), "train[:20]")
    assert (part.fit_rows, part.validation, part.stage3) == (16, "train[16:20]", "train[0:16]")
    with pytest.raises(ConfigError, match="shares 8 inputs with 'train\\[75%:\\]'"):
        stage3.plan_splits("rte", get_protocol("paper,eval=25%"), str(tiny_data), "train[40:56]")
    for bad in ("1e-5", "x:1", "1e-5:0", ""):
        with pytest.raises(ConfigError, match="candidate|learning_rate:epochs|no stage-3"):
            stage3.parse_candidates(bad)


def test_stage3_benchmark_writes_its_search_and_paired_verdicts(tokenizer, tiny_data, tmp_path):
    model = new_tiny_model(tokenizer, task="rte")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "stage3"
    argv = [
        "--task", "rte", "--model", str(tmp_path / "model"), "--data-dir", str(tiny_data), "--protocol", "paper",
        "--candidates", "1e-3:1,5e-4:1", "--seeds", "2", "--no-tune", "--batch-size", "8", "--replicas", "2",
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    assert stage3.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert [(c["learning_rate"], c["epochs"]) for c in record["search"]] == [(1e-3, 1), (5e-4, 1)]
    best = max(record["search"], key=lambda c: (c["validation"]["metric"], c["validation"]["speedup"]))
    assert record["kept"] == {"learning_rate": best["learning_rate"], "epochs": best["epochs"]}
    assert [s["seed"] for s in record["seeds"]] == [0, 1]
    saved = json.loads((out / "runs" / "lr0.001-epochs1-seed0" / "config.json").read_text())
    assert saved["train_split"] == "train[0:52]"  # stage 3 never trains on the validation tail
    assert len(record["paired"]) == 3
    for item in record["paired"]:
        assert set(item) == {"policy", "reference", "statistic", "delta", "low", "high"}
        assert item["statistic"].startswith("metric@") and item["low"] <= item["delta"] <= item["high"]
    assert "stage 3 against the full-depth stage-1 model" in (out / "results.md").read_text()
    # a re-run reuses the finished stage-3 runs and gives the same numbers
    assert stage3.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["paired"] == record["paired"]


def test_stage3_on_a_subset_reads_the_carved_split_then_dev(tokenizer, tiny_data, tmp_path):
    model = new_tiny_model(tokenizer, task="rte")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "stage3"
    argv = [
        "--task", "rte", "--model", str(tmp_path / "model"), "--data-dir", str(tiny_data),
        "--protocol", "paper,eval=25%", "--policy-split", "train[:32]", "--candidates", "1e-3:1", "--no-tune",
        "--batch-size", "8", "--replicas", "2", "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    assert stage3.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    saved = json.loads((out / "runs" / "lr0.001-epochs1-seed0" / "config.json").read_text())
    assert saved["train_split"] == "train[0:26]" and record["splits"]["validation"] == "train[26:32]"
    assert record["evaluation"] == "train[75%:]" and record["dev_inputs"] == 16
    assert record["dev"]["split"] == "dev" and len(record["dev"]["paired"]) == 3
    page = (out / "results.md").read_text()
    assert "Paired differences on `train[75%:]`" in page and "Paired differences on `dev`" in page
