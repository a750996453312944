"""Token-level early exit for decoder language models (docs/method.md, "Generation").

:class:`MultiExitDecoder` runs a Hugging Face causal LM one layer at a time with a KV cache, asks an
exit callback after every layer whether the current token may leave, and fills the skipped layers'
cache from the exit layer's hidden state (state propagation) so that later tokens attend at every
layer. The decoder is split as the encoder side is:

    layers.py      the layer adapter (the decoder's backbones.py): loading, layer calls, masks, KV propagation
    heads.py       exit heads: kinds (copy, shared, adapter), how they are built, their folder on disk
    view.py        LayerView, what an exit rule reads after each layer, and the ExitFn signature
    decoder.py     MultiExitDecoder: prefill, step, generate (re-exports the names above)

Around it, one module per step of the pipeline:

    data.py        XSum prompts and splits ($EE_GYM_DATA/xsum/xsum_0shot.jsonl)
    distill.py     self-distillation: every layer's state of each token the full model generates
    regression.py  stage 1 for decoders, closed form: exit adapters fitted by least squares (default)
    training.py    stage 1 for decoders by gradient: the depth-weighted cross-entropy
    table.py       the per-token table the token env (ConsistentEE-XSum-v0) replays
    prepare.py     first-use heads and cached tables for the env
    confidence.py  a learned confidence probe on the state (CALM's cheap measure), for a rule and an obs mode
    costs.py       what each exit decision reads, and its time against a layer's, measured
    policies.py    exit rules for generate(exit_fn=...): static, CALM confidence / similarity / probe, learned
    speculative.py the lossless mode: exits draft k tokens, one full-depth pass verifies them
    evaluate.py    ROUGE, exit layers and decoding speed of any set of exit policies
    method.py      the method as entry points: heads, CALM thresholds, a trained policy, their
                   evaluation, and the whole comparison (python -m benchmarks.generation is its CLI)
"""

from ee_gym.generation.confidence import ConfidenceProbe, ProbeTraining, fit_probe, with_probe
from ee_gym.generation.decoder import (
    EMBEDDED_DECODERS,
    HEAD_KINDS,
    SUPPORTED_DECODER_TYPES,
    AdapterHead,
    DecodeState,
    ExitAdapter,
    ExitFn,
    GenerationOutput,
    LayerView,
    MultiExitDecoder,
    StepOutput,
    exit_at_layer,
    resolve_decoder,
)
from ee_gym.generation.distill import TokenStates, collect_token_states
from ee_gym.generation.evaluate import GenerationRun, evaluate_generation, rouge_per_article, rouge_scores
from ee_gym.generation.method import (
    ComparisonConfig,
    HeadSetup,
    PolicySetup,
    calm_rules,
    compare_exit_policies,
    evaluate_policies,
    train_heads_for,
    train_token_policy,
)
from ee_gym.generation.policies import (
    ConfidenceExit,
    GenerationExit,
    OracleExit,
    PolicyExit,
    ProbeExit,
    StateSimilarityExit,
    StaticExit,
    set_exit_prior,
    threshold_for_speedup,
)
from ee_gym.generation.regression import NormalEquations, fit_exit_heads, xsum_texts
from ee_gym.generation.speculative import SpeculativeOutput, speculative_generate
from ee_gym.generation.table import GENERATION_OBS_MODES, TokenTable, observation_scale
from ee_gym.generation.training import HeadTrainingConfig, train_exit_heads, weighted_exit_loss

__all__ = [
    "train_token_policy",
    "train_heads_for",
    "evaluate_policies",
    "compare_exit_policies",
    "calm_rules",
    "PolicySetup",
    "HeadSetup",
    "ComparisonConfig",
    "EMBEDDED_DECODERS",
    "GENERATION_OBS_MODES",
    "HEAD_KINDS",
    "SUPPORTED_DECODER_TYPES",
    "AdapterHead",
    "ConfidenceExit",
    "ConfidenceProbe",
    "DecodeState",
    "ExitAdapter",
    "ExitFn",
    "GenerationExit",
    "GenerationOutput",
    "GenerationRun",
    "HeadTrainingConfig",
    "LayerView",
    "MultiExitDecoder",
    "OracleExit",
    "NormalEquations",
    "PolicyExit",
    "ProbeExit",
    "ProbeTraining",
    "StateSimilarityExit",
    "StaticExit",
    "SpeculativeOutput",
    "StepOutput",
    "TokenStates",
    "TokenTable",
    "collect_token_states",
    "evaluate_generation",
    "exit_at_layer",
    "fit_exit_heads",
    "fit_probe",
    "observation_scale",
    "resolve_decoder",
    "rouge_per_article",
    "rouge_scores",
    "set_exit_prior",
    "speculative_generate",
    "threshold_for_speedup",
    "train_exit_heads",
    "weighted_exit_loss",
    "with_probe",
    "xsum_texts",
]
