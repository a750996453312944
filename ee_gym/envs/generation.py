"""ConsistentEE-XSum-v0: token-level early exit, one generated token per episode, one layer per step.

reset() shows layer 1 of a token the decoder generated from an XSum prompt; each step takes 0
(CONTINUE) or 1 (EXIT). The episode ends at the first EXIT or at layer L, whatever the action there,
and pays its one reward then:

    plain (the default here, docs/method.md, "Generation")   R = -CE(next token under exit t) - alpha * t

with the next token the full model's own greedy choice; every reward of :mod:`ee_gym.rewards` is
accepted (``hardness`` reads the token's memorized layer: the first layer from which every exit agrees
with the full model). The observation is the exit's state, squashed into [-1, 1] as
:mod:`ee_gym.generation.table` explains (``state``), followed by the one-hot of the layer
(``state+layer``, the default), with exit l's top-2 probability gap between them in
``state+confidence``.

Two sources for the tokens, with the same episodes, observations and rewards (a policy trained on one
acts in the other):

* ``mode="cached"`` (the default) replays a :class:`~ee_gym.generation.table.TokenTable`: the tokens of
  the full model's own greedy continuations (:mod:`ee_gym.generation.distill`), so an exit changes no
  later token. Tokens are drawn with the env's seeded generator on ``train`` splits, walked in order on
  the others, or chosen with ``reset(options={"index": i})``. The table has the attributes of a
  classification ``ExitTable`` that the vector env and the agents read, so
  ``gym.make_vec("ConsistentEE-XSum-v0", num_envs=...)`` returns the same
  :class:`~ee_gym.envs.ConsistentEEVectorEnv` as the classification ids, and ``agents.make("reinforce")``
  or ``agents.make("ppo")`` train on it unchanged.
* ``mode="live"`` decodes the split's prompts with the agent's own exits, as at deployment: the token an
  episode emits is exit t's argmax, it is what the next episode feeds, and the layers it skipped hold
  the propagated keys and values of h_t (state propagation) that later tokens attend to. Consecutive
  episodes are consecutive tokens of one prompt; once it ends (end-of-sequence or ``max_new_tokens``),
  the next reset starts another prompt, drawn as the cached mode draws tokens (``index`` then names a
  prompt of the split, ``position`` its token); ``reset(seed=...)`` and
  ``reset(options={"index": i})`` start a prompt afresh. The target is the full model's greedy next
  token given the text so far. Cost: two decoder passes per token, one at full depth on a copy of the
  decode state (every layer's state for the observations, and the target) and one for real with the
  agent's exit (saved when the agent runs to layer L, where the full pass is the real one), plus exit
  t's head for the reward and, for the info's memorized layer, every exit's top-1 in one batched
  LM-head product. Single env only: the vector env replays tables.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ee_gym.envs.base import (
    LayerEpisodeEnv,
    LayerSource,
    TokenTableSource,
    check_mode,
    check_render_mode,
    exit_record,
)
from ee_gym.envs.vector import ConsistentEEVectorEnv
from ee_gym.generation.confidence import ConfidenceProbe, reads_probe, with_probe
from ee_gym.generation.data import format_prompt, load_xsum
from ee_gym.generation.decoder import DecodeState, MultiExitDecoder, exit_at_layer, probability_gap
from ee_gym.generation.prepare import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TABLE_PROMPTS,
    cached_token_table,
    load_decoder,
    load_token_table,
    record_fingerprint,
)
from ee_gym.generation.table import TokenTable, observation_scale, squash
from ee_gym.hardness import memorized_layer
from ee_gym.observations import STATE_OBS_MODES, get_obs_mode
from ee_gym.rewards import check_alpha, default_alpha, get_reward
from ee_gym.validation import ConfigError, check_int, check_optional_int

DEFAULT_REWARD = "plain"


def check_obs_mode(obs_mode: str) -> str:
    """``obs_mode`` if the token env serves it (a mode that reads no logits history), else a clear error."""
    try:
        served = not get_obs_mode(obs_mode).uses_stats
    except ConfigError:
        served = False
    if not served:
        raise ConfigError(
            f"observation mode {obs_mode!r} is not available for generation (the token table holds no "
            f"logits); choose one of {', '.join(STATE_OBS_MODES)}"
        )
    return obs_mode


def resolve_table(
    task: str = "xsum",
    split: str = "train",
    *,
    table: TokenTable | None = None,
    decoder: MultiExitDecoder | str | os.PathLike | None = None,
    heads: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_prompts: int | None = DEFAULT_TABLE_PROMPTS,
    max_new_tokens: int | None = None,
    obs_mode: str = "state+layer",
    mode: str = "cached",
    progress: bool = True,
) -> TokenTable:
    """The table a cached env replays: ``table`` as given, else built (or loaded) from the decoder."""
    if check_mode(mode) != "cached":
        raise ValueError("a token table is what cached mode replays; live mode decodes (single env only)")
    check_obs_mode(obs_mode)
    if table is not None:
        return table
    sizes = dict(
        cache_dir=cache_dir, max_prompts=max_prompts, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    )
    named = not isinstance(decoder, MultiExitDecoder)
    if named:  # a table already built: read it without loading the decoder
        found = cached_token_table(decoder, heads, task, split, **sizes)
        if found is not None:
            return found
    loaded = load_decoder(decoder, heads, task, data_dir=data_dir, progress=progress)
    fingerprint = loaded.fingerprint()
    if named:  # so that the next call finds the table without it
        record_fingerprint(decoder, heads, task, fingerprint)
    return load_token_table(
        loaded, task, split, data_dir=data_dir, progress=progress, fingerprint=fingerprint, **sizes
    )


class ConsistentEETokenEnv(LayerEpisodeEnv):
    """Token-level early exit as a Gymnasium env (see the module docstring).

    In live mode (``mode="live"``) the env decodes the prompts itself, with the agent's exits: two
    decoder passes per token (a full-depth one on a copy of the state for the observations and the
    target, the real one with the exit), against a table read per token in cached mode.

    Args:
        task: ``xsum``.
        split: which prompts episodes draw from (``train``, ``eval``, ``heads`` or a row range
            ``start:stop``, see :mod:`ee_gym.generation.data`).
        decoder: a :class:`MultiExitDecoder` (its heads as they are) or a name (default ``smollm2``,
            with first-use heads, see :mod:`ee_gym.generation.prepare`).
        heads: a folder of exit heads (``MultiExitDecoder.save_heads``) to load into the decoder.
        reward: ``plain`` (default), ``hardness``, ``ce`` or ``accuracy``.
        alpha: price of one layer; default ``ee_gym.rewards.default_alpha(task, L)``.
        obs_mode: ``state+layer`` (default), ``state`` or ``state+confidence``.
        data_dir, cache_dir: the data folder (default ``$EE_GYM_DATA``) and where tables are kept.
        max_prompts: the first N prompts of the split (default 40).
        max_new_tokens: tokens generated per prompt (default 32), the first included.
        mode: ``cached`` (replay a token table) or ``live`` (decode with the agent's exits).
        render_mode: ``ansi`` for a text line per step.
        table: a :class:`TokenTable` to replay as is (cached mode).
    """

    item_name = "tokens"

    def __init__(
        self,
        task: str = "xsum",
        split: str = "train",
        *,
        decoder: MultiExitDecoder | str | os.PathLike | None = None,
        heads: str | os.PathLike | None = None,
        reward: str = DEFAULT_REWARD,
        alpha: float | None = None,
        obs_mode: str = "state+layer",
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_prompts: int | None = DEFAULT_TABLE_PROMPTS,
        max_new_tokens: int | None = None,
        mode: str = "cached",
        render_mode: str | None = None,
        progress: bool = True,
        table: TokenTable | None = None,
        probe: ConfidenceProbe | str | os.PathLike | None = None,
    ):
        # Every keyword first: nothing below (the decoder, its heads, the table) starts for a bad one.
        check_mode(mode)
        check_obs_mode(obs_mode)
        check_render_mode(render_mode)
        self.reward_fn, self.reward_name = get_reward(reward), reward
        alpha = check_alpha(alpha)
        max_prompts = check_optional_int("max_prompts", max_prompts, minimum=1)
        max_new_tokens = check_optional_int("max_new_tokens", max_new_tokens, minimum=1)
        self.split, self.mode, self.render_mode = split, mode, render_mode
        self.table: TokenTable | None = None
        self.probe: ConfidenceProbe | None = None  # the state+probe mode's (module docstring)
        uses_probe = reads_probe(obs_mode, probe)
        self._live: LiveDecoderSource | None = None
        source: LayerSource
        if mode == "live":
            if table is not None:
                raise ValueError("live mode runs a decoder: pass decoder=..., not table=...")
            if uses_probe and probe is None:
                raise ConfigError("live mode with obs_mode 'state+probe' needs probe=... (a ConfidenceProbe "
                                  "or its folder: fit one on a token table with fit_probe)")  # fmt: skip
            loaded = load_decoder(decoder, heads, task, data_dir=data_dir, progress=progress)
            new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
            if uses_probe:
                self.probe = probe if isinstance(probe, ConfidenceProbe) else ConfidenceProbe.load(probe)
            source = self._live = LiveDecoderSource(
                loaded, split, data_dir, max_prompts, new_tokens, self.probe
            )
            self.task = str(task).lower()
        else:
            self.table = resolve_table(
                task,
                split,
                table=table,
                decoder=decoder,
                heads=heads,
                data_dir=data_dir,
                cache_dir=cache_dir,
                max_prompts=max_prompts,
                max_new_tokens=max_new_tokens,
                obs_mode=obs_mode,
                progress=progress,
            )
            if uses_probe:
                self.table, self.probe = with_probe(self.table, probe)
            source, self.task = TokenTableSource(self.table), self.table.task
        self.alpha = default_alpha(self.task, source.num_layers) if alpha is None else alpha
        self._init_episodes(source, obs_mode)


class LiveDecoderSource(LayerSource):
    """The prompts of a split decoded with the agent's exits, one token per episode (live mode).

    A sequence is one prompt being decoded. :meth:`start` runs the prompt at full depth, which gives
    the first generated token (no decision, as in the token table). For each later token,
    :meth:`begin` runs it at full depth on a copy of the decode state: every layer's state (layers
    1..t of that pass are exactly what the real pass computes, so the observations are exact) and the
    full model's greedy next token, the target. :meth:`exit` then runs it for real with the agent's
    exit t, on the real state: it emits exit t's argmax and writes the propagated keys and values of
    the skipped layers. The exits' logits are computed when asked for, once per token.

    Episodes: consecutive tokens of one prompt; once it ends, the next reset starts another prompt
    (:meth:`pick_index`), so ``index`` names a prompt and ``position`` (in reset's info and the exit's)
    its token.
    """

    item_name = "prompts"

    def __init__(
        self,
        decoder: MultiExitDecoder,
        split: str,
        data_dir: str | os.PathLike | None,
        max_prompts: int | None,
        max_new_tokens: int,
        probe: ConfidenceProbe | None = None,
    ):
        if decoder.tokenizer is None:
            raise ValueError("live mode tokenises the prompts: the decoder needs a tokenizer")
        if max_new_tokens < 2:
            raise ValueError("the first generated token has no decision: live mode needs max_new_tokens >= 2")
        self.decoder = decoder.eval()
        self.prompts = [
            format_prompt(decoder.tokenizer, a.article) for a in load_xsum(split, data_dir, max_prompts)
        ]
        self.max_new_tokens = max_new_tokens
        self.probe = probe  # the state+probe mode's confidence
        self.scale = observation_scale(decoder)
        self.eos = set(decoder.eos_ids().tolist())  # as generate and collect_token_states stop
        self.empty: set[int] = set()  # prompts whose first generated token ends them
        self.prompt, self.position, self.ended = -1, 0, True
        self.tokens: list[int] = []  # generated so far; the last one is fed next
        self._state: DecodeState | None = None  # the real decode state of the sequence
        self._full_state: DecodeState | None = None  # after the full-depth pass of the current token
        self.num_layers, self.hidden_size = decoder.num_layers, decoder.hidden_size
        self.num_labels, self.num_inputs = decoder.vocab_size, len(self.prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    @torch.no_grad()
    def start(self, prompt: int) -> bool:
        """Start decoding ``prompt``; whether it has a token to decide."""
        self.prompt = prompt
        if prompt in self.empty:
            self.ended = True
            return False
        ids = self.decoder.tokenizer(self.prompts[prompt], return_tensors="pt")
        out, self._state = self.decoder.prefill(ids["input_ids"], ids["attention_mask"])
        self.tokens = [int(out.logits[0].argmax())]
        self.ended = self.tokens[0] in self.eos
        if self.ended:
            self.empty.add(prompt)
        return not self.ended

    # -- the env's episodes ---------------------------------------------------------------------
    def pick_index(self, options, reseeded: bool, default) -> int:
        chosen = bool(options and "index" in options)
        if not (reseeded or chosen or self.ended):
            # The sequence goes on: its next token (or the same one again if the last episode was
            # abandoned before its exit, which is what decodes a token).
            return self.prompt
        while True:  # a new sequence, skipping prompts whose first token already ends them
            index = default()
            if self.start(index):
                return index
            if chosen:
                raise ValueError(f"prompt {index} ends at its first generated token: no token to decide")
            if len(self.empty) == len(self):
                raise ValueError("every prompt of the split ends at its first generated token")

    def reset_info(self) -> dict[str, Any]:
        return {"position": self.position}

    def end(self, layer: int) -> None:
        self.exit(layer)

    def observation(self, index: int, layer: int) -> np.ndarray:
        state = self.observations[layer - 1]
        signal = self.encoder.kind.confidence_signal
        if signal == "top2_gap":
            confidence = self.top2_gap(layer)  # an LM-head product
        elif signal == "probe":
            confidence = self.probe.score(state, layer)  # d multiply-adds (1.0 at layer L, as on the table)
        else:
            confidence = None
        return self.encoder.from_state(state, layer, confidence)

    def exit_info(self, index: int, layer: int) -> dict[str, Any]:
        """The fields of the vector env's ``final_info``, plus ``position``, the token's generated
        position."""
        emitted = self.tokens[-1]  # what the real pass emitted: exit t's argmax
        info = exit_record(index, layer, emitted, self.label, self.memorized(), self.cross_entropy(layer))
        return {**info, "position": self.position}

    def describe(self, index: int, layer: int) -> str:
        return (
            f"prompt {index:4d} token {self.position:3d} layer {layer:2d}/{self.num_layers}: predicts "
            f"{self.prediction(layer)} (gap={self.top2_gap(layer):.3f}, target {self.label})"
        )

    # -- decoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, index: int | None = None) -> None:
        """The full-depth pass of the next token (see the class docstring)."""
        decoder = self.decoder
        self._full_state = self._state.clone()
        full, hidden = decoder.step_with_states(self._full_state, torch.tensor([self.tokens[-1]]))
        # [L, d] s_1..s_L in the decoder's dtype, for the heads
        self._states = decoder.final_norm(hidden[0, 1:])
        self.observations = squash(self._states, self.scale).cpu().numpy()  # [L, d] float32
        self.label = int(full.logits[0].argmax())
        self._logits = {decoder.num_layers: full.logits[0].float()}
        self._memorized: int | None = None
        self.position = len(self.tokens)  # the generated position of the token this episode emits

    @torch.no_grad()
    def exit(self, layer: int) -> int:
        """Run the token for real with the exit at ``layer``; the emitted token (exit ``layer``'s argmax)."""
        if layer == self.decoder.num_layers:  # full depth: the full pass was the real one
            self._state, emitted = self._full_state, self.label
        else:
            out = self.decoder.step(self._state, torch.tensor([self.tokens[-1]]), exit_at_layer(layer))
            emitted = int(out.logits[0].argmax())
        self._full_state = None
        self.tokens.append(emitted)
        self.ended = emitted in self.eos or len(self.tokens) >= self.max_new_tokens
        return emitted

    # -- the exits of the current token, against the target --------------------------------------
    @torch.no_grad()
    def logits(self, layer: int) -> torch.Tensor:
        """Exit ``layer``'s next-token logits [V] in float32 (computed once per token)."""
        if layer not in self._logits:
            self._logits[layer] = self.decoder.head(layer)(self._states[layer - 1 : layer])[0].float()
        return self._logits[layer]

    def prediction(self, layer: int) -> int:
        return int(self.logits(layer).argmax())

    def cross_entropy(self, layer: int) -> float:
        """-log p_layer(target), as the token table computes it."""
        return float(-torch.log_softmax(self.logits(layer), -1)[self.label].double())

    def top2_gap(self, layer: int) -> float:
        return float(probability_gap(self.logits(layer)))

    def memorized(self) -> int:
        """The first layer from which every exit predicts the target (``ee_gym.hardness``), from every
        exit's top-1 in one batched head product (``MultiExitDecoder.exit_predictions``)."""
        if self._memorized is None:
            predictions = self.decoder.exit_predictions(self._states).cpu().numpy()
            self._memorized = int(memorized_layer(predictions[None], np.array([self.label]))[0])
        return self._memorized


def make_token_vector_env(
    num_envs: int = 1,
    task: str = "xsum",
    split: str = "train",
    *,
    reward: str = DEFAULT_REWARD,
    alpha: float | None = None,
    obs_mode: str = "state+layer",
    final_obs: bool = True,
    copy: bool = True,
    render_mode: str | None = None,
    autoreset_mode: Any = "same-step",
    **source: Any,
) -> ConsistentEEVectorEnv:
    """``gym.make_vec``'s entry point for the token env: the native vector env over the split's token
    table. ``source`` takes the single env's table arguments (``decoder``, ``heads``, ``table``,
    ``data_dir``, ``cache_dir``, ``max_prompts``, ``max_new_tokens``, ``mode``, ``progress``).
    Every keyword is checked before the table is built."""
    check_int("num_envs", num_envs, minimum=1)
    get_reward(reward)
    check_alpha(alpha)
    check_obs_mode(obs_mode)
    if render_mode is not None:
        raise ConfigError("the vector env does not render; use the single env with render_mode='ansi'")
    for name in ("max_prompts", "max_new_tokens"):
        check_optional_int(name, source.get(name), minimum=1)
    if check_mode(source.get("mode", "cached")) == "live":
        raise ValueError(
            "the vector env replays a token table: use mode='cached' (live mode is single-env: "
            "gym.make('ConsistentEE-XSum-v0', mode='live'))"
        )
    probe = source.pop("probe", None)
    uses_probe = reads_probe(obs_mode, probe)
    table = resolve_table(task, split, obs_mode=obs_mode, **source)
    if uses_probe:
        table, _ = with_probe(table, probe)
    return ConsistentEEVectorEnv(
        num_envs,
        split=split,
        table=table,
        reward=reward,
        alpha=alpha,
        obs_mode=obs_mode,
        final_obs=final_obs,
        copy=copy,
        render_mode=render_mode,
        autoreset_mode=autoreset_mode,
    )


_LiveTokens = LiveDecoderSource  # the former name
