"""Exit heads in closed form: per-layer least-squares maps from each layer's state to the last one's.

An ``adapter`` exit head reads ``lm_head(s_l + W_l s_l + b_l)``. If s_l + W_l s_l + b_l were s_L, the
exit would say what the full model says; so each (W_l, b_l) is fitted by ridge regression of s_L on
s_l over the positions of teacher-forced text (the "linear shortcut" of Din et al., 2023, on the
final-norm states):

    [A_l; b_l] = argmin sum_positions || s_L - A_l s_l - b_l ||^2 + ridge * mean(diag X^T X) * ||A_l||^2
    W_l = A_l - I

For an unconstrained linear map the least-squares solution is the same whatever metric measures the
output error, so it is also the best map under the LM head's own metric: no vocabulary-sized product
is ever computed, which is what makes gradient training (:mod:`ee_gym.generation.training`) slow on a
CPU. Only the normal equations are kept (L x (d + 1)^2 numbers), so any amount of text streams
through in one pass of the backbone per text; a few seconds per XSum article on one CPU thread.

What text: the XSum prompt (the article in the chat template) followed by its reference summary.
Every position is a training row, so one article gives hundreds of rows (about 60,000 for the
``heads`` split's 100 articles), against the ~30 per article that self-distillation's sequential
decoding gives. On SmolLM2-135M this lowers the held-out cross-entropy against the full model's
greedy tokens at layer 24 from 3.26 (gradient-trained rank-64 adapters on 3,000 self-distilled
tokens) to 1.71 nats, and raises top-1 agreement there from 0.47 to 0.62.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ee_gym.generation.data import format_prompt, load_xsum
from ee_gym.generation.decoder import MultiExitDecoder

DEFAULT_RIDGE = 1e-4  # relative to the mean diagonal of X^T X: numerical safety, not a prior


class NormalEquations:
    """Running sums X^T X and X^T Y of the regressions s_L ~ [s_l, 1], one per layer l < L (float64)."""

    def __init__(self, num_layers: int, hidden_size: int):
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.xtx = torch.zeros(num_layers - 1, hidden_size + 1, hidden_size + 1, dtype=torch.float64)
        self.xty = torch.zeros(num_layers - 1, hidden_size + 1, hidden_size, dtype=torch.float64)
        self.rows = 0

    def add(self, states: torch.Tensor) -> None:
        """Add positions' states [N, L, d] (any dtype) as N regression rows."""
        if states.ndim != 3 or states.shape[1:] != (self.num_layers, self.hidden_size):
            raise ValueError(
                f"states of shape {tuple(states.shape)}; expected [N, {self.num_layers}, {self.hidden_size}]"
            )
        states = states.detach().to("cpu", torch.float64)
        target = states[:, -1]
        ones = states.new_ones(states.shape[0], 1)
        for layer in range(self.num_layers - 1):
            x = torch.cat([states[:, layer], ones], dim=1)
            self.xtx[layer] += x.T @ x
            self.xty[layer] += x.T @ target
        self.rows += states.shape[0]

    def solve(self, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [L-1, d, d], b [L-1, d]) with s_L ~ A_l s_l + b_l; the bias is not penalised."""
        if self.rows <= self.hidden_size:
            raise ValueError(
                f"{self.rows} positions cannot determine a {self.hidden_size} x {self.hidden_size} map: "
                "fit on more text"
            )
        d = self.hidden_size
        maps, biases = [], []
        for layer in range(self.num_layers - 1):
            xtx = self.xtx[layer].clone()
            scale = float(torch.diagonal(xtx)[:d].mean())
            xtx[:d, :d] += ridge * scale * torch.eye(d, dtype=torch.float64)
            solution = torch.linalg.solve(xtx, self.xty[layer])  # [d + 1, d]
            maps.append(solution[:d].T)
            biases.append(solution[d])
        return torch.stack(maps), torch.stack(biases)


@torch.no_grad()
def accumulate_texts(
    decoder: MultiExitDecoder,
    texts: Sequence[str],
    equations: NormalEquations | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> NormalEquations:
    """Teacher-force each text (one at a time: no padding rows) and add its positions' states.

    ``max_length`` keeps the last tokens of a longer text (the end of a prompt is nearest to what
    follows it).
    """
    if decoder.tokenizer is None:
        raise ValueError("fitting on text needs the decoder's tokenizer")
    equations = equations or NormalEquations(decoder.num_layers, decoder.hidden_size)
    for text in tqdm(texts, desc="exit heads (regression)", unit="text", disable=not progress):
        ids = decoder.tokenizer(text, return_tensors="pt")["input_ids"]
        if max_length is not None:
            ids = ids[:, -int(max_length) :]
        equations.add(decoder.layer_states(ids)[0])
    return equations


def set_adapters(decoder: MultiExitDecoder, maps: torch.Tensor, biases: torch.Tensor) -> None:
    """Write s + W s + b = A s + b into the decoder's full-rank adapter heads."""
    if decoder.head_kind != "adapter" or decoder.adapter_rank is not None:
        raise ValueError(
            "closed-form heads are full-rank adapters: build the decoder with head_kind='adapter', "
            "adapter_rank=None"
        )
    eye = torch.eye(decoder.hidden_size, dtype=maps.dtype)
    for layer in range(decoder.num_layers - 1):
        up = decoder.heads[layer].adapter.up
        up.weight.data.copy_((maps[layer] - eye).to(up.weight.dtype))
        up.bias.data.copy_(biases[layer].to(up.bias.dtype))


def xsum_texts(
    decoder: MultiExitDecoder, split: str = "heads", data_dir: str | os.PathLike | None = None,
    max_prompts: int | None = None,
) -> list[str]:  # fmt: skip
    """Each article's prompt (chat template included) followed by its reference summary."""
    return [
        format_prompt(decoder.tokenizer, a.article) + a.reference
        for a in load_xsum(split, data_dir, max_prompts)
    ]


def fit_exit_heads(
    decoder: MultiExitDecoder,
    texts: Sequence[str],
    ridge: float = DEFAULT_RIDGE,
    max_length: int | None = None,
    progress: bool = True,
) -> dict:
    """Fit ``decoder``'s full-rank adapter heads in closed form on ``texts`` (in place).

    Returns what to record beside the heads (method, ridge, number of positions).
    """
    equations = accumulate_texts(decoder, texts, max_length=max_length, progress=progress)
    maps, biases = equations.solve(ridge)
    set_adapters(decoder, maps, biases)
    decoder.heads.eval()
    record = {"method": "regression", "ridge": ridge, "positions": equations.rows, "texts": len(texts)}
    decoder.heads_metadata = {"training": record}
    return record
