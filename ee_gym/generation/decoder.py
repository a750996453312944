"""A causal language model with one exit per layer, decoded token by token with a KV cache.

Decoding runs in two calls: :meth:`MultiExitDecoder.prefill` runs the prompt at full depth and fills
every layer's cache; :meth:`MultiExitDecoder.step` runs one new token layer by layer and asks an exit
callback after each layer l < L. When a row exits at layer t, the skipped layers t+1..L still get keys
and values for that position, computed from h_t by each skipped layer's attention-input path
(input norm, k/v projections, rotary): *state propagation*, as in CALM. Later tokens can then attend
to it at every layer.

This module is the decoding loop and the object that ties the parts together, split as the encoder
side is:

    layers.py   the layer adapter (the decoder's backbones.py): loading, layer calls, masks, KV propagation
    heads.py    exit heads: their kinds, how they are built, their folder on disk
    view.py     LayerView, what an exit rule reads after each layer, and the ExitFn signature
    decoder.py  MultiExitDecoder: prefill, step, generate (and the names above, re-exported)
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PretrainedConfig, PreTrainedModel

from ee_gym.generation.heads import (
    HEAD_KINDS,
    HEADS_CONFIG,
    HEADS_WEIGHTS,
    AdapterHead,
    ExitAdapter,
    build_heads,
    read_head_weights,
    read_heads_record,
    resolve_head_kind,
    write_heads,
)
from ee_gym.generation.layers import (
    DEFAULT_DECODER,
    EMBEDDED_DECODERS,
    SUPPORTED_DECODER_TYPES,
    DecoderLayers,
    default_device,
    default_dtype,
    resolve_decoder,
)
from ee_gym.generation.view import ExitFn, LayerView, exit_at_layer, probability_gap

__all__ = [  # the names other modules import from here, wherever they now live
    "DEFAULT_DECODER",
    "EMBEDDED_DECODERS",
    "HEADS_CONFIG",
    "HEADS_WEIGHTS",
    "HEAD_KINDS",
    "SUPPORTED_DECODER_TYPES",
    "AdapterHead",
    "DecodeState",
    "ExitAdapter",
    "ExitFn",
    "GenerationOutput",
    "LayerView",
    "MultiExitDecoder",
    "StepOutput",
    "exit_at_layer",
    "probability_gap",
    "resolve_decoder",
]


@dataclass
class DecodeState:
    """What decoding carries from one token to the next (the cache is updated in place)."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T] 1 = token, 0 = padding, one column per cached position
    next_positions: torch.Tensor  # [B] the position id the next token gets (padding not counted)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        """Cached positions, padding included (the same at every layer)."""
        return self.attention_mask.shape[1]

    def clone(self) -> DecodeState:
        """An independent copy (cache included): decode several ways from one prefill."""
        return copy.deepcopy(self)

    def truncate(self, length: int) -> None:
        """Forget every position after the first ``length`` (at every layer), as if they were never
        fed: what speculative decoding does with rejected draft tokens. Positions after a prefill are
        tokens in every row (padding is on the left), so each row's next position moves back as many."""
        removed = self.length - int(length)
        if removed < 0:
            raise ValueError(f"cannot truncate {self.length} cached positions to {length}")
        if removed:
            self.cache.crop(-removed)
            self.attention_mask = self.attention_mask[:, : int(length)]
            self.next_positions = self.next_positions - removed


@dataclass
class StepOutput:
    """One decoding step: next-token logits from each row's exit."""

    logits: torch.Tensor  # [B, V] head_t(final_norm(h_t)) at each row's exit layer t
    exit_layers: torch.Tensor  # [B] long, 1..L
    hidden: torch.Tensor  # [B, d] h_t, the exit layer's hidden state (before the final norm)


@dataclass
class GenerationOutput:
    """Greedy decoding with exits.

    ``exit_layers[b, i]`` is the layer whose head chose ``tokens[b, i]``: L for the first token (the
    prompt runs at full depth), the exit of the step that fed ``tokens[b, i - 1]`` for the others, and 0
    for padding after the row ended with an end-of-sequence token.
    """

    sequences: torch.Tensor  # [B, P + N] prompt (left padded) then generated tokens
    tokens: torch.Tensor  # [B, N] generated tokens
    exit_layers: torch.Tensor  # [B, N] long
    num_layers: int

    @property
    def mean_exit_layer(self) -> float:
        """Mean exit layer over generated tokens (padding excluded)."""
        used = self.exit_layers[self.exit_layers > 0]
        return float(used.float().mean()) if used.numel() else float("nan")


class MultiExitDecoder(nn.Module):
    """A causal LM with a next-token exit after every layer, decoded layer by layer.

    ``head_kind`` chooses the heads of layers 1..L-1 (exit L is always the model's own head):

    * ``copy`` (the default, as docs/method.md): a trainable copy of the LM head per layer; it costs
      (L - 1) x vocab x d parameters (3.3 GB in float32 for SmolLM2-135M).
    * ``shared``: the model's own LM head at every layer, CALM's choice and a valid zero-training
      start (``share_heads=True`` is the older spelling of it).
    * ``adapter``: ``lm_head(s + W_l s + b_l)`` with W_l d x d (or of rank ``adapter_rank``) starting
      at zero, i.e. the shared head at first; 29 x (576^2 + 576) = 9.6 M parameters for SmolLM2-135M
      at full rank, trainable on a CPU (:mod:`ee_gym.generation.training`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        share_heads: bool = False,
        tokenizer=None,
        head_kind: str | None = None,
        adapter_rank: int | None = None,
    ):
        super().__init__()
        layers = DecoderLayers(model)  # refuses families it cannot run layer by layer
        self.model = model
        self.__dict__["layer_adapter"] = layers  # the model is registered once, above; not a submodule
        self.config = model.config
        self.tokenizer = tokenizer
        self.name: str | None = None  # what from_pretrained loaded ("smollm2", a folder, ...)
        self.heads_metadata: dict = {}  # what load_heads read beside the weights (how they were trained)
        self.set_head_kind(resolve_head_kind(head_kind, share_heads), adapter_rank)

    def set_head_kind(self, head_kind: str, adapter_rank: int | None = None) -> MultiExitDecoder:
        """(Re)build the heads of layers 1..L-1 as ``head_kind``, at their initialisation."""
        lm_head = self.model.get_output_embeddings()
        self.heads = build_heads(lm_head, head_kind, self.num_layers, self.hidden_size, adapter_rank)
        self.head_kind, self.adapter_rank = head_kind, adapter_rank
        self.share_heads = head_kind == "shared"
        return self

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_DECODER,
        gguf_file: str | None = None,
        share_heads: bool = False,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        load_tokenizer: bool = True,
        head_kind: str | None = None,
        adapter_rank: int | None = None,
        heads: str | os.PathLike | None = None,
    ) -> MultiExitDecoder:
        """Load a pretrained causal LM (a hub name, a folder, or an embedded short name like ``smollm2``).

        ``gguf_file`` names a GGUF file inside the folder (dequantised on load). ``dtype=None``
        picks float32 on CPU and bfloat16 (else float16) on CUDA. ``heads`` is a folder written by
        :meth:`save_heads`: its heads replace the fresh ones (and set the head kind).
        """
        path, gguf_file = resolve_decoder(name_or_path, gguf_file)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs) if load_tokenizer else None
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # batching needs one; it is always masked out
        if heads is not None:  # the folder decides the kind: no copies made only to be replaced
            head_kind, adapter_rank, share_heads = "shared", None, False
        decoder = cls(
            model,
            share_heads=share_heads,
            tokenizer=tokenizer,
            head_kind=head_kind,
            adapter_rank=adapter_rank,
        )
        decoder.name = str(name_or_path)
        if heads is not None:
            decoder.load_heads(heads)
        return decoder.to(device).eval()

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        share_heads: bool = False,
        tokenizer=None,
        head_kind: str | None = None,
        adapter_rank: int | None = None,
    ) -> MultiExitDecoder:
        """Random weights from a config (the tests use tiny ones)."""
        return cls(
            AutoModelForCausalLM.from_config(config),
            share_heads=share_heads,
            tokenizer=tokenizer,
            head_kind=head_kind,
            adapter_rank=adapter_rank,
        )

    # -- exit heads on disk ----------------------------------------------------------------------
    def save_heads(self, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Write the heads of layers 1..L-1 to ``folder`` (:func:`~ee_gym.generation.heads.write_heads`:
        their kind and sizes, ``metadata``, and their weights), atomically."""
        record = {
            "head_kind": self.head_kind,
            "adapter_rank": self.adapter_rank,
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "metadata": metadata or {},
        }
        return write_heads(folder, self.heads, record)

    def load_heads(self, folder: str | os.PathLike) -> MultiExitDecoder:
        """Replace the heads of layers 1..L-1 with those saved in ``folder`` by :meth:`save_heads`."""
        expected = {
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }
        record = read_heads_record(folder, expected)
        self.set_head_kind(record["head_kind"], record["adapter_rank"])
        if self.heads is not None:
            self.heads.load_state_dict(read_head_weights(folder, self.device), strict=True)
        self.heads_metadata = record.get("metadata", {})
        return self

    def fingerprint(self) -> str:
        """A hash of the config, the head kind and every weight (heads included): caches record it."""
        digest = hashlib.sha256()
        digest.update(self.config.to_json_string(use_diff=False).encode())
        digest.update(f"{self.head_kind}:{self.adapter_rank}".encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    # -- sizes and parts ---------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """The inner decoder (``LlamaModel`` and kin): embeddings, layers, final norm, rotary."""
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.backbone.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embed_tokens.weight.dtype

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm: the state s_l that every exit head reads."""
        return self.backbone.norm(hidden)

    def numpy_final_norm(self, hidden: torch.Tensor, divide_by: float = 1.0) -> np.ndarray:
        """:meth:`final_norm` (over ``divide_by``) as a float32 numpy array on the CPU, for the cheap
        exit decisions: for Llama-style RMS norms (weight * h / rms(h)) it is computed in numpy, in as
        few calls as it takes, since right after a layer has streamed its weights each call into a
        library costs tens of microseconds (caches cold), far more than its arithmetic; other norms
        run in torch. ``divide_by`` folds an observation's scale into the norm's weight."""
        if getattr(self, "_numpy_norm", None) is None:  # the norm's weight and epsilon, read once
            norm = self.backbone.norm
            weight = getattr(norm, "weight", None)
            rms_style = type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")
            self._numpy_norm = (
                (weight.detach().float().cpu().numpy().copy(), float(norm.variance_epsilon), {})
                if rms_style and weight is not None
                else False
            )
        if self._numpy_norm is False:
            with torch.no_grad():
                states = self.final_norm(hidden).detach().to("cpu", torch.float32).numpy()
            return states / np.float32(divide_by) if divide_by != 1.0 else states
        weight, eps, scaled = self._numpy_norm
        if divide_by != 1.0:  # weight / c, kept per scale
            weight = scaled.get(divide_by)
            if weight is None:
                weight = scaled[divide_by] = self._numpy_norm[0] / np.float32(divide_by)
        plain = hidden.dtype is torch.float32 and hidden.is_cpu and not hidden.requires_grad
        rows = hidden.numpy() if plain else hidden.detach().to("cpu", torch.float32).numpy()
        if len(rows) == 1:  # one row: its mean square as a Python float, no array arithmetic
            inverse_rms = 1.0 / math.sqrt(float(rows[0] @ rows[0]) / rows.shape[-1] + eps)
            return (rows * weight) * np.float32(inverse_rms)
        mean_square = np.einsum("bd,bd->b", rows, rows)[:, None] / np.float32(rows.shape[-1])
        return weight * (rows / np.sqrt(mean_square + np.float32(eps)))

    def head(self, layer: int) -> nn.Module:
        """The LM head of exit ``layer`` (1-based); exit L is the model's own."""
        if not 1 <= layer <= self.num_layers:
            raise IndexError(f"exit {layer} out of range 1..{self.num_layers}")
        if self.heads is None or layer == self.num_layers:
            return self.model.get_output_embeddings()
        return self.heads[layer - 1]

    def exit_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of exit ``layer`` for hidden states h_l (any leading shape)."""
        return self.head(layer)(self.final_norm(hidden))

    @torch.no_grad()
    def exit_predictions(self, states: torch.Tensor) -> torch.Tensor:
        """The top-1 token [L] of every exit 1..L for one token's states s_1..s_L [L, d] (after the
        final norm).

        With ``adapter`` heads (one shared LM head) the L vocabulary products run as one: reading the
        LM head's weights dominates its cost, so L rows cost about what 3 separate rows do.
        """
        heads = [self.head(layer) for layer in range(1, self.num_layers + 1)]
        if all(isinstance(h, AdapterHead) for h in heads[:-1]):
            adapted = [h.adapter(states[i : i + 1]) for i, h in enumerate(heads[:-1])]
            return heads[-1](torch.cat([*adapted, states[-1:]])).argmax(-1)
        return torch.stack([h(states[i : i + 1])[0].argmax(-1) for i, h in enumerate(heads)])

    def propagated_kv(
        self, index: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values that layer ``index`` (0-based) computes from ``hidden`` [B, T, d]
        (:meth:`~ee_gym.generation.layers.DecoderLayers.propagated_kv`)."""
        return self.layer_adapter.propagated_kv(index, hidden, position_embeddings)

    # -- decoding ----------------------------------------------------------------------------
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[StepOutput, DecodeState]:
        """Run a (left-padded) prompt batch at full depth, filling every layer's cache.

        Returns the last position's logits (exit L) and the state that :meth:`step` continues from.
        Gradients follow the caller's mode (wrap in ``torch.no_grad()`` for inference).
        """
        hidden, cache, attention_mask, position_ids = self.layer_adapter.full_pass(input_ids, attention_mask)
        last = hidden[:, -1]
        L = self.num_layers
        out = StepOutput(
            logits=self.exit_logits(L, last),
            exit_layers=torch.full((input_ids.shape[0],), L, dtype=torch.long, device=self.device),
            hidden=last,
        )
        return out, DecodeState(cache, attention_mask, position_ids[:, -1] + 1)

    def layer_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing: s_l = final_norm(h_l) of every position and layer, [B, T, L, d].

        One full-depth pass over (left-padded) text, as :meth:`prefill` runs it; what
        :mod:`ee_gym.generation.regression` fits exit heads on. Gradients follow the caller's mode.
        """
        states: list[torch.Tensor] = []
        self.layer_adapter.full_pass(
            input_ids, attention_mask, on_layer=lambda h: states.append(self.final_norm(h))
        )
        return torch.stack(states, dim=2)

    def step(self, state: DecodeState, input_ids: torch.Tensor, exit_fn: ExitFn | None = None) -> StepOutput:
        """Feed one token per row, layer by layer, exiting where ``exit_fn`` says (None = full depth).

        Every row stays in the batch so that one cache append per layer serves all rows: a row that
        exited at layer t keeps h_t as its hidden state and still goes through the later layers, which
        writes exactly the propagated keys/values of h_t to their cache (its output is discarded).
        Once every row has exited, the remaining layers only compute those keys/values.
        ``state`` is updated in place. Gradients follow the caller's mode. An ``exit_fn`` with a
        ``prepare_step(decoder, state, input_ids)`` method has it called first (it must not change
        ``state``: :class:`~ee_gym.generation.policies.OracleExit` decodes a copy).
        """
        B = state.batch_size
        ids = input_ids.to(self.device).reshape(B, 1)
        L = self.num_layers
        prepare = getattr(exit_fn, "prepare_step", None)
        if prepare is not None:  # an exit rule that looks ahead before deciding (the oracle)
            prepare(self, state, ids)
        # The mask is built against the cache before this position is appended, as LlamaModel does.
        attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(B, 1)], dim=1)
        position_ids = state.next_positions.reshape(B, 1)
        hidden = self.backbone.embed_tokens(ids)
        masks = self.layer_adapter.masks(hidden, attention_mask, state.cache, position_ids)
        position_embeddings = self.backbone.rotary_emb(hidden, position_ids)

        exited = torch.zeros(B, dtype=torch.bool, device=self.device)
        exit_layers = torch.full((B,), L, dtype=torch.long, device=self.device)
        known: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, their exit logits) a rule computed
        # Python flags mirror `exited`: at batch 1 a layer then costs no bookkeeping op until the exit
        any_exited = all_exited = False
        for index in range(L):
            if all_exited:  # every row has left: the remaining layers only get their keys and values
                self.layer_adapter.propagate_from(index, hidden, position_embeddings, state.cache)
                break
            previous = hidden
            out = self.layer_adapter.run(
                index, hidden, masks[index], position_embeddings, position_ids, state.cache
            )
            hidden = torch.where(exited[:, None, None], hidden, out) if any_exited else out
            layer = index + 1
            if exit_fn is not None and layer < L:
                view = LayerView(self, layer, hidden[:, 0], ~exited, previous[:, 0])
                decision = exit_fn(view)
                if isinstance(decision, np.ndarray) and not decision.any():  # the usual answer, no torch op
                    continue
                decision = torch.as_tensor(decision, dtype=torch.bool, device=self.device).reshape(B)
                if not bool(decision.any()):  # the usual answer: nothing to record
                    continue
                decision &= ~exited
                exit_layers[decision] = layer
                exited |= decision
                any_exited, all_exited = True, bool(exited.all())
                # (signals run without gradients: under autograd the head runs again, differentiably)
                if view.head_logits is not None and bool(decision.any()) and not torch.is_grad_enabled():
                    rows, logits = view.head_logits
                    keep = decision[rows.to(self.device)]  # of the rows it computed, those leaving here
                    known.append((rows.to(self.device).nonzero()[:, 0][keep], logits[keep]))

        state.attention_mask = attention_mask
        state.next_positions = state.next_positions + 1
        last = hidden[:, 0]
        return StepOutput(self._row_logits(last, exit_layers, known), exit_layers, last)

    def extend(self, state: DecodeState, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed T tokens per row at full depth in one pass (``input_ids`` [B, T]), appending them to
        every layer's cache: the next-token logits of exit L after each, [B, T, V].

        A prefill that continues a cache: speculative decoding's verify pass, which reads the weights
        once for T positions where T calls of :meth:`step` would read them T times. ``state`` is
        updated in place; gradients follow the caller's mode.
        """
        B, T = input_ids.shape
        if state.batch_size != B:
            raise ValueError(f"input_ids holds {B} rows, the decode state {state.batch_size}")
        ids = input_ids.to(self.device)
        attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(B, T)], dim=1)
        position_ids = state.next_positions.reshape(B, 1) + torch.arange(T, device=self.device)
        hidden = self.backbone.embed_tokens(ids)
        masks = self.layer_adapter.masks(hidden, attention_mask, state.cache, position_ids)
        position_embeddings = self.backbone.rotary_emb(hidden, position_ids)
        for index in range(self.num_layers):
            hidden = self.layer_adapter.run(
                index, hidden, masks[index], position_embeddings, position_ids, state.cache
            )
        state.attention_mask = attention_mask
        state.next_positions = state.next_positions + T
        return self.exit_logits(self.num_layers, hidden)

    def step_with_states(
        self, state: DecodeState, input_ids: torch.Tensor
    ) -> tuple[StepOutput, torch.Tensor]:
        """:meth:`step` at full depth, also returning every layer's hidden state h_0..h_L [B, L + 1, d]
        (h_0 the token's embedding): what self-distillation, the live env and the oracle read."""
        hidden: list[torch.Tensor] = []

        def record(view: LayerView) -> torch.Tensor:  # never exits
            if not hidden:
                hidden.append(view.previous)
            hidden.append(view.hidden)
            return torch.zeros(view.batch_size, dtype=torch.bool)

        out = self.step(state, input_ids, record)
        if not hidden:  # a one-layer model asks no exit question
            raise ValueError("a decoder with one layer has no exits to record")
        hidden.append(out.hidden)
        return out, torch.stack(hidden, dim=1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        prompts: Sequence[str] | None = None,
        max_new_tokens: int = 32,
        exit_fn: ExitFn | None = None,
        stop_at_eos: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        prefilled: tuple[StepOutput, DecodeState] | None = None,
    ) -> GenerationOutput:
        """Greedy decoding with token-level exits (``exit_fn=None``: full depth).

        Give token ids (left padded, with ``attention_mask``) or raw ``prompts`` (tokenised here, left
        padded). As Hugging Face generate, a row that emits an end-of-sequence token is padded with
        ``pad_token_id`` from then on, and decoding stops once every row has ended. ``eos_token_id`` and
        ``pad_token_id`` default to the model's generation config.

        ``prefilled``: what :meth:`prefill` returned for these ``input_ids``, to decode from without
        running the prompt again (its state is consumed: pass ``state.clone()`` to decode it twice).
        """
        input_ids, attention_mask = self.encode_prompts(input_ids, attention_mask, prompts)
        eos, pad_token_id = self.stop_tokens(stop_at_eos, eos_token_id, pad_token_id)
        out, state = self.prefill(input_ids, attention_mask) if prefilled is None else prefilled
        if state.batch_size != input_ids.shape[0]:
            raise ValueError(f"prefilled holds {state.batch_size} rows, input_ids {input_ids.shape[0]}")
        B = state.batch_size
        unfinished = torch.ones(B, dtype=torch.bool, device=self.device)
        tokens, layers = [], []
        for i in range(max_new_tokens):
            if i > 0:
                out = self.step(state, tokens[-1], exit_fn)
            token = out.logits.argmax(-1)
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            layers.append(torch.where(unfinished, out.exit_layers, torch.zeros_like(out.exit_layers)))
            unfinished &= ~torch.isin(token, eos)
            if not bool(unfinished.any()):
                break
        new = torch.stack(tokens, 1) if tokens else input_ids.new_empty(B, 0)
        exit_layers = torch.stack(layers, 1) if layers else new.new_empty(B, 0)
        return GenerationOutput(
            sequences=torch.cat([input_ids.to(self.device), new], dim=1),
            tokens=new,
            exit_layers=exit_layers,
            num_layers=self.num_layers,
        )

    def encode_prompts(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        prompts: Sequence[str] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids, attention_mask) as given, or ``prompts`` tokenised and left padded."""
        if (input_ids is None) == (prompts is None):
            raise ValueError("give exactly one of input_ids and prompts")
        if prompts is None:
            return input_ids, attention_mask
        if self.tokenizer is None:
            raise ValueError("this decoder has no tokenizer: pass input_ids")
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        return batch["input_ids"], batch["attention_mask"]

    def stop_tokens(
        self, stop_at_eos: bool, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
    ) -> tuple[torch.Tensor, int]:
        """(the end-of-sequence ids on the decoder's device, the padding id) as :meth:`generate` uses
        them; both default to the model's generation config."""
        eos = self.eos_ids(eos_token_id) if stop_at_eos else torch.empty(0, dtype=torch.long)
        eos = eos.to(self.device)
        if pad_token_id is None:
            pad_token_id = self.model.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos.numel() else 0
        return eos, int(pad_token_id)

    def eos_ids(self, eos_token_id: int | Sequence[int] | None = None) -> torch.Tensor:
        """The end-of-sequence token ids [K] (``None``: the model's generation config's; may be empty)."""
        if eos_token_id is None:
            eos_token_id = self.model.generation_config.eos_token_id
        if eos_token_id is None:
            return torch.empty(0, dtype=torch.long)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        return torch.tensor(list(eos_token_id), dtype=torch.long)

    # -- internals ---------------------------------------------------------------------------
    def _row_logits(
        self,
        hidden: torch.Tensor,
        exit_layers: torch.Tensor,
        known: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> torch.Tensor:
        """Each row's logits from its own exit's head: one head call per distinct exit, on the rows
        whose logits ``known`` (row indices, their logits: what an exit rule already computed at the
        exit layer) does not hold."""
        if self.heads is None and not known:
            return self.exit_logits(self.num_layers, hidden)
        states = self.final_norm(hidden)
        logits = states.new_empty(hidden.shape[0], self.head(self.num_layers).out_features)
        missing = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        for rows, row_logits in known:
            logits[rows] = row_logits.to(logits.dtype)
            missing[rows] = False
        for layer in exit_layers[missing].unique().tolist():
            rows = missing & (exit_layers == layer)
            logits[rows] = self.head(layer)(states[rows])
        return logits
