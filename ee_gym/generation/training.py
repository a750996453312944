"""Stage 1 for decoders: train the exit heads with the depth-weighted next-token cross-entropy.

    loss = sum_l l * CE(head_l(s_l), y) / sum_l l,   l = 1..L     (as stage 1 for classification)

on self-distilled tokens (:mod:`ee_gym.generation.distill`: y is the full model's own greedy token),
from cached states, so the backbone never runs here. The backbone and the LM head stay frozen; what
trains are the heads of layers 1..L-1 (exit L is the model's own head: its term is a constant).

With per-layer heads and nothing shared, the loss splits into one independent term per head: the
weights only scale each head's gradient. A step may therefore train a random subset of the heads
(``layers_per_step``), drawn uniformly and scaled by (L-1)/k so that the step's loss is an unbiased
estimate of the weighted sum; on a CPU the LM-head product (vocab x d per token and layer) is nearly
all of the cost, so this divides the time per step by (L-1)/k. An epoch then shows each head k/(L-1)
of the tokens.

``targets="distribution"`` swaps the one-hot greedy token for the full model's whole next-token
distribution (soft cross-entropy, the tuned lens's distillation loss): the same minimiser when exit l
can match the full model, far more signal per token; the greedy token stays what is scored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ee_gym.generation.decoder import MultiExitDecoder
from ee_gym.generation.distill import TokenStates

TARGETS = ("greedy", "distribution")


@dataclass
class HeadTrainingConfig:
    """Arguments of :func:`train_exit_heads`."""

    # Defaults as benchmarks/generation.py runs them: on 544 SmolLM2 tokens (4 epochs), held-out
    # weighted loss 6.50 for rank 64 at 3e-3 vs 6.88 (full rank, 1e-3) and 8.11 (full rank, 3e-3).
    epochs: int = 3
    batch_size: int = 32  # tokens per step
    layers_per_step: int | None = 8  # heads trained per step (None: all L - 1)
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    targets: str = "greedy"  # or "distribution": the full model's softmax (see the module docstring)
    seed: int = 0


def layer_weights(num_layers: int) -> np.ndarray:
    """w_l = l / sum_j j for l = 1..L."""
    weights = np.arange(1, num_layers + 1, dtype=np.float64)
    return weights / weights.sum()


@torch.no_grad()
def exit_cross_entropy(decoder: MultiExitDecoder, tokens: TokenStates, batch_size: int = 64) -> np.ndarray:
    """[N, L] cross-entropy of every exit head against the tokens' targets (float64)."""
    out = np.zeros((tokens.num_tokens, tokens.num_layers))
    targets = torch.from_numpy(tokens.targets).to(decoder.device)
    for start in range(0, tokens.num_tokens, batch_size):
        rows = slice(start, min(start + batch_size, tokens.num_tokens))
        states = torch.from_numpy(tokens.states[rows]).to(decoder.device, decoder.dtype)
        for layer in range(1, tokens.num_layers + 1):
            logits = decoder.head(layer)(states[:, layer - 1]).float()
            out[rows, layer - 1] = (
                F.cross_entropy(logits, targets[rows], reduction="none").double().cpu().numpy()
            )
    return out


def weighted_exit_loss(cross_entropy: np.ndarray) -> float:
    """sum_l w_l * mean CE_l of an [N, L] cross-entropy table."""
    return float((cross_entropy.mean(0) * layer_weights(cross_entropy.shape[1])).sum())


def train_exit_heads(
    decoder: MultiExitDecoder,
    train: TokenStates,
    config: HeadTrainingConfig | None = None,
    valid: TokenStates | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``decoder``'s heads of layers 1..L-1 in place; returns one record per epoch.

    Each record holds the epoch's mean step loss (the estimate of sum_{l<L} w_l CE_l) and, with
    ``valid``, the full weighted loss and the per-layer cross-entropy on it (before training too, as
    epoch 0). The decoder's own weights are frozen (``requires_grad=False``) and stay so.
    """
    config = config or HeadTrainingConfig()
    if config.targets not in TARGETS:
        raise ValueError(f"unknown targets {config.targets!r}; choose one of {', '.join(TARGETS)}")
    if decoder.heads is None:
        raise ValueError(
            "the 'shared' head kind has nothing to train: build the decoder with head_kind='adapter' "
            "(or 'copy')"
        )
    if train.num_layers != decoder.num_layers:
        raise ValueError(f"token states of {train.num_layers} layers for a decoder of {decoder.num_layers}")
    num_layers, trainable = decoder.num_layers, decoder.num_layers - 1
    k = trainable if config.layers_per_step is None else min(int(config.layers_per_step), trainable)
    weights = torch.tensor(layer_weights(num_layers), dtype=torch.float32)
    decoder.model.requires_grad_(False)
    decoder.heads.requires_grad_(True)
    decoder.heads.train()
    params = [p for p in decoder.heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    history = [_valid_record(decoder, valid, 0, None, 0.0)] if valid is not None else []
    steps_per_epoch = -(-train.num_tokens // config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="exit heads", disable=not progress)
    targets_all = torch.from_numpy(train.targets)
    for epoch in range(1, config.epochs + 1):
        started, total, count = time.perf_counter(), 0.0, 0
        order = rng.permutation(train.num_tokens)
        for start in range(0, train.num_tokens, config.batch_size):
            rows = np.sort(order[start : start + config.batch_size])
            states = torch.from_numpy(train.states[rows]).to(decoder.device, decoder.dtype)
            targets = targets_all[rows].to(decoder.device)
            if config.targets == "distribution":
                with torch.no_grad():
                    targets = torch.softmax(decoder.head(num_layers)(states[:, -1]).float(), -1)
            layers = np.sort(rng.choice(trainable, size=k, replace=False)) + 1
            loss = states.new_zeros((), dtype=torch.float32)
            for layer in layers.tolist():
                logits = decoder.head(layer)(states[:, layer - 1]).float()
                loss = loss + weights[layer - 1] * F.cross_entropy(logits, targets)
            loss = loss * (trainable / k)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            total, count = total + loss.item() * len(rows), count + len(rows)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        record = {"epoch": epoch, "train_loss": total / count, "seconds": time.perf_counter() - started}
        history.append(_valid_record(decoder, valid, epoch, record) if valid is not None else record)
    bar.close()
    decoder.heads.eval()
    decoder.heads.requires_grad_(False)
    decoder.heads_metadata = {"training": asdict(config), "history": history}
    return history


def _valid_record(
    decoder: MultiExitDecoder, valid: TokenStates, epoch: int, record: dict | None, seconds: float = 0.0
) -> dict:
    was_training = decoder.heads.training
    decoder.heads.eval()
    ce = exit_cross_entropy(decoder, valid)
    decoder.heads.train(was_training)
    record = dict(record or {"epoch": epoch, "seconds": seconds})
    record["valid_loss"] = weighted_exit_loss(ce)
    record["valid_cross_entropy"] = ce.mean(0).round(4).tolist()
    return record
