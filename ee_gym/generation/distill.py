"""Self-distillation data: every layer's state for each token the model generates at full depth.

No instruction data is on hand, so the targets of the exit heads (and of the token env) are the
model's own full-depth greedy continuations of the prompts: exit l is taught to say what the full
model says. Decoding at full depth with a KV cache visits exactly the positions that teacher forcing
on prompt + generation would, with the same hidden states, so one greedy run per prompt yields both the
targets and the per-layer states: the backbone runs once.

Recorded for the token at generated position i >= 1 (the one fed at decoding step i, whose next token
is the target; position 0 comes from the prompt's full-depth pass and has no exit decision):

    states[n, l-1]      s_l = final_norm(h_l), l = 1..L                    (float32)
    similarity[n, l-1]  cos(h_l, h_{l-1}), h_0 the token's embedding        (CALM's state signal)
    targets[n]          the full-depth greedy next token (end-of-sequence included)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ee_gym.generation.decoder import MultiExitDecoder


@dataclass
class TokenStates:
    """Per-layer states of N generated tokens (see the module docstring)."""

    states: np.ndarray  # [N, L, d] float32 s_l
    similarity: np.ndarray  # [N, L] float32
    targets: np.ndarray  # [N] int64
    prompt: np.ndarray  # [N] int64 which prompt (the caller's id, e.g. the XSum row)
    position: np.ndarray  # [N] int64 generated position of the fed token (>= 1)

    def __post_init__(self) -> None:
        n = self.targets.shape[0]
        if (
            self.states.ndim != 3
            or self.states.shape[0] != n
            or self.similarity.shape != self.states.shape[:2]
        ):
            raise ValueError(
                f"inconsistent shapes: states {self.states.shape}, similarity {self.similarity.shape}, "
                f"targets {self.targets.shape}"
            )

    @property
    def num_tokens(self) -> int:
        return self.targets.shape[0]

    @property
    def num_layers(self) -> int:
        return self.states.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.states.shape[2]

    def select(self, rows: np.ndarray) -> TokenStates:
        """The tokens ``rows`` (indices or a boolean mask)."""
        return TokenStates(
            self.states[rows],
            self.similarity[rows],
            self.targets[rows],
            self.prompt[rows],
            self.position[rows],
        )

    def split_by_prompt(self, fraction: float) -> tuple[TokenStates, TokenStates]:
        """(first ``fraction`` of the prompts, the rest), whole prompts on each side."""
        prompts = np.unique(self.prompt)
        cut = int(round(len(prompts) * fraction))
        first = np.isin(self.prompt, prompts[:cut])
        return self.select(first), self.select(~first)


@torch.no_grad()
def collect_token_states(
    decoder: MultiExitDecoder,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    prompt_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> TokenStates:
    """Greedy full-depth generation of ``prompts`` (text, tokenised by the decoder's tokenizer),
    recording every layer's state of each generated token (see the module docstring).

    Prompts are batched by length (left padded) to waste little on padding; ``prompt_ids`` name them
    in the result (default 0..n-1). Tokens after a row's end-of-sequence are not recorded.
    """
    if decoder.tokenizer is None:
        raise ValueError("collect_token_states tokenises text: the decoder needs a tokenizer")
    if decoder.num_layers < 2:
        raise ValueError("a decoder with one layer has no early exit to learn")
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    lengths = [len(decoder.tokenizer(p)["input_ids"]) for p in prompts]
    order = np.argsort(lengths, kind="stable")
    eos = decoder.eos_ids().to(decoder.device)
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("states", "similarity", "targets", "prompt", "position")
    }
    bar = tqdm(total=len(prompts), desc="self-distillation", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        rows = order[start : start + batch_size]
        batch = decoder.tokenizer(
            [prompts[i] for i in rows], return_tensors="pt", padding=True, padding_side="left"
        )
        out, state = decoder.prefill(batch["input_ids"], batch["attention_mask"])
        token = out.logits.argmax(-1)
        unfinished = ~torch.isin(token, eos)
        names = torch.tensor([prompt_ids[i] for i in rows])
        for position in range(1, max_new_tokens):
            if not bool(unfinished.any()):
                break
            step, hidden = decoder.step_with_states(state, token)
            states = decoder.final_norm(hidden[:, 1:]).float()
            similarity = F.cosine_similarity(hidden[:, 1:].float(), hidden[:, :-1].float(), dim=-1)
            following = step.logits.argmax(-1)
            alive = unfinished.cpu()  # the fed token was generated, so its next token is a real target
            parts["states"].append(states[alive].cpu().numpy())
            parts["similarity"].append(similarity[alive].cpu().numpy())
            parts["targets"].append(following[alive].cpu().numpy())
            parts["prompt"].append(names[alive].numpy())
            parts["position"].append(np.full(int(alive.sum()), position))
            # Ended rows are fed their last token again: their outputs are never recorded.
            token = torch.where(unfinished, following, token)
            unfinished &= ~torch.isin(following, eos)
        bar.update(len(rows))
    bar.close()
    if not parts["targets"]:
        raise ValueError("no token was generated after the first: raise max_new_tokens above 1")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    # Back to prompt order (then position), whatever order the length batching ran in.
    rank = {name: i for i, name in enumerate(prompt_ids)}
    order = np.lexsort((arrays["position"], np.array([rank[p] for p in arrays["prompt"].tolist()])))
    return TokenStates(
        states=np.ascontiguousarray(arrays["states"][order], dtype=np.float32),
        similarity=arrays["similarity"][order].astype(np.float32),
        targets=arrays["targets"][order].astype(np.int64),
        prompt=arrays["prompt"][order].astype(np.int64),
        position=arrays["position"][order].astype(np.int64),
    )
