"""The learned confidence probe (ee_gym.generation.confidence): fitted on a token table, a rule with a
threshold (ProbeExit), and the confidence of the ``state+probe`` observation mode."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from ee_gym.envs import ConsistentEETokenEnv
from ee_gym.generation import (
    ConfidenceProbe,
    LayerView,
    PolicyExit,
    ProbeExit,
    ProbeTraining,
    TokenTable,
    collect_token_states,
    fit_probe,
)
from ee_gym.generation.data import format_prompt, load_xsum
from ee_gym.observations import CONFIDENCE_WIDTH, PROBE_SCORES
from ee_gym.validation import ConfigError
from tests.conftest import DECODER_LAYERS, tiny_llama_decoder, tiny_word_tokenizer, write_tiny_xsum

L = DECODER_LAYERS


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    data = write_tiny_xsum(tmp_path_factory.mktemp("xsum-data"), rows=12)
    return [format_prompt(tiny_word_tokenizer(), a.article) for a in load_xsum("0:8", data)]


@pytest.fixture(scope="module")
def table(prompts):
    tokens = collect_token_states(
        tiny_llama_decoder(), prompts, max_new_tokens=8, batch_size=4, progress=False
    )
    return TokenTable.build(tiny_llama_decoder(), tokens, split="train", progress=False)


def synthetic_table(n: int = 600, d: int = 8, seed: int = 0) -> TokenTable:
    """Exit l is right exactly where the state's first entry is positive: a probe can learn it."""
    rng = np.random.default_rng(seed)
    states = rng.uniform(-1, 1, (n, L, d)).astype(np.float16)
    labels = rng.integers(0, 50, n)
    right = states[..., 0] > 0
    right[:, -1] = True
    predictions = np.where(right, labels[:, None], (labels[:, None] + 1) % 50)
    zeros = np.zeros((n, L), dtype=np.float32)
    return TokenTable(states, labels, predictions, zeros.astype(np.float64), zeros, zeros, np.arange(n),
                      np.zeros(n, dtype=np.int64), vocab_size=50, state_scale=1.0)  # fmt: skip


@pytest.mark.parametrize("width", [0, 16])
def test_the_probe_learns_which_exits_are_right(width):
    table = synthetic_table()
    probe, history = fit_probe(table, ProbeTraining(width=width, epochs=100, learning_rate=3e-2))
    assert history[-1]["loss"] < history[0]["loss"]
    scores = probe.table_scores(synthetic_table(seed=1))  # unseen tokens
    truth = synthetic_table(seed=1).correct
    assert (scores[:, -1] == 1.0).all()
    accuracy = ((scores[:, :-1] > 0.5) == truth[:, :-1]).mean()
    assert accuracy > 0.95


def test_probe_saves_and_loads(tmp_path):
    probe, _ = fit_probe(synthetic_table(), ProbeTraining(width=4, epochs=2))
    probe.save(tmp_path / "probe")
    again = ConfidenceProbe.load(tmp_path / "probe")
    table = synthetic_table(seed=2)
    np.testing.assert_array_equal(again.table_scores(table), probe.table_scores(table))
    with pytest.raises(FileNotFoundError, match="fit_probe"):
        ConfidenceProbe.load(tmp_path)


def test_probe_rule_exits_where_the_probe_passes_its_threshold(prompts, table):
    decoder = tiny_llama_decoder()
    probe, _ = fit_probe(table, ProbeTraining(epochs=5))
    threshold = float(np.median(probe.table_scores(table)[:, :-1]))
    rule = ProbeExit(probe, decoder, threshold)
    assert rule.reads == "state"
    scores = probe.table_scores(table)
    expected = [next((k for k in range(1, L) if row[k - 1] >= threshold), L) for row in scores]
    assert rule.table_exit_layers(table).tolist() == expected
    # live: the decision at layer l is the probe's score of tanh(s_l / c) against the threshold
    hidden = torch.randn(3, 32)
    view = LayerView(decoder, 2, hidden, torch.ones(3, dtype=torch.bool), torch.zeros(3, 32))
    squashed = torch.tanh(decoder.final_norm(hidden).detach() / rule.scale)
    assert rule(view).tolist() == (probe.scores(squashed, 2) >= threshold).tolist()
    batch = decoder.tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    out = decoder.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, exit_fn=rule)
    assert (out.exit_layers[out.exit_layers > 0] >= 1).all()
    with pytest.raises(ValueError, match="fit one"):
        ProbeExit(ConfidenceProbe(L + 1, 32), decoder)


def test_state_probe_observations_carry_the_probe_and_stay_apart(table):
    env = ConsistentEETokenEnv(table=table, obs_mode="state+probe")  # no probe given: fitted on the table
    scores = env.probe.table_scores(table)
    obs, _ = env.reset(options={"index": 3})
    d = table.hidden_size
    np.testing.assert_allclose(obs[d : d + CONFIDENCE_WIDTH], 2 * scores[3, 0] - 1, atol=1e-6)
    assert PROBE_SCORES not in table.derived  # the env reads a view of the table, with its own scores
    other, _ = fit_probe(table, ProbeTraining(epochs=1, seed=5))
    second = ConsistentEETokenEnv(table=table, obs_mode="state+probe", probe=other)
    again, _ = env.reset(options={"index": 3})
    np.testing.assert_array_equal(again, obs)  # the second env's probe did not change the first's
    assert not np.array_equal(second.reset(options={"index": 3})[0], obs)
    venv = gym.make_vec(
        "ConsistentEE-XSum-v0", num_envs=2, table=table, obs_mode="state+probe", probe=env.probe
    )
    vobs, _ = venv.reset(seed=0)
    assert vobs.shape == (2, *env.observation_space.shape)


def test_probe_settings_are_checked(table):
    with pytest.raises(ConfigError, match="state\\+probe"):
        ConsistentEETokenEnv(table=table, obs_mode="state+layer", probe=ConfidenceProbe(L, table.hidden_size))
    with pytest.raises(ConfigError, match="generation"):
        gym.make("ConsistentEE-RTE-v0", obs_mode="state+probe")  # refused before any model is loaded

    class Recorder:
        obs_mode, name, deployable = "state+probe", "recorder", True

        def bind(self, env):
            pass

    with pytest.raises(ValueError, match="probe=env.unwrapped.probe"):
        PolicyExit(Recorder(), tiny_llama_decoder())
    probe = ConfidenceProbe(L, 32)
    assert PolicyExit(Recorder(), tiny_llama_decoder(), probe=probe).reads == "state"


@pytest.mark.parametrize("width", [0, 16])
def test_numpy_scores_equal_the_torch_scores_and_follow_new_weights(width):
    probe, _ = fit_probe(synthetic_table(), ProbeTraining(width=width, epochs=2))
    observations = torch.rand(5, 8) * 2 - 1
    for layer in (1, L - 1, L):
        np.testing.assert_allclose(
            probe.numpy_scores(observations.numpy(), layer),
            probe.scores(observations, layer).numpy(),
            atol=1e-6,
        )
    with pytest.raises(IndexError):
        probe.numpy_scores(observations.numpy(), 0)
    before = probe.numpy_scores(observations.numpy(), 1)
    other, _ = fit_probe(synthetic_table(seed=3), ProbeTraining(width=width, epochs=2, seed=7))
    probe.load_state_dict(other.state_dict())  # new weights: the numpy copies must follow
    after = probe.numpy_scores(observations.numpy(), 1)
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, other.scores(observations, 1).numpy(), atol=1e-6)


def test_numpy_states_equal_the_decoders_final_norm():
    decoder = tiny_llama_decoder()
    hidden = torch.randn(3, 32) * 4
    view = LayerView(decoder, 2, hidden, torch.ones(3, dtype=torch.bool))
    expected = decoder.final_norm(hidden).detach().numpy()
    np.testing.assert_allclose(view.numpy_states, expected, rtol=1e-5, atol=1e-6)
    seen = LayerView(decoder, 2, hidden, torch.ones(3, dtype=torch.bool))
    _ = seen.states  # a signal computed the torch states first: they are reused
    np.testing.assert_array_equal(seen.numpy_states, expected)
