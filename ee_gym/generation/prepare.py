"""Find (or make) what the token env needs: a decoder with trained exit heads, and a split's table.

``gym.make("ConsistentEE-XSum-v0")`` with nothing else said loads SmolLM2-135M-Instruct, fits its
full-rank adapter exit heads on the ``heads`` split on first use (closed-form regression on the
teacher-forced articles and reference summaries, :mod:`ee_gym.generation.regression`; a progress bar,
about 4 minutes on one CPU thread; saved under ``$EE_GYM_HOME/generation/heads/`` and reused afterwards),
then builds the token table of the split once (3 minutes; saved under
``$EE_GYM_HOME/generation/tables/``, named by the decoder's fingerprint, heads included) and loads it. Every step can be pointed elsewhere with the
env's keyword arguments: ``decoder=`` (a :class:`MultiExitDecoder` or a name), ``heads=`` (a folder
from ``save_heads``), ``table=`` (a :class:`TokenTable` to replay as is).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ee_gym import paths
from ee_gym.generation.data import format_prompt, load_xsum
from ee_gym.generation.decoder import DEFAULT_DECODER, MultiExitDecoder
from ee_gym.generation.distill import TokenStates, collect_token_states
from ee_gym.generation.regression import fit_exit_heads, xsum_texts
from ee_gym.generation.table import TokenTable
from ee_gym.generation.training import HeadTrainingConfig, train_exit_heads

GENERATION_TASKS = ("xsum",)
#: Defaults sized for a 2-core CPU (see benchmarks/generation.py for the measured costs).
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_HEAD_PROMPTS = 100  # the whole "heads" split
DEFAULT_TABLE_PROMPTS = 40  # of the env's split (the policy's episodes)
DEFAULT_ADAPTER_RANK: int | None = None  # full d x d: the closed-form fit has ~60,000 rows to fit it on
#: how heads are made: "regression" (closed form, teacher forcing), "gradient" (CE on self-distilled
#: tokens from zero adapters, ee_gym.generation.training), or "regression+gradient" (the closed form,
#: then fine-tuned by gradient on self-distilled tokens; see :func:`train_heads`)
HEAD_METHODS = ("regression", "gradient", "regression+gradient")
#: the gradient phase of "regression+gradient": a small step from the closed-form solution
FINETUNE_CONFIG = HeadTrainingConfig(epochs=4, learning_rate=1e-4)

_TABLES: dict[tuple, TokenTable] = {}  # tables already loaded in this process


def _check_task(task: str) -> str:
    task = str(task).lower()
    if task not in GENERATION_TASKS:
        raise ValueError(f"unknown generation task {task!r}; choose one of {', '.join(GENERATION_TASKS)}")
    return task


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "decoder"


def default_heads_dir(decoder_name: str, task: str = "xsum") -> Path:
    """``$EE_GYM_HOME/generation/heads/<decoder>-<task>``: where first-use heads are kept."""
    return paths.home() / "generation" / "heads" / f"{_slug(Path(decoder_name).name)}-{task}"


def collect_split(
    decoder: MultiExitDecoder,
    task: str = "xsum",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    max_prompts: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: bool = True,
) -> TokenStates:
    """Self-distilled per-layer states of the first ``max_prompts`` prompts of ``split``."""
    _check_task(task)
    articles = load_xsum(split, data_dir, max_prompts)
    prompts = [format_prompt(decoder.tokenizer, a.article) for a in articles]
    return collect_token_states(
        decoder,
        prompts,
        max_new_tokens,
        [a.index for a in articles],
        batch_size=batch_size,
        progress=progress,
    )


def train_heads(
    decoder: MultiExitDecoder,
    task: str = "xsum",
    *,
    split: str = "heads",
    method: str = "regression",
    data_dir: str | os.PathLike | None = None,
    max_prompts: int | None = DEFAULT_HEAD_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    config: HeadTrainingConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """Make ``decoder``'s exit heads on ``split`` (in place); the record of how, one dict per phase
    (the regression's, then one per gradient epoch).

    ``regression``: fit full-rank adapters in closed form on the split's articles and reference
    summaries, teacher forced. ``gradient``: self-distil the split (the model's own greedy
    continuations, ``max_new_tokens`` each) and train with the depth-weighted cross-entropy
    (``config``). ``regression+gradient``: the first, then the second from its solution (``config``
    defaults to :data:`FINETUNE_CONFIG`). The closed form fits the article positions that make up
    most of teacher-forced text; the gradient phase then fits the positions that decoding visits, on
    the greedy token that is scored. On SmolLM2 (the ``heads`` split: 60,711 teacher-forced positions,
    then 3,021 self-distilled tokens) it raised the agreement of CALM's confidence rule with the full
    model at a 1.5x layer speed-up, on the tokens of rows 200-239, from 0.72 to 0.80.
    """
    if method not in HEAD_METHODS:
        raise ValueError(f"unknown head method {method!r}; choose one of {', '.join(HEAD_METHODS)}")
    history: list[dict] = []
    metadata: dict = {}
    if method in ("regression", "regression+gradient"):
        texts = xsum_texts(decoder, split, data_dir, max_prompts)
        history.append(fit_exit_heads(decoder, texts, progress=progress))
        if method == "regression+gradient":
            metadata["regression"] = history[0]  # the gradient phase replaces the decoder's record
    if method in ("gradient", "regression+gradient"):
        tokens = collect_split(
            decoder, task, split, data_dir=data_dir, max_prompts=max_prompts,
            max_new_tokens=max_new_tokens, progress=progress,
        )  # fmt: skip
        if config is None and method == "regression+gradient":
            config = FINETUNE_CONFIG
        history += train_exit_heads(decoder, tokens, config, progress=progress)
        metadata["tokens"] = tokens.num_tokens
    metadata.update({"task": task, "split": split, "max_prompts": max_prompts, "method": method})
    decoder.heads_metadata.update(metadata)
    return history


def load_decoder(
    decoder: MultiExitDecoder | str | os.PathLike | None = None,
    heads: str | os.PathLike | None = None,
    task: str = "xsum",
    *,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> MultiExitDecoder:
    """A decoder with exit heads: the one given (with ``heads`` loaded into it when given), or the
    named one (default SmolLM2) with ``heads``, else with the first-use heads of
    :func:`default_heads_dir` (trained and saved there when missing)."""
    task = _check_task(task)
    if isinstance(decoder, MultiExitDecoder):
        return decoder.load_heads(heads).eval() if heads is not None else decoder.eval()
    name = str(decoder or DEFAULT_DECODER)
    if heads is not None:
        return MultiExitDecoder.from_pretrained(name, heads=heads)
    folder = default_heads_dir(name, task)
    if folder.is_dir():
        return MultiExitDecoder.from_pretrained(name, heads=folder)
    loaded = MultiExitDecoder.from_pretrained(name, head_kind="adapter", adapter_rank=DEFAULT_ADAPTER_RANK)
    train_heads(loaded, task, data_dir=data_dir, progress=progress)
    loaded.save_heads(folder, metadata=loaded.heads_metadata)
    return loaded.eval()


def load_token_table(
    decoder: MultiExitDecoder,
    task: str = "xsum",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_prompts: int | None = DEFAULT_TABLE_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> TokenTable:
    """The token table of ``split`` for ``decoder`` (its heads as they are), from its file under
    ``cache_dir`` (default ``$EE_GYM_HOME/generation/tables``), built and saved there when missing."""
    task = _check_task(task)
    fingerprint = decoder.fingerprint()
    key = (fingerprint, task, split, max_prompts, max_new_tokens, str(cache_dir))
    if key not in _TABLES:
        folder = Path(cache_dir) if cache_dir is not None else paths.home() / "generation" / "tables"
        path = folder / f"{task}-{_slug(split)}-p{max_prompts}-t{max_new_tokens}-{fingerprint}.npz"
        if path.is_file():
            table = TokenTable.load(path)
        else:
            tokens = collect_split(
                decoder, task, split, data_dir=data_dir, max_prompts=max_prompts, max_new_tokens=max_new_tokens,
                progress=progress,
            )  # fmt: skip
            table = TokenTable.build(decoder, tokens, split=split, task=task, progress=progress)
            table.save(path)
        _TABLES[key] = table
    return _TABLES[key]
