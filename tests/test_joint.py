"""Stage 3 (joint): gradients reach only the chosen exit, one epoch trains both, resuming is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents.reinforce import PerLayerPolicy, Reinforce
from ee_gym import joint
from ee_gym.joint import FixedAgentExits, LearnedExits, Stage3Config, joint_rollout, train_stage3
from ee_gym.multiexit import MultiExitModel
from tests.conftest import killed_after_first_checkpoint, new_tiny_model


class ExitAtLayer(nn.Module):
    """A hand-forced policy: p = 1 at ``layer`` for every row, p = 0 elsewhere."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, states: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        return torch.where(layers == self.layer, 100.0, -100.0).to(states.dtype)


def _batch(model):
    batch = model.tokenize(["the film was good", "a bad story and plot", "fine"], max_length=32)
    return batch, torch.tensor([1, 0, 1])


def test_ce_reaches_only_the_chosen_exit(tiny_model):
    model = tiny_model.train()
    batch, labels = _batch(model)
    decide = LearnedExits(ExitAtLayer(2), replicas=2, generator=torch.Generator().manual_seed(0))
    out = joint_rollout(model, decide, batch, labels)
    assert out.exit_layer.tolist() == [2] * 6
    assert out.exit_chosen.all()
    out.ce.mean().backward()
    grads = [h.weight.grad is not None and h.weight.grad.abs().sum().item() > 0 for h in model.heads]
    assert grads == [False, True, False, False]
    assert model.pooler.weight.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        above = any(f"encoder.layer.{i}." in name for i in (2, 3))  # layers 3 and 4 never ran
        below = any(f"encoder.layer.{i}." in name for i in (0, 1))
        if above:
            assert param.grad is None or param.grad.abs().sum() == 0, name
        elif below and name.endswith("query.weight"):
            assert param.grad.abs().sum() > 0, name


class CoinFlip(nn.Module):
    """p = 0.5 everywhere: the replicas of an input take different exits."""

    def forward(self, states: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(states), dtype=states.dtype, requires_grad=True)


def test_shared_replicas_pay_the_ce_of_their_own_exit(tiny_model):
    """With one forward pass per input, replica k exiting at t pays CE of head t, as a full pass says."""
    model = tiny_model.eval()  # no dropout: the shared pass equals a full forward exactly
    batch, labels = _batch(model)
    decide = LearnedExits(CoinFlip(), replicas=8, generator=torch.Generator().manual_seed(0))
    out = joint_rollout(model, decide, batch, labels)
    exits = out.exit_layer.view(3, 8)
    assert any(len(set(row.tolist())) > 1 for row in exits)  # replicas of one input differ
    with torch.no_grad():
        full = model(**batch).logits  # [3, L, K]
    for i in range(3):
        for k in range(8):
            t = int(exits[i, k])
            expected = F.cross_entropy(full[i, t - 1][None], labels[i : i + 1])[None]
            torch.testing.assert_close(out.ce.view(3, 8)[i, k].detach(), expected[0], rtol=1e-5, atol=1e-5)
            assert out.correct.view(3, 8)[i, k] == (full[i, t - 1].argmax() == labels[i])
    # the policy's logits are shared by an input's replicas, one row per trajectory
    assert out.policy_logits.shape == (24, model.num_layers)


def test_policy_loss_does_not_reach_the_model(tiny_model):
    model = tiny_model.train()
    batch, labels = _batch(model)
    net = PerLayerPolicy(model.hidden_size, model.num_layers)
    out = joint_rollout(
        model, LearnedExits(net, 4, generator=torch.Generator().manual_seed(0)), batch, labels
    )
    assert ((out.exit_layer >= 1) & (out.exit_layer <= 4)).all()
    forced = out.exit_layer == 4
    assert (out.exit_chosen | forced).all()
    from agents.reinforce import trajectory_log_prob

    trajectory_log_prob(out.policy_logits, out.exit_layer, out.exit_chosen).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_a_fixed_agent_decides_the_exits_as_in_inference(tiny_model):
    """A rule held fixed exits where batched inference says it exits; only those heads get gradient."""
    import agents
    from ee_gym.inference import predict

    model = tiny_model.eval()
    texts = ["the film was good", "a bad story and plot", "fine", "not bad at all, really", "dull"]
    rule = agents.make("maxprob", threshold=0.5005)
    expected = predict(model, texts, policy=rule, batch_size=5, max_length=32).exit_layers
    batch = model.tokenize(texts, max_length=32)
    out = joint_rollout(model, FixedAgentExits(rule, model), batch, torch.tensor([1, 0, 1, 1, 0]))
    assert out.exit_layer.tolist() == expected.tolist()
    assert out.policy_logits is None
    out.ce.sum().backward()
    used = sorted(set(expected.tolist()))
    for layer, head in enumerate(model.heads, start=1):
        has_grad = head.weight.grad is not None and head.weight.grad.abs().sum().item() > 0
        assert has_grad == (layer in used), layer


def test_a_fixed_agent_trains_the_model_and_stays_as_it_was(tokenizer, tiny_data, tmp_path):
    import agents

    model = new_tiny_model(tokenizer)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = Stage3Config(
        task="sst2",
        data_dir=str(tiny_data),
        output_dir=str(tmp_path / "run"),
        batch_size=8,
        learning_rate=5e-3,
        max_length=32,
        train_limit=24,
        progress=False,
    )
    result = train_stage3(
        config, model=model, policy=agents.make("static", layer=2), memorized=np.ones(24, int)
    )
    changed = {name for name, v in result.model.state_dict().items() if not torch.equal(v, start[name])}
    assert "heads.1.weight" in changed and "heads.0.weight" not in changed and "heads.2.weight" not in changed
    assert result.history[0]["mean_exit_layer"] == 2.0 and result.history[0]["policy_loss"] == 0.0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["agent"] == "static"
    from agents.base import load_policy

    assert load_policy(result.policy_dir).get_params() == {"layer": 2}


def test_threshold_rollout_needs_separate_replicas(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="separate_replicas"):
        Stage3Config(task="sst2", rollout="threshold", output_dir=str(tmp_path)).resolved(tiny_model)


def _tiny_run(tokenizer, tiny_data, output_dir, **overrides):
    model = new_tiny_model(tokenizer)
    policy = Reinforce(seed=1)
    settings = dict(
        task="sst2",
        data_dir=str(tiny_data),
        output_dir=str(output_dir),
        epochs=2,
        batch_size=8,
        replicas=4,
        learning_rate=5e-3,
        policy_learning_rate=1e-2,
        max_length=32,
        train_limit=24,
        progress=False,
        seed=3,
    )
    settings.update(overrides)
    memorized = np.tile([1, 2, 3, 4], 6)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_stage3(Stage3Config(**settings), model=model, policy=policy, memorized=memorized)
    return result, start


def test_one_epoch_trains_model_and_policy_and_writes_the_run(tokenizer, tiny_data, tmp_path):
    policy_start = Reinforce(seed=1)
    policy_start._build(32, 4)
    result, start = _tiny_run(tokenizer, tiny_data, tmp_path / "run", epochs=1)
    changed = [name for name, v in result.model.state_dict().items() if not torch.equal(v, start[name])]
    assert any(name.startswith("heads.") for name in changed)
    assert any(name.startswith("encoder.") for name in changed)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            result.policy.net.state_dict().values(), policy_start.net.state_dict().values(), strict=True
        )
    )
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and 1 <= records[0]["mean_exit_layer"] <= 4
    assert (run / "checkpoint" / "trainer_state.pt").is_file()
    assert (run / "checkpoint" / "policy" / "policy.json").is_file()
    loaded = MultiExitModel.from_pretrained(result.model_dir)
    assert loaded.fingerprint() == result.model.fingerprint()
    from agents.base import load_policy

    policy = load_policy(result.policy_dir)
    for a, b in zip(policy.net.state_dict().values(), result.policy.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A second call finds the finished run and trains nothing.
    again, _ = _tiny_run(tokenizer, tiny_data, run, epochs=1)
    assert again.model.fingerprint() == result.model.fingerprint()
    with pytest.raises(ValueError, match="replicas"):
        _tiny_run(tokenizer, tiny_data, run, epochs=1, replicas=2)


def test_interrupted_run_resumes_to_the_same_weights(tokenizer, tiny_data, tmp_path, monkeypatch):
    straight, _ = _tiny_run(tokenizer, tiny_data, tmp_path / "straight")

    killed_after_first_checkpoint(monkeypatch, joint)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tokenizer, tiny_data, tmp_path / "resumed")
    resumed, _ = _tiny_run(tokenizer, tiny_data, tmp_path / "resumed")

    assert [r["epoch"] for r in resumed.history] == [1, 2]
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for (name, a), (_, b) in zip(
        straight.policy.net.state_dict().items(), resumed.policy.net.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed.history == [
        {**r, "seconds": resumed.history[i]["seconds"]} for i, r in enumerate(straight.history)
    ]
