"""Wall-clock decoding speed of exit policies, timed so that a noisy machine cannot fake a speed-up.

For each thread count and batch size, every policy (full depth included) decodes the same articles in
``rounds`` rounds; within a round each batch's prompt runs once (timed apart: it is the same
full-depth pass for every policy) and every policy then decodes from a copy of its state, the order of
the policies rotating from round to round so that none is always first or last. A policy's tokens per
second is the median over rounds; its wall-clock speed-up is the median over rounds of its tokens per
second over full depth's in the same round. At batch 1 every rule is wrapped in a
:class:`~ee_gym.generation.costs.DecisionTimer`, so its decision cost is measured in the same run as the
layers it is compared with.

At batch size > 1 a row that exited still rides along through the later layers (one cache write
serves the batch), so only steps where every row exited save time: that column shows what batching
leaves of a speed-up.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ee_gym.generation.costs import DecisionTimer, reads_of
from ee_gym.generation.decoder import MultiExitDecoder
from ee_gym.generation.view import ExitFn

FULL_DEPTH = "full depth"


@dataclass
class TimingSettings:
    """What is timed: the first ``articles`` scored articles, ``rounds`` rounds per cell."""

    articles: int = 20
    rounds: int = 3
    threads: tuple[int, ...] = (1, 2)
    batch_sizes: tuple[int, ...] = (1, 8)
    #: name prefixes of the policies timed (empty: every one); full depth, the reference, always is
    policies: tuple[str, ...] = ()

    def times(self, name: str) -> bool:
        """Whether the policy called ``name`` is timed."""
        return name == FULL_DEPTH or not self.policies or name.startswith(tuple(self.policies))

    def __post_init__(self) -> None:
        if self.articles < 1 or self.rounds < 1:
            raise ValueError(
                f"timing needs at least 1 article and 1 round, got {self.articles}, {self.rounds}"
            )
        if not self.threads or min(self.threads) < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"threads and batch sizes must be >= 1, got {self.threads}, {self.batch_sizes}")


@dataclass
class TimingCell:
    """One policy at one thread count and batch size."""

    policy: str
    threads: int
    batch_size: int
    tokens: int  # decided tokens per round (generated tokens but each row's first)
    tokens_per_second: float  # median over rounds
    wall_speedup: float  # median over rounds of tokens/s over full depth's in the same round
    round_tokens_per_second: list[float]
    decision_us: float | None = None  # batch 1: per decision, at the rule's layers
    layer_us: float | None = None  # batch 1: per decoder layer, in the same run
    decision_fraction: float | None = None  # decision_us / layer_us
    probe_us: float | None = None  # batch 1: per decision that read a signal (rules probing every k-th layer)
    reads: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(decoder: MultiExitDecoder, prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    lengths = [len(decoder.tokenizer(p)["input_ids"]) for p in prompts]
    order = np.argsort(lengths, kind="stable").tolist()  # little padding in a batch
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def time_policies(
    decoder: MultiExitDecoder,
    prompts: Sequence[str],
    exit_fns: Mapping[str, ExitFn | None],
    settings: TimingSettings | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> dict:
    """Time every policy of ``exit_fns`` (``None`` = full depth; one must be named ``full depth``) on
    the first ``settings.articles`` prompts. Returns ``{"cells": [TimingCell.to_dict(), ...],
    "prompt_seconds": {"<threads>x<batch>": median seconds of all prompt passes of a round},
    "settings": ...}``; torch's thread count is restored afterwards."""
    settings = settings or TimingSettings()
    if FULL_DEPTH not in exit_fns:
        raise ValueError(f"timing compares against full depth: name it {FULL_DEPTH!r} among the policies")
    prompts = list(prompts)[: settings.articles]
    names = list(exit_fns)
    before = torch.get_num_threads()
    cells, prompt_seconds = [], {}
    total = len(settings.threads) * len(settings.batch_sizes) * settings.rounds * len(names)
    bar = tqdm(total=total, desc="timing", unit="run", disable=not progress)
    try:
        for threads in settings.threads:
            torch.set_num_threads(threads)
            for batch_size in settings.batch_sizes:
                batches = _batches(decoder, prompts, batch_size)
                seconds = np.zeros((settings.rounds, len(names)))
                tokens = np.zeros((settings.rounds, len(names)))
                prompt = np.zeros(settings.rounds)
                timers = {
                    n: DecisionTimer(f) for n, f in exit_fns.items() if f is not None and batch_size == 1
                }
                for r in range(settings.rounds):
                    order = names[r % len(names) :] + names[: r % len(names)]  # rotate each round
                    for rows in batches:
                        batch = decoder.tokenizer([prompts[i] for i in rows], return_tensors="pt",
                                                  padding=True, padding_side="left")  # fmt: skip
                        ids, mask = batch["input_ids"], batch["attention_mask"]
                        started = time.perf_counter()
                        first, state = decoder.prefill(ids, mask)
                        prompt[r] += time.perf_counter() - started
                        for name in order:
                            copy = state.clone()
                            exit_fn = timers.get(name, exit_fns[name])
                            started = time.perf_counter()
                            out = decoder.generate(ids, mask, max_new_tokens=max_new_tokens, exit_fn=exit_fn,
                                                   prefilled=(first, copy))  # fmt: skip
                            j = names.index(name)
                            seconds[r, j] += time.perf_counter() - started
                            tokens[r, j] += max(int((out.exit_layers > 0).sum()) - len(rows), 0)
                    bar.update(len(names))
                speed = tokens / np.maximum(seconds, 1e-12)  # [rounds, policies]
                base = speed[:, names.index(FULL_DEPTH)]
                prompt_seconds[f"{threads}x{batch_size}"] = float(np.median(prompt))
                for j, name in enumerate(names):
                    cell = TimingCell(
                        policy=name, threads=threads, batch_size=batch_size, tokens=int(tokens[0, j]),
                        tokens_per_second=float(np.median(speed[:, j])),
                        wall_speedup=float(np.median(speed[:, j] / base)),
                        round_tokens_per_second=speed[:, j].round(3).tolist(), reads=reads_of(exit_fns[name]),
                    )  # fmt: skip
                    if name in timers:
                        cost = timers[name].cost
                        cell.decision_us, cell.layer_us = cost.decision_us, cost.layer_us
                        cell.decision_fraction, cell.probe_us = cost.fraction_of_layer, cost.probe_us
                    cells.append(cell.to_dict())
    finally:
        torch.set_num_threads(before)
        bar.close()
    return {"cells": cells, "prompt_seconds": prompt_seconds, "settings": asdict(settings),
            "articles": len(prompts)}  # fmt: skip


@torch.no_grad()
def time_speculative(
    decoder: MultiExitDecoder,
    prompts: Sequence[str],
    drafters: Mapping[str, ExitFn],
    draft_tokens: Sequence[int] = (4,),
    settings: TimingSettings | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[dict]:
    """The lossless mode (:func:`~ee_gym.generation.speculative.speculative_generate`) at batch 1 on
    the first ``settings.articles`` prompts, with each drafter and each ``k`` of ``draft_tokens``,
    against plain full-depth decoding in the same rounds (at the first of ``settings.threads``):
    per (drafter, k), the acceptance (kept drafts / drafted), tokens per verify pass, tokens per
    second and wall-clock speed-up (medians over rounds; the prompt pass included on both sides, as
    the mode runs its own), and whether every token equalled full depth's (checked in the first
    round)."""
    from ee_gym.generation.speculative import speculative_generate

    settings = settings or TimingSettings()
    prompts = list(prompts)[: settings.articles]
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads[0])
    jobs = [(None, 0)] + [(name, k) for name in drafters for k in draft_tokens]  # (None, 0): full depth
    seconds = np.zeros((settings.rounds, len(jobs)))
    tokens = np.zeros((settings.rounds, len(jobs)))
    drafted, accepted, rounds_ = np.zeros(len(jobs)), np.zeros(len(jobs)), np.zeros(len(jobs))
    same = np.ones(len(jobs), dtype=bool)
    bar = tqdm(
        total=settings.rounds * len(jobs), desc="timing (verify mode)", unit="run", disable=not progress
    )
    try:
        for r in range(settings.rounds):
            order = list(range(len(jobs)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for prompt in prompts:
                ids = decoder.tokenizer(prompt, return_tensors="pt")["input_ids"]
                reference = None  # round 0 starts with full depth (j = 0): the identity check's reference
                for j in order:
                    name, k = jobs[j]
                    started = time.perf_counter()
                    if name is None:
                        out = decoder.generate(ids, max_new_tokens=max_new_tokens)
                    else:
                        out = speculative_generate(decoder, drafters[name], ids, draft_tokens=k,
                                                   max_new_tokens=max_new_tokens)  # fmt: skip
                    seconds[r, j] += time.perf_counter() - started
                    tokens[r, j] += int((out.exit_layers > 0).sum())
                    if name is None:
                        reference = out.tokens
                    else:
                        if r == 0:
                            drafted[j], accepted[j], rounds_[j] = (
                                drafted[j] + out.drafted,
                                accepted[j] + out.accepted,
                                rounds_[j] + out.rounds,
                            )
                        if reference is not None:
                            same[j] &= bool(torch.equal(out.tokens, reference))
            bar.update(len(jobs))
    finally:
        torch.set_num_threads(before)
        bar.close()
    speed = tokens / np.maximum(seconds, 1e-12)
    out_rows = []
    for j, (name, k) in enumerate(jobs):
        if name is None:
            continue
        out_rows.append({
            "drafter": name, "draft_tokens": k, "threads": settings.threads[0],
            "acceptance": float(accepted[j] / drafted[j]) if drafted[j] else float("nan"),
            "tokens_per_round": float((accepted[j] + rounds_[j]) / rounds_[j]) if rounds_[j] else float("nan"),
            "tokens_per_second": float(np.median(speed[:, j])),
            "full_depth_tokens_per_second": float(np.median(speed[:, 0])),
            "wall_speedup": float(np.median(speed[:, j] / speed[:, 0])),
            "tokens": int(tokens[0, j]), "identical_to_full_depth": bool(same[j]),
        })  # fmt: skip
    return out_rows
