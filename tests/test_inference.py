"""Batched early-exit inference (ee_gym.inference), ObservationEncoder.from_outputs, `ee-gym predict`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import agents
from ee_gym.cli import main
from ee_gym.envs import ExitTable
from ee_gym.envs.observations import OBS_MODES, ObservationEncoder
from ee_gym.inference import Predictions, model_env_stand_in, predict, predict_split
from ee_gym.multiexit import MultiExitModel
from ee_gym.tasks import load_split
from tests.conftest import tiny_bert_config

NUM_LAYERS = 4
THRESHOLD = 0.65  # maxprob on `varied_model` and the tiny RTE dev split: exits at layers 1, 3 and 4


@pytest.fixture
def varied_model(tokenizer) -> MultiExitModel:
    """The tiny random model with a wider initialisation: at conftest's 0.02 every input gets nearly
    the same pooled state (max p at layer 1 within 0.5995-0.5997), so no rule could exit at several
    layers; at 0.2 states and confidences vary across inputs."""
    torch.manual_seed(0)
    config = tiny_bert_config(NUM_LAYERS)
    config.initializer_range = 0.2
    return MultiExitModel.from_backbone(config, num_labels=2, tokenizer=tokenizer).eval()


@pytest.mark.parametrize("mode", OBS_MODES)
@pytest.mark.parametrize("layer", [1, 3, 6])
def test_from_outputs_equals_single_row_by_row(mode, layer):
    rng = np.random.default_rng(layer)
    d, big_l, k, b = 5, 6, 3, 7
    encoder = ObservationEncoder(mode, big_l, d, k)
    states = np.tanh(rng.normal(size=(b, d))).astype(np.float32)
    logits = (3 * rng.normal(size=(b, layer, k))).astype(np.float32)
    logits[0] = 0.0  # a tie: argmax and entropy at their edge
    batch = encoder.from_outputs(states, logits)
    rows = [encoder.single(states[i], logits[i]) for i in range(b)]
    if mode == "full":
        for key in ("state", "stats"):
            np.testing.assert_array_equal(batch[key], np.stack([r[key] for r in rows]))
            assert batch[key].dtype == np.float32
    else:
        np.testing.assert_array_equal(batch, np.stack(rows))
        assert batch.dtype == np.float32
    assert all(encoder.space.contains(r) for r in rows[:1])


@pytest.mark.parametrize("precomputed", [True, False])
@pytest.mark.parametrize("mode", ["state+layer", "state+confidence"])
def test_table_observations_equal_the_live_ones(monkeypatch, mode, precomputed):
    """What the vector env gathers from a table (precomputed, or joined per step when the table is too
    big) is what live inference builds from the same states and logits."""
    from ee_gym import observations  # where the modes live (ee_gym.envs.observations re-exports)

    if not precomputed:
        monkeypatch.setattr(observations, "PRECOMPUTE_LIMIT_BYTES", 0)
    rng = np.random.default_rng(0)
    n, big_l, d, k = 9, 4, 5, 3
    states = np.tanh(rng.normal(size=(n, big_l, d))).astype(np.float32)
    logits = (2 * rng.normal(size=(n, big_l, k))).astype(np.float32)
    table = ExitTable(states, logits, rng.integers(0, k, n), np.ones(n, dtype=np.int64))
    encoder = ObservationEncoder(mode, big_l, d, k)
    index = np.arange(n)
    for layer in range(1, big_l + 1):
        out = encoder.allocate(n)
        encoder.batch(table, index, np.full(n, layer), out)
        live = encoder.from_outputs(states[:, layer - 1], logits[:, :layer])
        np.testing.assert_allclose(out, live, rtol=0, atol=1e-6)
    assert (mode in table.derived) == precomputed


def test_from_outputs_rejects_bad_shapes():
    encoder = ObservationEncoder("state+layer", 4, 5, 2)
    with pytest.raises(ValueError):
        encoder.from_outputs(np.zeros((3, 5)), np.zeros((3, 5, 2)))  # layer 5 > L
    with pytest.raises(ValueError):
        encoder.from_outputs(np.zeros((2, 5)), np.zeros((3, 1, 2)))  # rows differ


def _texts(tiny_data):
    examples = load_split("rte", "dev", tiny_data)
    # lengths that differ, so that batches pad and compaction trims
    text_a = [a + " really" * (i % 5) for i, a in enumerate(examples.text_a)]
    return text_a, examples.text_b


def _reinforce(model):
    policy = agents.make("reinforce", seed=5)  # untrained; this seed exits at layers 1 and 2
    policy.bind(model_env_stand_in(model))
    return policy


@pytest.mark.parametrize("policy_name", ["maxprob", "reinforce", None])
def test_batched_equals_one_at_a_time(varied_model, tiny_data, policy_name):
    model = varied_model
    text_a, text_b = _texts(tiny_data)
    if policy_name == "maxprob":
        policy = agents.make("maxprob", threshold=THRESHOLD)
    elif policy_name == "reinforce":
        policy = _reinforce(model)
    else:
        policy = None
    one = predict(model, text_a, text_b, policy=policy, batch_size=1)
    for batch_size in (5, 32):
        many = predict(model, text_a, text_b, policy=policy, batch_size=batch_size)
        np.testing.assert_array_equal(many.predictions, one.predictions)
        np.testing.assert_array_equal(many.exit_layers, one.exit_layers)
        np.testing.assert_allclose(many.probabilities, one.probabilities, atol=1e-5)
    assert one.exit_layers.min() >= 1 and one.exit_layers.max() <= NUM_LAYERS
    np.testing.assert_allclose(one.probabilities.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(one.predictions, one.probabilities.argmax(-1))
    if policy is None:
        assert (one.exit_layers == NUM_LAYERS).all()
        with torch.no_grad():
            batch = model.tokenize(text_a, text_b)
            full = model(**batch).logits[:, -1].argmax(-1).numpy()
        np.testing.assert_array_equal(one.predictions, full)
    else:  # the test is only worth something if the policy exits at several layers
        assert len(np.unique(one.exit_layers)) >= 2, np.bincount(one.exit_layers)


def test_exits_match_the_policy_on_full_outputs(varied_model, tiny_data):
    """Each row exits at the first layer where the rule, fed stats of the full pass, says EXIT."""
    model = varied_model
    text_a, text_b = _texts(tiny_data)
    policy = agents.make("maxprob", threshold=THRESHOLD)
    out = predict(model, text_a, text_b, policy=policy, batch_size=8)
    with torch.no_grad():
        probs = torch.softmax(model(**model.tokenize(text_a, text_b)).logits, -1).numpy()
    confident = probs.max(-1) >= np.float32(THRESHOLD)  # [N, L]
    confident[:, -1] = True
    expected = confident.argmax(1) + 1
    np.testing.assert_array_equal(out.exit_layers, expected)


def test_compaction_drops_rows(varied_model, tiny_data):
    model = varied_model
    text_a, text_b = _texts(tiny_data)
    seen: dict[int, tuple[int, int]] = {}  # layer about to run -> (rows, padded length)
    advance = model.advance

    def counting(state):
        assert state.layer + 1 not in seen  # one batch: each layer runs once
        seen[state.layer + 1] = tuple(state.attention_mask.shape)
        return advance(state)

    model.advance = counting
    out = predict(model, text_a, text_b, policy=agents.make("maxprob", threshold=THRESHOLD), batch_size=64)
    lengths = np.array([len(ids) for ids in model.tokenizer(text_a, text_b)["input_ids"]])
    assert sorted(seen) == list(range(1, out.exit_layers.max() + 1))
    for layer, (rows, length) in seen.items():
        running = out.exit_layers >= layer
        assert rows == running.sum() and length == lengths[running].max()  # dropped, and trimmed
    assert seen[1][0] == len(text_a) and sum(rows for rows, _ in seen.values()) < len(text_a) * NUM_LAYERS


class ExitFirstRow(agents.ExitPolicy):
    """Exits the first row of every batch observation: batches are sorted longest first, so the
    longest row still running leaves after each layer and the padding must shrink."""

    name = "exit-first-row"
    obs_mode = "state"

    def act(self, obs, deterministic=True):
        return (np.arange(len(obs)) == 0).astype(np.int64)


def test_compaction_trims_padding(tiny_model):
    text_a = ["good " * k for k in (1, 9, 3, 7, 5)]
    shapes = []
    advance = tiny_model.advance
    tiny_model.advance = lambda state: shapes.append(tuple(state.attention_mask.shape)) or advance(state)
    out = predict(tiny_model, text_a, policy=ExitFirstRow(), batch_size=8)
    assert out.exit_layers.tolist() == [4, 1, 4, 2, 3]  # longest first; the last two leave at L
    assert shapes == [(5, 11), (4, 9), (3, 7), (2, 5)]  # [CLS] + k words + [SEP]


def test_policy_none_skips_intermediate_heads(tiny_model, tiny_data):
    text_a, text_b = _texts(tiny_data)
    calls = []
    exit_outputs = tiny_model.exit_outputs
    tiny_model.exit_outputs = lambda state: calls.append(state.layer) or exit_outputs(state)
    predict(tiny_model, text_a[:6], text_b[:6], batch_size=3)
    assert calls == [NUM_LAYERS, NUM_LAYERS]


def test_non_deployable_policy_is_refused(tiny_model):
    with pytest.raises(ValueError, match="not deployable"):
        predict(tiny_model, ["a film"], policy=agents.make("oracle"))


def test_predict_split_metrics_and_empty_input(tiny_model, tiny_data):
    out = predict_split(
        tiny_model, "rte", "dev", policy=agents.make("static", layer=2), data_dir=tiny_data, limit=10
    )
    assert isinstance(out, Predictions) and len(out) == 10
    assert (out.exit_layers == 2).all() and out.speed_up == pytest.approx(2.0)
    assert out.metrics["accuracy"] == pytest.approx((out.predictions == out.labels).mean())
    assert out.metrics["mean_exit_layer"] == 2.0 and out.metrics["saved_layers"] == 0.5
    empty = predict(tiny_model, [], policy=agents.make("maxprob"))
    assert len(empty) == 0 and empty.probabilities.shape == (0, 2)


def test_cli_predict_writes_json_lines(varied_model, tiny_data, tmp_path, capsys):
    model_dir = varied_model.save_pretrained(tmp_path / "model")
    texts = tmp_path / "texts.tsv"
    texts.write_text("a good film\tit was good\nthe plot was awful\tit was bad\n\n")
    output = tmp_path / "out.jsonl"
    argv = ["predict", "--model", str(model_dir), "--texts", str(texts), "--output", str(output)]
    assert main([*argv, "--policy", "maxprob", "--policy-arg", f"threshold={THRESHOLD}"]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["text"] for line in lines] == ["a good film", "the plot was awful"]
    assert lines[0]["text_b"] == "it was good"
    expected = predict(
        varied_model,
        ["a good film", "the plot was awful"],
        ["it was good", "it was bad"],
        policy=agents.make("maxprob", threshold=THRESHOLD),
    )
    assert [line["exit_layer"] for line in lines] == expected.exit_layers.tolist()
    assert [line["prediction"] for line in lines] == expected.predictions.tolist()
    for line in lines:
        assert set(line) >= {"text", "prediction", "label", "exit_layer", "probability"}
        assert 0.5 <= line["probability"] <= 1.0

    capsys.readouterr()  # the summary of the run above
    policy_dir = agents.make("static", layer=3).save(tmp_path / "policy")
    argv = ["predict", "--model", str(model_dir), "--task", "rte", "--split", "dev", "--limit", "5"]
    assert main([*argv, "--data-dir", str(tiny_data), "--policy", str(policy_dir)]) == 0
    printed = capsys.readouterr()
    lines = [json.loads(line) for line in printed.out.splitlines()]
    assert len(lines) == 5 and {line["exit_layer"] for line in lines} == {3}
    assert "gold" in lines[0] and "accuracy" in printed.err

    # a rule named with no settings is calibrated on a validation slice of this model's policy split
    from ee_gym.envs.prepare import load_table
    from ee_gym.evaluation import calibrated_rule, validation_split
    from ee_gym.protocols import get_protocol

    assert main([*argv, "--data-dir", str(tiny_data), "--policy", "maxprob", "--max-length", "32"]) == 0
    printed = capsys.readouterr()
    split = get_protocol().policy_split  # the default protocol's
    table = load_table(varied_model, "rte", split, data_dir=tiny_data, progress=False)
    expected = calibrated_rule("maxprob", validation_split(table)[1])
    assert f"maxprob calibrated on a validation slice of {split} for this model: {expected}" in printed.err
    assert main([*argv, "--data-dir", str(tiny_data), "--policy", "maxprob", "--no-calibrate"]) == 0
    assert "calibrated" not in capsys.readouterr().err

    assert main(["predict", "--model", str(model_dir), "--texts", str(texts), "--policy", "oracle"]) == 2
