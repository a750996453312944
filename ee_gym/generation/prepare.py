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

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from ee_gym import paths
from ee_gym.files import write_text_atomic
from ee_gym.generation.data import format_prompt, load_xsum
from ee_gym.generation.decoder import DEFAULT_DECODER, HEADS_CONFIG, MultiExitDecoder, resolve_decoder
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


def heads_folder(decoder: str | os.PathLike | None, heads: str | os.PathLike | None, task: str) -> Path:
    """The heads folder a named decoder is loaded with: ``heads``, else its first-use folder."""
    return Path(heads) if heads is not None else default_heads_dir(str(decoder or DEFAULT_DECODER), task)


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


def table_path(
    fingerprint: str,
    task: str,
    split: str,
    max_prompts: int | None,
    max_new_tokens: int,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where the token table of (decoder ``fingerprint``, task, split, sizes) is kept."""
    folder = Path(cache_dir) if cache_dir is not None else paths.home() / "generation" / "tables"
    return folder / f"{task}-{_slug(split)}-p{max_prompts}-t{max_new_tokens}-{fingerprint}.npz"


# -- the decoder's fingerprint, recorded with its heads ------------------------------------------
# A table is named by the fingerprint of the decoder that built it (weights and heads hashed), and
# computing it means loading the decoder (about 30 s for SmolLM2). The heads folder records it, with
# the size and modification time of every file it was computed from, so that a cached table is found
# without loading anything; any change to those files makes the record stale and it is recomputed.
FINGERPRINT_RECORD = "decoder_fingerprint.json"


def _file_stamps(files: list[Path]) -> list[list]:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _file_digests(files: list[Path]) -> list[list]:
    return [[str(f.resolve()), hashlib.sha256(f.read_bytes()).hexdigest()] for f in files]


def source_stamps(name: str | os.PathLike, heads: str | os.PathLike) -> list[list] | None:
    """Size and modification time of the decoder's local files (large, rarely rewritten) and a hash of
    the heads' files (tens of MB, rewritten by every training run); None for a decoder that is not a
    local folder (a hub name), which gets no shortcut."""
    path, gguf_file = resolve_decoder(name)
    folder, heads = Path(path), Path(heads)
    if not folder.is_dir() or not (heads / HEADS_CONFIG).is_file():
        return None
    weights = [folder / gguf_file] if gguf_file else sorted(
        f for f in folder.iterdir() if f.is_file() and f.suffix in {".safetensors", ".bin", ".json", ".gguf"}
    )  # fmt: skip
    return _file_stamps(weights) + _file_digests(
        sorted(f for f in heads.iterdir() if f.name.startswith("exit_heads"))
    )


def recorded_fingerprint(name: str | os.PathLike, heads: str | os.PathLike) -> str | None:
    """The fingerprint of decoder ``name`` with the heads of folder ``heads``, if that folder recorded
    it from the files as they are now (:func:`record_fingerprint`), else None."""
    record_file = Path(heads) / FINGERPRINT_RECORD
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
        stamps = source_stamps(name, heads)
    except (OSError, ValueError):
        return None
    return record.get("fingerprint") if stamps is not None and record.get("sources") == stamps else None


def record_fingerprint(
    decoder: str | os.PathLike | None, heads: str | os.PathLike | None, task: str, fingerprint: str
) -> None:
    """Write ``fingerprint`` (of the named ``decoder`` loaded with ``heads``, else its first-use heads)
    into that heads folder with the stamps of the files it hashes; skipped for a hub decoder, and for a
    folder this process cannot write (the table is then found by loading the decoder)."""
    name, folder = str(decoder or DEFAULT_DECODER), heads_folder(decoder, heads, task)
    stamps = source_stamps(name, folder)
    if stamps is not None:
        with contextlib.suppress(OSError):
            record = {"fingerprint": fingerprint, "sources": stamps}
            write_text_atomic(folder / FINGERPRINT_RECORD, json.dumps(record, indent=2))


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
    fingerprint: str | None = None,
) -> TokenTable:
    """The token table of ``split`` for ``decoder`` (its heads as they are), from its file under
    ``cache_dir`` (default ``$EE_GYM_HOME/generation/tables``), built and saved there when missing.
    ``fingerprint``: ``decoder.fingerprint()`` when the caller has it already."""
    task = _check_task(task)
    fingerprint = fingerprint or decoder.fingerprint()
    key = (fingerprint, task, split, max_prompts, max_new_tokens, str(cache_dir))
    if key not in _TABLES:
        path = table_path(fingerprint, task, split, max_prompts, max_new_tokens, cache_dir)
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


def cached_token_table(
    decoder: str | os.PathLike | None,
    heads: str | os.PathLike | None,
    task: str,
    split: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_prompts: int | None = DEFAULT_TABLE_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> TokenTable | None:
    """The token table of a named decoder with ``heads`` (else its first-use heads), read from disk
    without loading the decoder when its heads folder recorded the fingerprint; None when it cannot
    be found that way (the caller loads the decoder)."""
    task = _check_task(task)
    fingerprint = recorded_fingerprint(str(decoder or DEFAULT_DECODER), heads_folder(decoder, heads, task))
    if fingerprint is None:
        return None
    key = (fingerprint, task, split, max_prompts, max_new_tokens, str(cache_dir))
    if key not in _TABLES:
        path = table_path(fingerprint, task, split, max_prompts, max_new_tokens, cache_dir)
        if not path.is_file():
            return None
        _TABLES[key] = TokenTable.load(path)
    return _TABLES[key]
