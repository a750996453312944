"""Token-level early exit for decoder language models (METHOD.md, "Generation").

:class:`MultiExitDecoder` runs a Hugging Face causal LM one layer at a time with a KV cache, asks an
exit callback after every layer whether the current token may leave, and fills the skipped layers'
cache from the exit layer's hidden state (state propagation) so that later tokens attend at every
layer.
"""

from ee_gym.generation.decoder import (
    EMBEDDED_DECODERS,
    SUPPORTED_DECODER_TYPES,
    DecodeState,
    ExitFn,
    GenerationOutput,
    LayerView,
    MultiExitDecoder,
    StepOutput,
    exit_at_layer,
    resolve_decoder,
)

__all__ = [
    "EMBEDDED_DECODERS",
    "SUPPORTED_DECODER_TYPES",
    "DecodeState",
    "ExitFn",
    "GenerationOutput",
    "LayerView",
    "MultiExitDecoder",
    "StepOutput",
    "exit_at_layer",
    "resolve_decoder",
]
