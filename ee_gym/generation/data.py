"""XSum prompts for generation: which articles each split holds, and how a prompt reaches the model.

The data is the offline copy ``$EE_GYM_DATA/xsum/xsum_0shot.jsonl`` (1,000 BBC articles, JSON lines
with ``article``, the prompt text starting ``###\\nArticle:`` and ending with an instruction to
summarise in one sentence, and ``summary_gt``, the reference summary). There is no hub fallback.

Splits are ranges of rows, so that what the heads and the exit policy learn from never overlaps what
is scored (the first 100 articles, as the ConsistentEE paper scores XSum)::

    eval    rows   0-99    scored by the benchmark
    heads   rows 100-199   exit-head training (self-distillation)
    train   rows 200-999   the exit policy's episodes (the env's default split)

A split may also be written ``start:stop`` (rows ``start`` to ``stop - 1``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ee_gym import paths

XSUM_FILE = Path("xsum") / "xsum_0shot.jsonl"
#: split name -> (first row, one past the last row)
XSUM_SPLITS: dict[str, tuple[int, int]] = {"eval": (0, 100), "heads": (100, 200), "train": (200, 1000)}
#: the text after which nothing of a generation counts (the data's own ``stop`` marker)
STOP_TEXT = "###"


@dataclass(frozen=True)
class Article:
    """One XSum row: its row number, the prompt text as the data gives it, and the reference."""

    index: int
    article: str
    reference: str


def xsum_path(data_dir: str | os.PathLike | None = None) -> Path:
    """The XSum file under ``data_dir`` (or ``$EE_GYM_DATA``), or a clear error."""
    folder = paths.data_dir(data_dir)
    if folder is None:
        raise FileNotFoundError(
            f"XSum is read from a local copy only: set {paths.DATA_ENV} (or pass data_dir=) to a folder "
            f"holding {XSUM_FILE}"
        )
    path = folder / XSUM_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {XSUM_FILE} under {folder}: point {paths.DATA_ENV} at the shared data folder"
        )
    return path


def split_rows(split: str) -> tuple[int, int]:
    """(start, stop) rows of a split name or a ``start:stop`` range."""
    if split in XSUM_SPLITS:
        return XSUM_SPLITS[split]
    try:
        start, stop = (int(part) for part in split.split(":"))
    except ValueError:
        raise ValueError(
            f"unknown XSum split {split!r}; choose one of {', '.join(XSUM_SPLITS)} or a row range 'start:stop'"
        ) from None
    if not 0 <= start < stop:
        raise ValueError(f"empty or negative row range {split!r}")
    return start, stop


def load_xsum(
    split: str = "eval", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[Article]:
    """The articles of ``split`` (only the first ``limit`` of them when given)."""
    start, stop = split_rows(split)
    if limit is not None:
        stop = min(stop, start + int(limit))
    articles = []
    with open(xsum_path(data_dir), encoding="utf-8") as file:
        for row, line in enumerate(file):
            if row >= stop:
                break
            if row >= start and line.strip():
                record = json.loads(line)
                articles.append(Article(row, record["article"], record["summary_gt"]))
    if not articles:
        raise ValueError(
            f"XSum split {split!r} (rows {start}-{stop - 1}) holds no rows in {xsum_path(data_dir)}"
        )
    return articles


def format_prompt(tokenizer, article: str) -> str:
    """What the model reads: the article as a user turn of the tokenizer's chat template when it has
    one (SmolLM2-Instruct does: without it, the 135M model mostly continues the article), else the
    raw text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": article}], tokenize=False, add_generation_prompt=True
        )
    return article


def clean_summary(text: str) -> str:
    """A generation as scored: cut at the data's stop marker, surrounding whitespace removed."""
    return text.split(STOP_TEXT, 1)[0].strip()
