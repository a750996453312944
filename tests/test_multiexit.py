"""The multi-exit model: layer-by-layer execution, pooling, save/load, fingerprints."""

from __future__ import annotations

import pytest
import torch
from transformers import AlbertConfig, DistilBertConfig, ElectraConfig, MPNetConfig, RobertaConfig

from ee_gym.backbones import UnsupportedBackboneError, default_pooling, resolve_backbone
from ee_gym.multiexit import MultiExitConfig, MultiExitModel
from tests.conftest import tiny_bert_config

SMALL = {"vocab_size": 120, "num_attention_heads": 2, "intermediate_size": 37}
CONFIGS = {
    "bert": tiny_bert_config(),
    "roberta": RobertaConfig(hidden_size=32, num_hidden_layers=3, **SMALL),
    "distilbert": DistilBertConfig(vocab_size=120, dim=32, n_layers=3, n_heads=2, hidden_dim=37),
    "albert": AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=4, **SMALL),
    "electra": ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=3, **SMALL),
    # relative position bias computed once per batch and passed to every layer
    "mpnet": MPNetConfig(hidden_size=32, num_hidden_layers=3, **SMALL),
}


def _batch(vocab: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab, (3, 9), generator=generator)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, 3:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_layer_by_layer_equals_full_forward(family):
    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(CONFIGS[family], pooling="mean").eval()
    input_ids, attention_mask = _batch(CONFIGS[family].vocab_size)
    state = model.start(input_ids, attention_mask)
    for _ in range(model.num_layers):
        state = model.advance(state)
    reference = model.encoder.full_forward(input_ids, attention_mask)
    torch.testing.assert_close(state.hidden, reference, rtol=0, atol=1e-6)
    # The last exit of forward() reads the same hidden states.
    out = model(input_ids, attention_mask)
    assert out.states.shape == (3, model.num_layers, 32)
    assert out.logits.shape == (3, model.num_layers, 2)
    torch.testing.assert_close(out.states[:, -1], model.pool(reference, attention_mask))


def test_bert_exits_use_the_models_own_pooler():
    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(tiny_bert_config(), pooling="cls").eval()
    input_ids, attention_mask = _batch(100)
    backbone = type(model.encoder.model)(model.encoder.config)  # a fresh copy with its pooler
    backbone.load_state_dict(model.encoder.model.state_dict(), strict=False)
    backbone.pooler.dense.load_state_dict(model.pooler.state_dict())
    backbone.eval()
    expected = backbone(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    torch.testing.assert_close(model(input_ids, attention_mask).states[:, -1], expected)


def test_mean_pooling_ignores_padding(tiny_model):
    hidden = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tiny_model.config.pooling = "mean"
    padded_changed = hidden.clone()
    padded_changed[0, 3:] = 100.0
    torch.testing.assert_close(tiny_model.pool(hidden, mask)[0], tiny_model.pool(padded_changed, mask)[0])


def test_selecting_rows_matches_running_them_alone(tiny_model):
    batch = tiny_model.tokenize(["short one", "a much longer sentence with many more words in it"])
    state = tiny_model.advance(tiny_model.start(**batch))
    kept = tiny_model.select(state, torch.tensor([0]))
    assert kept.hidden.shape[1] < state.hidden.shape[1]  # padding the kept row does not need is gone
    alone = tiny_model.start(**tiny_model.tokenize(["short one"]))
    alone = tiny_model.advance(alone)
    for _ in range(2):
        kept, alone = tiny_model.advance(kept), tiny_model.advance(alone)
    torch.testing.assert_close(
        tiny_model.exit_outputs(kept).logits, tiny_model.exit_outputs(alone).logits, atol=1e-5, rtol=1e-5
    )


def test_save_and_load_round_trip_exactly(tiny_model, tmp_path):
    tiny_model.config.labels = ["no", "yes"]
    folder = tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = MultiExitModel.from_pretrained(folder)
    assert loaded.config == tiny_model.config
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.fingerprint() == tiny_model.fingerprint() == (folder / "fingerprint").read_text()
    batch = tiny_model.tokenize(["one sentence"], ["and another"])
    assert torch.equal(tiny_model(**batch).logits, loaded(**batch).logits)
    assert not (tmp_path / "ckpt.tmp").exists()


def test_fingerprint_changes_with_any_weight(tiny_model):
    before = tiny_model.fingerprint()
    with torch.no_grad():
        tiny_model.heads[2].bias[0] += 1e-3
    assert tiny_model.fingerprint() != before


def test_exit_before_layer_one_and_past_the_last_are_errors(tiny_model):
    state = tiny_model.start(**tiny_model.tokenize(["x"]))
    with pytest.raises(ValueError, match="advance"):
        tiny_model.exit_outputs(state)
    for _ in range(tiny_model.num_layers):
        state = tiny_model.advance(state)
    with pytest.raises(IndexError, match="already run"):
        tiny_model.advance(state)


def test_bad_config_and_unsupported_backbone_are_clear_errors():
    with pytest.raises(ValueError, match="pooling"):
        MultiExitConfig(pooling="max")
    from transformers import GPT2Config

    with pytest.raises(UnsupportedBackboneError, match="supported"):
        MultiExitModel.from_backbone(GPT2Config(n_layer=2, n_embd=32, n_head=2))


def test_loading_a_folder_that_is_not_a_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="ee-gym stage1"):
        MultiExitModel.from_pretrained(tmp_path)


def test_embedded_backbone_resolves_offline_with_mean_pooling():
    folder = resolve_backbone("minilm-l6")
    assert folder.endswith("model")
    assert default_pooling("minilm-l6") == "mean"
    assert default_pooling("bert-base-uncased") == "cls"
    assert resolve_backbone("some/hub-name") == "some/hub-name"


def test_mpnet_rows_kept_after_an_exit_match_running_them_alone():
    """Dropping rows trims the padding: MPNet's position bias is rebuilt for the shorter batch."""
    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(CONFIGS["mpnet"], pooling="mean").eval()
    input_ids, attention_mask = _batch(CONFIGS["mpnet"].vocab_size)
    state = model.advance(model.start(input_ids, attention_mask))
    kept = model.select(state, torch.tensor([2]))  # row 2 has 3 tokens: the batch shrinks to 3
    assert kept.hidden.shape[1] == 3 and kept.layer_mask[1].shape[-1] == 3
    alone = model.advance(model.start(input_ids[2:, :3], attention_mask[2:, :3]))
    for _ in range(model.num_layers - 1):
        kept, alone = model.advance(kept), model.advance(alone)
    torch.testing.assert_close(kept.hidden, alone.hidden, atol=1e-5, rtol=1e-5)
