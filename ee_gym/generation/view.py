"""What an exit rule sees after each layer of the token being decoded, and the rule's signature.

:class:`LayerView` is the one object every exit rule reads (CALM's rules, a learned policy, the
oracle, the live token env's bookkeeping): the layer, the hidden state, the rows still decoding, and
on first access the signals a rule may need (states, logits, confidence, similarity), so that a rule
that reads none of them pays nothing. Kept apart from the decoding loop so that exit rules
(:mod:`ee_gym.generation.policies`) depend on the view, not on how decoding is run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ee_gym.generation.decoder import MultiExitDecoder


def probability_gap(logits: torch.Tensor) -> torch.Tensor:
    """p(1st) - p(2nd) of the softmax of ``logits`` [..., V], in float32."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


class LayerView:
    """What an exit callback sees after layer ``layer`` (1-based) for the current token.

    ``states`` (final norm of ``hidden``, the s_l of docs/method.md), ``logits`` (exit ``layer``'s
    next-token logits), ``confidence`` (their top-1 minus top-2 probability, CALM's softmax signal)
    and ``similarity`` (cosine of h_l and h_{l-1}, CALM's state signal) are computed on first access
    only, so callbacks that need none of them pay nothing.
    """

    def __init__(
        self,
        decoder: MultiExitDecoder,
        layer: int,
        hidden: torch.Tensor,
        active: torch.Tensor,
        previous: torch.Tensor | None = None,
    ):
        self.decoder = decoder
        self.layer = layer
        self.hidden = hidden  # [B, d] h_l
        self.active = active  # [B] bool, rows that have not exited yet (decisions for others are ignored)
        self.previous = previous  # [B, d] h_{l-1}; h_0 is the token's embedding
        # exit l's logits where a signal computed them: (rows [B] bool, logits [rows, V]); the decoder
        # reuses them for the rows that exit here, so the head runs once per token at its exit layer
        self.head_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_layers(self) -> int:
        return self.decoder.num_layers

    @cached_property
    def states(self) -> torch.Tensor:
        return self.decoder.final_norm(self.hidden)

    @cached_property
    def numpy_states(self) -> np.ndarray:
        """``states`` as a float32 numpy array on the CPU: what the cheap decisions compute on
        (:meth:`~ee_gym.generation.decoder.MultiExitDecoder.numpy_final_norm`, or the torch states
        when a signal already computed them)."""
        if "states" in self.__dict__:  # cached_property's slot: computed once already
            return self.states.detach().to("cpu", torch.float32).numpy()
        return self.decoder.numpy_final_norm(self.hidden)

    def squashed_states(self, scale: float) -> np.ndarray:
        """tanh(s_l / ``scale``) as float32 numpy: the state observation that the cheap decisions read
        (``ee_gym.generation.table.squash`` of ``numpy_states``), with the final norm folded with
        1 / scale, in as few library calls as it takes (each is slow right after a layer)."""
        if "states" in self.__dict__:  # a signal computed the torch states already
            return np.tanh(self.numpy_states / np.float32(scale))
        states = self.decoder.numpy_final_norm(self.hidden, divide_by=scale)
        return np.tanh(states, out=states)

    @cached_property
    def logits(self) -> torch.Tensor:
        logits = self.decoder.head(self.layer)(self.states)
        self.head_logits = (torch.ones_like(self.active, dtype=torch.bool), logits)
        return logits

    @cached_property
    def confidence(self) -> torch.Tensor:
        """[B] p_l(1st) - p_l(2nd) in float32 on the CPU, 0 for rows that already exited: the head (a
        vocabulary-sized product, the cost of this signal) runs on the active rows only."""
        out = torch.zeros(self.batch_size)
        active = self.active.to(self.hidden.device)
        with torch.no_grad():  # a decision signal, never trained through
            if bool(active.any()):
                logits = self.decoder.head(self.layer)(self.states[active])
                out[active.cpu()] = probability_gap(logits).cpu()
                if self.head_logits is None:
                    self.head_logits = (active, logits)
        return out

    @cached_property
    def similarity(self) -> torch.Tensor:
        """[B] cos(h_l, h_{l-1}) in float32."""
        if self.previous is None:
            raise ValueError("this view carries no previous hidden state (h_{l-1})")
        return F.cosine_similarity(self.hidden.float(), self.previous.float(), dim=-1)


#: After layer l < L: a bool per row, True = this row's token exits here.
ExitFn = Callable[[LayerView], "torch.Tensor | Sequence[bool]"]


def exit_at_layer(layer: int) -> ExitFn:
    """An exit rule that sends every token out at ``layer`` (1-based)."""

    def rule(view: LayerView) -> torch.Tensor:
        return torch.full((view.batch_size,), view.layer >= layer, dtype=torch.bool)

    return rule
