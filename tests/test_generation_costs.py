"""What exit decisions cost (ee_gym.generation.costs): the LM head runs once per token at its exit for
rules that read the state, and only where a rule asks for the softmax otherwise."""

from __future__ import annotations

import pytest
import torch

from ee_gym.generation import ConfidenceExit, StateSimilarityExit, StaticExit
from ee_gym.generation.costs import READS, DecisionTimer, reads_of
from tests.conftest import DECODER_LAYERS, tiny_llama_decoder


def _count_head_rows(decoder):
    """A hook on the model's LM head (every exit head ends in it): rows it was called on."""
    calls = []
    handle = decoder.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
    )
    return calls, handle


def _prompts(decoder, texts):
    batch = decoder.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("batch", [1, 2])
def test_a_state_rule_runs_the_head_once_per_token(batch):
    decoder = tiny_llama_decoder()
    ids, mask = _prompts(decoder, ["the film was good", "a plot and acting"][:batch])
    rows, handle = _count_head_rows(decoder)
    out = decoder.generate(ids, mask, max_new_tokens=8, stop_at_eos=False, exit_fn=StateSimilarityExit(0.0))
    handle.remove()
    assert (out.exit_layers < DECODER_LAYERS).any()  # it did exit early
    assert sum(rows) == out.tokens.numel()  # one head row per generated token, the prompt pass's included


def test_a_softmax_rule_reuses_its_logits_at_the_exit():
    decoder = tiny_llama_decoder()
    ids, mask = _prompts(decoder, ["the film was good", "a plot and acting"])
    rule = ConfidenceExit(0.05, min_layer=2)
    rows, handle = _count_head_rows(decoder)
    out = decoder.generate(ids, mask, max_new_tokens=8, stop_at_eos=False, exit_fn=rule)
    handle.remove()
    layers = out.exit_layers[:, 1:]  # decided tokens; the first comes from the prompt pass
    assert ((layers > 1) & (layers < DECODER_LAYERS)).any() and (layers == DECODER_LAYERS).any()
    # probes at layers 2..exit (2..L-1 for tokens reaching L, which then need the head of L)
    probes = torch.where(layers < DECODER_LAYERS, layers - 1, DECODER_LAYERS - 2 + 1)
    assert sum(rows) == out.tokens.shape[0] + int(probes.sum())


def test_rules_declare_what_they_read():
    assert reads_of(None) == "nothing" and reads_of(StaticExit(2)) == "nothing"
    assert reads_of(StateSimilarityExit(0.9)) == "state" and reads_of(ConfidenceExit(0.9)) == "softmax"
    assert reads_of(lambda view: None) == "unknown"
    assert READS.index("state") < READS.index("softmax")


def test_the_timer_counts_decisions_and_the_layers_between_them():
    decoder = tiny_llama_decoder()
    ids, mask = _prompts(decoder, ["the film was good"])
    timer = DecisionTimer(ConfidenceExit(2.0, min_layer=2))  # never confident: every layer asked
    out = timer_out = decoder.generate(ids, mask, max_new_tokens=5, stop_at_eos=False, exit_fn=timer)
    steps = out.tokens.shape[1] - 1
    assert timer.cost.decisions == steps * (DECODER_LAYERS - 2)  # layers 2..L-1 of every step
    assert timer.cost.layers == steps * (DECODER_LAYERS - 2)  # the gaps 1->2, ..., (L-2)->(L-1)
    assert timer.cost.decision_us > 0 and timer.cost.layer_us > 0 and timer.reads == "softmax"
    assert torch.equal(
        timer_out.tokens, decoder.generate(ids, mask, max_new_tokens=5, stop_at_eos=False).tokens
    )


def test_a_rule_probing_every_other_layer_reads_its_signal_there_only():
    decoder = tiny_llama_decoder()
    ids, mask = _prompts(decoder, ["the film was good"])
    rows, handle = _count_head_rows(decoder)
    out = decoder.generate(
        ids, mask, max_new_tokens=6, stop_at_eos=False, exit_fn=ConfidenceExit(2.0, every=2)
    )
    handle.remove()
    steps = out.tokens.shape[1] - 1
    assert sum(rows) == 1 + steps * (2 + 1)  # prompt; per step layers 1 and 3 probed, then the head of L
    rule = ConfidenceExit(0.0, min_layer=2, every=2)  # always confident: exits at its first probe, 2
    assert rule.get_params() == {"threshold": 0.0, "min_layer": 2, "every": 2}
    out = decoder.generate(ids, mask, max_new_tokens=4, stop_at_eos=False, exit_fn=rule)
    assert (out.exit_layers[0, 1:] == 2).all()
    with pytest.raises(ValueError, match="every"):
        ConfidenceExit(0.5, every=0)


def test_thresholds_placed_for_a_probing_interval_exit_at_probed_layers():
    import numpy as np

    from ee_gym.generation.policies import threshold_for_speedup

    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, (200, 8)).astype(np.float32)
    threshold = threshold_for_speedup(values, 1.5, min_layer=2, every=3)
    table = type("T", (), {"top2_gap": values})()
    exits = ConfidenceExit(threshold, min_layer=2, every=3).table_exit_layers(table)
    assert set(exits.tolist()) <= {2, 5, 8} and 8 / exits.mean() >= 1.5


def test_candidate_confidence_equals_the_full_softmax_when_the_candidates_hold_the_mass():
    from ee_gym.generation.policies import CandidateConfidenceExit
    from ee_gym.generation.view import probability_gap

    decoder = tiny_llama_decoder()
    rule = CandidateConfidenceExit(decoder, threshold=0.5, k=2, rank=4)
    assert rule.reads == "candidates"
    # hand case: 6 tokens, the state picks logits [10, 9, -40, -40, -40, -40]
    rule.weight = torch.tensor([[10.0, 0], [9, 0], [-40, 0], [-40, 0], [-40, 0], [-40, 0]])
    states = torch.tensor([[1.0, 0.0]])
    full = probability_gap(states @ rule.weight.T)
    assert rule.gap(states, torch.tensor([[0, 1]])) == pytest.approx(float(full), abs=1e-6)
    assert rule.gap(states, torch.tensor([[1, 2]])) > full  # without the top token: no longer the same


def test_candidates_at_full_rank_are_the_heads_top_tokens():
    from ee_gym.generation.policies import CandidateConfidenceExit

    decoder = tiny_llama_decoder()
    rule = CandidateConfidenceExit(decoder, threshold=0.3, min_layer=2, k=4, rank=32)  # rank d: exact
    states = decoder.final_norm(torch.randn(3, 32)).detach()
    top = (states @ rule.weight.T).topk(4, dim=-1).indices
    assert torch.equal(rule.candidates(states).sort(-1).values, top.sort(-1).values)
    ids, mask = _prompts(decoder, ["the film was good", "a plot and acting"])
    out = decoder.generate(ids, mask, max_new_tokens=6, stop_at_eos=False, exit_fn=rule)
    assert (out.exit_layers[:, 1:] >= 2).all()


def test_candidate_signal_live_equals_the_gap_on_the_tokens_candidates():
    from ee_gym.generation.policies import CandidateConfidenceExit
    from ee_gym.generation.view import LayerView

    decoder = tiny_llama_decoder()
    rule = CandidateConfidenceExit(decoder, threshold=0.3, min_layer=2, k=4, rank=8)
    active = torch.ones(3, dtype=torch.bool)
    first, later = torch.randn(3, 32), torch.randn(3, 32)
    live_first = rule.signal(LayerView(decoder, 2, first, active))  # a new token: picks its candidates
    picked = rule.candidates(decoder.final_norm(first).detach())
    torch.testing.assert_close(
        live_first, rule.gap(decoder.final_norm(first).detach(), picked), atol=1e-5, rtol=0
    )
    live_later = rule.signal(LayerView(decoder, 3, later, active))  # same token: same candidates
    torch.testing.assert_close(
        live_later, rule.gap(decoder.final_norm(later).detach(), picked), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_a_policy_decides_from_the_state_alone_as_from_the_observation(threshold, monkeypatch):
    """REINFORCE's exits_at_layer (the state, no observation built) decides as act on the joined
    observation does, at every layer and threshold, and PolicyExit takes that path."""
    import agents
    from ee_gym.generation import PolicyExit
    from ee_gym.generation.view import LayerView

    decoder = tiny_llama_decoder()
    policy = agents.make("reinforce", seed=3, min_layer=2)
    rule = PolicyExit(policy.with_threshold(threshold) if threshold else policy, decoder)
    assert rule.state_path is not None
    with torch.no_grad():  # spread the scores around the threshold, so both answers occur
        for net in rule.policy.net.layers:
            net[0].weight.mul_(40.0)
    hidden = torch.randn(16, decoder.hidden_size, generator=torch.Generator().manual_seed(0))
    active = torch.ones(16, dtype=torch.bool)
    answers = set()
    for layer in range(1, DECODER_LAYERS):
        fast = rule(LayerView(decoder, layer, hidden, active))
        state_path, rule.state_path = rule.state_path, None
        slow = rule(LayerView(decoder, layer, hidden, active))
        rule.state_path = state_path
        assert torch.equal(torch.as_tensor(fast), torch.as_tensor(slow)), layer
        answers |= set(torch.as_tensor(fast).tolist())
    assert answers == {False, True}
    monkeypatch.setattr(rule, "observations", lambda view: pytest.fail("an observation was built"))
    rule(LayerView(decoder, 2, hidden, active))


def test_decode_costs_benchmark_times_every_variant_against_full_depth(tmp_path, capsys):
    """benchmarks.decode_costs on a tiny saved decoder and tiny XSum rows: one row per variant, full
    depth the reference, the policy rows with their decision cost; bad layers refused up front."""
    from benchmarks import decode_costs
    from tests.conftest import write_tiny_xsum

    decoder = tiny_llama_decoder()
    decoder.model.save_pretrained(tmp_path / "tiny")
    decoder.tokenizer.save_pretrained(tmp_path / "tiny")
    data = write_tiny_xsum(tmp_path / "data", rows=3)
    argv = ["--decoder", str(tmp_path / "tiny"), "--data-dir", str(data), "--articles", "2", "--rounds", "2"]
    rows = decode_costs.main([*argv, "--max-new-tokens", "4", "--static-layer", "2", "--min-layer", "1"])
    assert [row["variant"] for row in rows][0] == "full depth" and len(rows) == 6
    assert rows[0]["wall_speedup"] == 1.0
    policy_rows = [row for row in rows if row["variant"].startswith("policy")]
    assert len(policy_rows) == 3 and all(row["decision_us"] > 0 for row in policy_rows)
    assert (
        "every 2" in policy_rows[2]["variant"] and policy_rows[2]["probe_us"] > policy_rows[2]["decision_us"]
    )
    assert "decision_us" not in rows[1]  # a static exit decides nothing worth timing
    with pytest.raises(SystemExit, match="--static-layer"):
        decode_costs.main([*argv, "--static-layer", str(DECODER_LAYERS)])
