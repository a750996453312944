"""Model cards (ee_gym.model_card): every saved multi-exit model and policy folder says what it is."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

import agents
from ee_gym.model_card import CARD_NAME, CardFacts, card_settings
from ee_gym.multiexit import FINGERPRINT_NAME, MultiExitModel
from ee_gym.policy import load_policy
from ee_gym.training import Stage1Config, train_stage1
from tests.conftest import new_tiny_model


def test_a_saved_model_carries_a_card_with_its_facts(tokenizer, tmp_path):
    model = new_tiny_model(tokenizer)
    model.config.task = "rte"
    dev = [{"accuracy": 0.5, "f1": 0.4}, {"accuracy": 0.55, "f1": 0.5}, {"accuracy": 0.6, "f1": 0.6},
           {"accuracy": 0.625, "f1": 0.7}]  # fmt: skip
    facts = CardFacts(stage="stage 1", train_split="train[:90%]", dev_metrics=dev, settings={"epochs": 2})
    folder = model.save_pretrained(tmp_path / "model", card=facts)
    card = ModelCard.load(folder / CARD_NAME)
    data = card.data.to_dict()
    assert data["library_name"] == "ee-gym" and "rte" in data["tags"]
    assert data["datasets"] == ["nyu-mll/glue"] and data["metrics"] == ["accuracy"]
    block = data["ee_gym"]
    assert block["task"] == "rte" and block["stage"] == "stage 1" and block["num_layers"] == model.num_layers
    assert block["train_split"] == "train[:90%]"
    assert block["fingerprint"] == (folder / FINGERPRINT_NAME).read_text()
    assert block["dev_accuracy_by_layer"] == [0.5, 0.55, 0.6, 0.625]
    assert "| 4 | 62.5 | 70.0 |" in card.text  # the per-layer dev table, in percent
    assert "`epochs`: 2" in card.text and "ConsistentEE-RTE-v0" in card.text
    assert "pytest" in card.text  # the command that made it
    MultiExitModel.from_pretrained(folder)  # the card changes nothing about loading


def test_a_model_saved_without_facts_still_says_what_it_is(tokenizer, tmp_path):
    folder = new_tiny_model(tokenizer).save_pretrained(tmp_path / "bare")
    block = ModelCard.load(folder / CARD_NAME).data.to_dict()["ee_gym"]
    assert block["kind"] == "multi-exit model" and "stage" not in block and "task" not in block


def test_stage1_writes_its_dev_metrics_by_layer_into_the_card(tokenizer, tiny_data, tmp_path):
    config = Stage1Config(task="sst2", data_dir=str(tiny_data), output_dir=str(tmp_path / "run"), epochs=1,
                          batch_size=8, max_length=32, progress=False)  # fmt: skip
    result = train_stage1(config, model=new_tiny_model(tokenizer))
    card = ModelCard.load(result.model_dir / CARD_NAME)
    block = card.data.to_dict()["ee_gym"]
    final = result.history[-1]["dev"]
    assert block["stage"] == "stage 1" and block["train_split"] == "train"
    assert block["dev_accuracy_by_layer"] == pytest.approx([m["accuracy"] for m in final], abs=1e-4)
    assert "`output_dir`" not in card.text and "`epochs`: 1" in card.text  # settings, not paths


def test_a_saved_policy_carries_a_card(tmp_path):
    policy = agents.make("patience", patience=2)
    folder = policy.save(tmp_path / "policy", card=CardFacts(stage="stage 2", protocol="held-out"))
    data = ModelCard.load(folder / CARD_NAME).data.to_dict()
    assert data["ee_gym"]["policy"] == "patience" and data["ee_gym"]["params"] == {"patience": 2}
    assert data["ee_gym"]["protocol"] == "held-out" and "exit-policy" in data["tags"]
    assert json.loads((folder / "policy.json").read_text())["name"] == "patience"
    assert load_policy(folder).get_params() == policy.get_params()


def test_card_settings_keep_settings_and_drop_paths():
    settings = card_settings(Stage1Config(task="rte", output_dir="/somewhere", epochs=3))
    assert settings["epochs"] == 3 and settings["task"] == "rte"
    assert "output_dir" not in settings and "progress" not in settings
    assert card_settings({"not": "a dataclass"}) == {}
