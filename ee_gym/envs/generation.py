"""ConsistentEE-XSum-v0: token-level early exit, one generated token per episode, one layer per step.

reset() shows layer 1 of a token the decoder generated (its full-depth greedy continuation of an XSum
prompt, see :mod:`ee_gym.generation.distill`); each step takes 0 (CONTINUE) or 1 (EXIT). The episode
ends at the first EXIT or at layer L, whatever the action there, and pays its one reward then:

    plain (the default here, METHOD.md "Generation")   R = -CE(next token under exit t) - alpha * t

with the next token the full model's own greedy choice; every reward of :mod:`ee_gym.rewards` is
accepted (``hardness`` reads the token's memorized layer: the first layer from which every exit agrees
with the full model). The observation is the exit's state, squashed into [-1, 1] as
:mod:`ee_gym.generation.table` explains (``state``), followed by the one-hot of the layer
(``state+layer``, the default). Tokens are drawn with the env's seeded generator on ``train`` splits,
walked in order on the others, or chosen with ``reset(options={"index": i})``.

The env replays a :class:`~ee_gym.generation.table.TokenTable` (``mode="cached"``; no live mode yet).
The table has the attributes of a classification ``ExitTable`` that the vector env and the agents
read, so ``gym.make_vec("ConsistentEE-XSum-v0", num_envs=...)`` returns the same
:class:`~ee_gym.envs.ConsistentEEVectorEnv` as the classification ids, and ``agents.make("reinforce")``
or ``agents.make("ppo")`` train on it unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from ee_gym.envs.classification import LayerEpisodeEnv
from ee_gym.envs.observations import ObservationEncoder
from ee_gym.envs.vector import ConsistentEEVectorEnv
from ee_gym.generation.decoder import MultiExitDecoder
from ee_gym.generation.prepare import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TABLE_PROMPTS,
    load_decoder,
    load_token_table,
)
from ee_gym.generation.table import GENERATION_OBS_MODES, TokenTable
from ee_gym.rewards import default_alpha, get_reward

DEFAULT_REWARD = "plain"


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
    """The table an env replays: ``table`` as given, else built (or loaded) from the decoder."""
    if mode != "cached":
        raise ValueError("the token env replays a token table: use mode='cached' (no live mode yet)")
    if obs_mode not in GENERATION_OBS_MODES:
        raise ValueError(
            f"observation mode {obs_mode!r} is not available for generation (the token table holds no "
            f"logits); choose one of {', '.join(GENERATION_OBS_MODES)}"
        )
    if table is not None:
        return table
    loaded = load_decoder(decoder, heads, task, data_dir=data_dir, progress=progress)
    return load_token_table(
        loaded,
        task,
        split,
        data_dir=data_dir,
        cache_dir=cache_dir,
        max_prompts=max_prompts,
        max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        progress=progress,
    )


class ConsistentEETokenEnv(LayerEpisodeEnv):
    """Token-level early exit as a Gymnasium env (see the module docstring).

    Args:
        task: ``xsum``.
        split: which prompts' tokens episodes draw from (``train``, ``eval``, ``heads`` or a row
            range ``start:stop``, see :mod:`ee_gym.generation.data`).
        decoder: a :class:`MultiExitDecoder` (its heads as they are) or a name (default ``smollm2``,
            with first-use heads, see :mod:`ee_gym.generation.prepare`).
        heads: a folder of exit heads (``MultiExitDecoder.save_heads``) to load into the decoder.
        reward: ``plain`` (default), ``hardness``, ``ce`` or ``accuracy``.
        alpha: price of one layer; default ``ee_gym.rewards.default_alpha(task, L)``.
        obs_mode: ``state+layer`` (default) or ``state``.
        data_dir, cache_dir: the data folder (default ``$EE_GYM_DATA``) and where tables are kept.
        max_prompts: tokens of the first N prompts of the split (default 40).
        max_new_tokens: tokens generated per prompt (default 32).
        render_mode: ``ansi`` for a text line per step.
        table: a :class:`TokenTable` to replay as is.
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
    ):
        if render_mode not in (None, "ansi"):
            raise ValueError(f"unknown render_mode {render_mode!r}; this env offers 'ansi'")
        self.reward_fn, self.reward_name = get_reward(reward), reward
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
            mode=mode,
            progress=progress,
        )
        self.task, self.split, self.mode, self.render_mode = self.table.task, split, mode, render_mode
        self.num_layers, self.num_inputs = self.table.num_layers, self.table.num_inputs
        self.alpha = default_alpha(self.task, self.num_layers) if alpha is None else float(alpha)
        self.encoder = ObservationEncoder(
            obs_mode, self.num_layers, self.table.hidden_size, self.table.num_labels
        )
        self._init_episode_state()

    def _observation(self):
        return self.encoder.at(self.table, self._index, self._layer)

    # -- internals ---------------------------------------------------------------------------
    def _exit_info(self) -> dict[str, Any]:
        """The fields of the vector env's ``final_info``, for this token at its exit."""
        table, i, column = self.table, self._index, self._layer - 1
        return {
            "index": i,
            "exit_layer": self._layer,
            "prediction": int(table.predictions[i, column]),
            "label": int(table.labels[i]),
            "correct": bool(table.correct[i, column]),
            "memorized_layer": int(table.memorized[i]),
            "cross_entropy": float(table.cross_entropy[i, column]),
        }

    def _trace_line(self, action: int) -> str:
        table, i, column = self.table, self._index, self._layer - 1
        return (
            f"token {i:6d} layer {self._layer:2d}/{self.num_layers}: predicts {int(table.predictions[i, column])} "
            f"(gap={float(table.top2_gap[i, column]):.3f}, target {int(table.labels[i])}) -> "
            f"{self._exit_word(action)}"
        )


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
    **source: Any,
) -> ConsistentEEVectorEnv:
    """``gym.make_vec``'s entry point for the token env: the native vector env over the split's token
    table. ``source`` takes the single env's table arguments (``decoder``, ``heads``, ``table``,
    ``data_dir``, ``cache_dir``, ``max_prompts``, ``max_new_tokens``, ``mode``, ``progress``)."""
    table = resolve_table(task, split, obs_mode=obs_mode, **source)
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
    )
