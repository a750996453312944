"""Lossless early exit: self-speculative decoding (draft with exits, verify at full depth).

An exit policy drafts ``k`` tokens, each decoded with early exits as :meth:`MultiExitDecoder.step`
does; the draft's cache entries are then dropped and one full-depth pass over the last kept token and
the ``k`` drafts (:meth:`MultiExitDecoder.extend`) gives the full model's next token after each. The
longest prefix of drafts that the full model agrees with is kept, plus the full model's own token
after it, so every emitted token is the full model's greedy token: the output equals full-depth
greedy decoding, token for token. The cache of every layer is filled from the verify pass (no
propagated states survive).

A batch keeps, each round, the shortest agreeing prefix of its unfinished rows: every row still
emits only full-model tokens, and the cache stays one length for all rows.

Whether it is faster depends on two measured numbers: the acceptance rate (how many drafts the full
model keeps) and the draft's cost (exit depth, plus the one LM-head product per drafted token). With
``a`` drafts kept on average of ``k``, a round emits ``a + 1`` tokens for ``k`` draft steps and one
verify pass over ``k + 1`` positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ee_gym.generation.decoder import GenerationOutput, MultiExitDecoder
from ee_gym.generation.view import ExitFn


@dataclass
class SpeculativeOutput(GenerationOutput):
    """Greedy full-depth tokens, and how the drafts fared.

    ``exit_layers`` holds L for every token (each is the full model's); ``drafted`` and ``accepted``
    count draft tokens proposed and kept over all rounds (per round, the batch's shortest agreeing
    prefix is kept), ``rounds`` the verify passes.
    """

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance(self) -> float:
        """Kept drafts / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per verify pass (kept drafts + the full model's own token)."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else float("nan")


@torch.no_grad()
def speculative_generate(
    decoder: MultiExitDecoder,
    exit_fn: ExitFn,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    prompts: Sequence[str] | None = None,
    draft_tokens: int = 4,
    max_new_tokens: int = 32,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> SpeculativeOutput:
    """Greedy decoding, drafted by ``exit_fn`` ``draft_tokens`` at a time and verified at full depth:
    the tokens of ``decoder.generate(..., exit_fn=None)``, with the arguments it takes."""
    if int(draft_tokens) < 1:
        raise ValueError(f"draft_tokens must be 1 or more, got {draft_tokens}")
    if "sliding_attention" in decoder.layer_adapter.layer_types():
        raise ValueError(
            "speculative decoding drops rejected drafts from the cache, which a sliding-window layer "
            "cannot undo: use a model without sliding-window attention"
        )
    input_ids, attention_mask = decoder.encode_prompts(input_ids, attention_mask, prompts)
    eos, pad = decoder.stop_tokens(stop_at_eos, eos_token_id, pad_token_id)
    out, state = decoder.prefill(input_ids, attention_mask)
    B = state.batch_size
    unfinished = torch.ones(B, dtype=torch.bool, device=decoder.device)
    emitted: list[torch.Tensor] = []
    drafted = accepted = rounds = 0

    def emit(token: torch.Tensor) -> None:
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        emitted.append(token)
        unfinished.logical_and_(~torch.isin(token, eos))

    if max_new_tokens > 0:
        emit(out.logits.argmax(-1))  # the prompt pass is full depth: the first token needs no draft
    while len(emitted) < max_new_tokens and bool(unfinished.any()):
        k = min(int(draft_tokens), max_new_tokens - len(emitted))
        start = state.length
        last, drafts = emitted[-1], []
        for _ in range(k):  # draft with exits (writes propagated entries, dropped below)
            last = decoder.step(state, last, exit_fn).logits.argmax(-1)
            drafts.append(last)
        state.truncate(start)
        feed = torch.stack([emitted[-1], *drafts], dim=1)  # [B, k + 1]
        full = decoder.extend(state, feed).argmax(-1)  # the full model's token after each fed one
        agree = (full[:, :k] == feed[:, 1:]) | ~unfinished[:, None]  # finished rows do not hold back
        kept = int(agree.long().cumprod(dim=1).sum(dim=1).min())
        state.truncate(start + 1 + kept)  # the last kept token and the kept drafts stay cached
        drafted, accepted, rounds = drafted + k, accepted + kept, rounds + 1
        for i in range(min(kept + 1, max_new_tokens - len(emitted))):
            emit(full[:, i])  # full[:, i] == drafts[i] for i < kept; full[:, kept] is the model's own
            if not bool(unfinished.any()):
                break  # every row has ended: generate stops here too, with no padding after
    tokens = torch.stack(emitted, 1) if emitted else input_ids.new_empty(B, 0).to(decoder.device)
    ended = torch.cumsum(torch.isin(tokens, eos).long(), dim=1) - torch.isin(tokens, eos).long()
    layers = torch.where(ended > 0, 0, decoder.num_layers)  # 0 after a row's end, as generate marks it
    return SpeculativeOutput(
        sequences=torch.cat([input_ids.to(decoder.device), tokens], dim=1),
        tokens=tokens,
        exit_layers=layers,
        num_layers=decoder.num_layers,
        drafted=drafted,
        accepted=accepted,
        rounds=rounds,
    )
