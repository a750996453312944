"""Self-speculative decoding (ee_gym.generation.speculative): exits draft, full depth verifies, and the
tokens are full-depth greedy decoding's, token for token."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MistralConfig

from ee_gym.generation import MultiExitDecoder, exit_at_layer
from ee_gym.generation.speculative import speculative_generate
from tests.test_generation import NUM_LAYERS, VOCAB, prompts, tiny_config, tiny_decoder


def row_dependent_exit(view):
    """Rows exit at different layers (row b at layer 1 + b % 3): drafts of a batch disagree unevenly."""
    rows = torch.arange(view.batch_size)
    return (view.layer >= 1 + rows % 3) & view.active.cpu()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("lengths", [[5], [7, 4]], ids=["batch-1", "batch-2-left-padded"])
@pytest.mark.parametrize(
    "rule", [exit_at_layer(1), exit_at_layer(3), row_dependent_exit], ids=["layer-1", "layer-3", "per-row"]
)
@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_speculative_tokens_are_full_depth_greedy(kind, lengths, rule, draft_tokens):  # fmt: skip
    decoder = tiny_decoder(kind)
    ids, mask = prompts(lengths)
    full = decoder.generate(ids, mask, max_new_tokens=12, stop_at_eos=False)
    fast = speculative_generate(decoder, rule, ids, mask, draft_tokens=draft_tokens, max_new_tokens=12,
                                stop_at_eos=False)  # fmt: skip
    assert torch.equal(fast.sequences, full.sequences)
    assert (fast.exit_layers == NUM_LAYERS).all()
    assert 0 <= fast.accepted <= fast.drafted and fast.rounds >= 1
    # the drafts are early exits, not the full model: some are rejected (else the test means little)
    early = decoder.generate(ids, mask, max_new_tokens=12, stop_at_eos=False, exit_fn=rule)
    assert not torch.equal(early.tokens, full.tokens)


def test_speculative_stops_and_pads_after_eos_as_generate():
    decoder = tiny_decoder()
    ids, mask = prompts([4, 5])
    first = decoder.generate(ids[:1], mask[:1], max_new_tokens=4, stop_at_eos=False).tokens[0]
    eos = int(first[2])  # row 0 ends at its third token; row 1 goes on
    full = decoder.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    fast = speculative_generate(decoder, exit_at_layer(2), ids, mask, draft_tokens=3, max_new_tokens=10,
                                eos_token_id=eos, pad_token_id=0)  # fmt: skip
    assert torch.equal(fast.tokens, full.tokens)
    assert torch.equal(fast.exit_layers > 0, full.exit_layers > 0)  # padding after the end is marked 0


def test_speculative_ends_where_generate_ends_mid_round():
    """Batch 1, the end token inside a round of kept drafts: no padding after it, as generate."""
    decoder = tiny_decoder()
    ids, mask = prompts([5])
    first = decoder.generate(ids, mask, max_new_tokens=4, stop_at_eos=False).tokens[0]
    eos = int(first[2])  # the third token ends the row, inside the first verify round (tokens 2-5)
    never = lambda view: torch.zeros(view.batch_size, dtype=torch.bool)  # noqa: E731
    full = decoder.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    fast = speculative_generate(decoder, never, ids, mask, draft_tokens=3, max_new_tokens=10,
                                eos_token_id=eos, pad_token_id=0)  # fmt: skip
    assert full.tokens.shape[1] == 3
    assert torch.equal(fast.tokens, full.tokens) and torch.equal(fast.exit_layers, full.exit_layers)


def test_full_depth_drafts_are_all_accepted():
    """A draft that never exits is the full model: every draft is kept, k + 1 tokens per verify pass."""
    decoder = tiny_decoder()
    ids, mask = prompts([6])
    never = lambda view: torch.zeros(view.batch_size, dtype=torch.bool)  # noqa: E731
    fast = speculative_generate(
        decoder, never, ids, mask, draft_tokens=3, max_new_tokens=9, stop_at_eos=False
    )
    assert fast.acceptance == 1.0 and fast.rounds == math.ceil((9 - 1) / (3 + 1))
    assert fast.tokens_per_round == pytest.approx((fast.accepted + fast.rounds) / fast.rounds)


@torch.no_grad()
def test_truncate_forgets_positions_as_if_never_fed():
    decoder = tiny_decoder()
    ids, mask = prompts([5, 3])
    out, state = decoder.prefill(ids, mask)
    before = state.clone()
    token = out.logits.argmax(-1)
    for _ in range(3):
        token = decoder.step(state, token, exit_at_layer(1)).logits.argmax(-1)
    state.truncate(before.length)
    assert torch.equal(state.attention_mask, before.attention_mask)
    assert torch.equal(state.next_positions, before.next_positions)
    for layer in range(NUM_LAYERS):
        assert torch.equal(state.cache.layers[layer].keys, before.cache.layers[layer].keys)
    with pytest.raises(ValueError, match="cannot truncate"):
        state.truncate(before.length + 1)


@torch.no_grad()
def test_extend_is_steps_at_full_depth():
    decoder = tiny_decoder()
    ids, mask = prompts([4, 6])
    _, state = decoder.prefill(ids, mask)
    stepped = state.clone()
    feed = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(0))
    logits = decoder.extend(state, feed)
    one_by_one = torch.stack([decoder.step(stepped, feed[:, i]).logits for i in range(3)], dim=1)
    torch.testing.assert_close(logits, one_by_one, rtol=1e-4, atol=1e-5)
    assert state.length == stepped.length and torch.equal(state.next_positions, stepped.next_positions)


def test_bad_settings_are_refused():
    decoder = tiny_decoder()
    ids, mask = prompts([4])
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_generate(decoder, exit_at_layer(1), ids, mask, draft_tokens=0)
    sizes = {k: v for k, v in tiny_config().to_dict().items() if k in {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings"}}  # fmt: skip
    sliding = MultiExitDecoder.from_config(MistralConfig(**sizes, sliding_window=4)).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        speculative_generate(sliding, exit_at_layer(1), ids, mask)


@pytest.mark.integration
def test_smollm2_speculative_is_its_full_depth_greedy(smollm2_shared_heads):
    decoder = smollm2_shared_heads
    for texts in (["The capital of France is"], ["The capital of France is", "Water boils at"]):  # batch 1, 2
        batch = decoder.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        full = decoder.generate(ids, mask, max_new_tokens=8, stop_at_eos=False)
        fast = speculative_generate(decoder, exit_at_layer(20), ids, mask, draft_tokens=3, max_new_tokens=8,
                                    stop_at_eos=False)  # fmt: skip
        assert torch.equal(fast.tokens, full.tokens)
        assert fast.accepted < fast.drafted  # layer 20's shared head is not the full model
