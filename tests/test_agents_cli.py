"""`python -m agents`: train and score policies on one task, end to end on a tiny model."""

from __future__ import annotations

import json

import agents
from agents.__main__ import main


def test_every_registered_name_makes_a_policy_with_no_arguments():
    for name in agents.names():
        assert agents.make(name).name == name


def test_table_and_json_for_a_few_policies(tiny_model, tiny_data, tmp_path, capsys):
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "runs.json"
    code = main(
        [
            "--task",
            "sst2",
            "--model",
            str(model_dir),
            "--data-dir",
            str(tiny_data),
            "--agents",
            "reinforce,entropy,oracle",
            "--alphas",
            "0.5",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| policy | alpha | accuracy |" in printed and "oracle (reference)" in printed
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == [
        "reinforce",
        "entropy",
        "oracle",
        "reinforce",
        "full model (static L)",
    ]
    full = runs[-1]
    assert full["mean_exit_layer"] == tiny_model.num_layers and full["speedup"] == 1.0
    assert runs[3]["alpha"] == 0.5 and runs[1]["alpha"] is None
    oracle = runs[2]
    assert oracle["metrics"]["accuracy"] >= max(r["metrics"]["accuracy"] for r in runs) - 1e-9
    for run in runs:
        assert sum(run["exit_histogram"]) == 32  # every dev input exits exactly once
