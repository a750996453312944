"""The real embedded backbone (all-MiniLM-L6-v2) on slices of the shared GLUE data."""

from __future__ import annotations

import numpy as np
import pytest

from ee_gym.cache import build_cache
from ee_gym.cli import main
from ee_gym.multiexit import MultiExitModel
from ee_gym.training import Stage1Config, train_stage1

pytestmark = pytest.mark.integration


def test_stage1_fine_tunes_the_embedded_backbone_on_an_rte_slice(shared_data, tmp_path, capsys):
    run = tmp_path / "rte-run"
    code = main(
        [
            "stage1",
            "--task",
            "rte",
            "--data-dir",
            str(shared_data),
            "--output-dir",
            str(run),
            "--train-limit",
            "48",
            "--dev-limit",
            "24",
            "--epochs",
            "1",
            "--max-length",
            "64",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "final dev rte accuracy by layer" in capsys.readouterr().out
    model = MultiExitModel.from_pretrained(run / "model")
    assert (model.num_layers, model.hidden_size, model.config.pooling) == (6, 384, "mean")
    pretrained = MultiExitModel.from_backbone("minilm-l6", num_labels=2)
    moved = [
        name
        for name, p in model.encoder.state_dict().items()
        if not np.allclose(p.numpy(), pretrained.encoder.state_dict()[name].numpy())
    ]
    assert any("encoder.layer.0." in name for name in moved)  # the backbone itself was fine-tuned

    cache = build_cache(model, "rte", "dev", data_dir=shared_data, max_length=64, limit=24, progress=False)
    assert cache.states.shape == (24, 6, 384)
    assert set(np.unique(cache.memorized)) <= set(range(1, 7))


def test_stage1_learns_sst2_from_a_slice(shared_data, tmp_path):
    """One short epoch on 384 sentences lifts the last exit well above chance."""
    config = Stage1Config(
        task="sst2",
        data_dir=str(shared_data),
        output_dir=str(tmp_path / "sst2"),
        train_limit=384,
        dev_limit=200,
        epochs=1,
        batch_size=16,
        learning_rate=1e-4,
        head_learning_rate=2e-3,
        max_length=48,
        progress=False,
    )
    result = train_stage1(config)
    accuracies = [m["accuracy"] for m in result.history[-1]["dev"]]
    assert accuracies[-1] > 0.65, accuracies  # chance: 0.51; 0.65 is over 4 standard errors above
