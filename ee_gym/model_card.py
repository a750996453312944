"""Model cards: every saved multi-exit model and policy folder says what it is.

A folder handed to a colleague (or pushed to a hub) carries a ``README.md`` in the Hugging Face
model-card style: YAML front matter (``library_name``, ``tags``, ``base_model``, ``datasets``,
``metrics`` and an ``ee_gym`` block with the task, stage, protocol, fingerprint and the per-layer dev
metric) that ``huggingface_hub.ModelCard.load(folder / "README.md")`` reads back, then a short
text: what the folder holds, the per-layer dev table, how to load it, the command that made it and
the library versions.

What the weights alone cannot tell (the stage, the split, the dev metrics) comes from the trainer
that saves the folder, as :class:`CardFacts`; a folder saved without facts still gets a card with
what its config knows.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ee_gym.config import RESUMABLE_CHANGES
from ee_gym.tasks import UnknownTaskError, get_task

CARD_NAME = "README.md"
LIBRARY = "ee-gym"


@dataclass
class CardFacts:
    """What the trainer saving a folder knows beyond its weights and config."""

    stage: str | None = None  # "stage 1", "stage 3", "stage 2 policy", ...
    protocol: str | None = None  # ee_gym.protocols name of the policy's data, where there is one
    train_split: str | None = None  # what the weights learned from, e.g. "train[:90%]"
    dev_metrics: list[dict[str, float]] | None = None  # per exit layer, compute_metrics records
    settings: dict[str, Any] = field(default_factory=dict)  # the run's settings, shown as a list


def card_settings(config: Any) -> dict[str, Any]:
    """A run config's settings for a card: its dataclass fields, less paths and reporting."""
    if not is_dataclass(config):
        return {}
    found = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in RESUMABLE_CHANGES}
    return {k: v for k, v in found.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))}


def command_line() -> str:
    """The command of this process, as typed (``python -m benchmarks.compare --task rte ...``)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))


def versions() -> dict[str, str]:
    """The versions that matter to reload and reproduce a folder."""
    found = {"python": platform.python_version()}
    for package in ("ee-gym", "torch", "transformers", "gymnasium", "stable-baselines3"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _metric_table(dev_metrics: list[dict[str, float]]) -> list[str]:
    names = list(dev_metrics[0])
    lines = ["| exit layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for layer, record in enumerate(dev_metrics, start=1):
        lines.append(f"| {layer} | " + " | ".join(f"{100 * record[n]:.1f}" for n in names) + " |")
    return lines


def _card(data: dict[str, Any], title: str, summary: str, sections: list[tuple[str, list[str]]]) -> ModelCard:
    body = [f"# {title}", "", summary, ""]
    for heading, lines in sections:
        body += [f"## {heading}", "", *lines, ""]
    front = ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], {})}).to_yaml()
    return ModelCard(f"---\n{front}\n---\n\n" + "\n".join(body))


def _provenance(facts: CardFacts) -> list[tuple[str, list[str]]]:
    sections = []
    if facts.settings:
        sections.append(("Settings", [f"- `{k}`: {v!r}" for k, v in facts.settings.items()]))
    sections.append(("Made by", ["```bash", command_line(), "```", "",
                                 ", ".join(f"{k} {v}" for k, v in versions().items())]))  # fmt: skip
    return sections


def multiexit_card(
    config: Any, num_layers: int, fingerprint: str, facts: CardFacts | None = None
) -> ModelCard:
    """The card of a multi-exit model folder (``config`` its :class:`~ee_gym.multiexit.MultiExitConfig`)."""
    facts = facts or CardFacts()
    task = config.task
    try:  # the registered task says its hub dataset and env name (None: a task of another process)
        spec = get_task(task) if task else None
    except UnknownTaskError:
        spec = None
    metric = next(iter(facts.dev_metrics[0])) if facts.dev_metrics else None
    block = {
        "kind": "multi-exit model",
        "task": task,
        "backbone": config.backbone,
        "num_layers": num_layers,
        "num_labels": config.num_labels,
        "labels": config.labels,
        "pooling": config.pooling,
        "stage": facts.stage,
        "protocol": facts.protocol,
        "train_split": facts.train_split,
        "fingerprint": fingerprint,
    }
    if facts.dev_metrics:
        block[f"dev_{metric}_by_layer"] = [round(float(m[metric]), 4) for m in facts.dev_metrics]
    data = {
        "library_name": LIBRARY,
        "tags": ["early-exit", LIBRARY, *([task] if task else [])],
        "base_model": config.backbone if not os.path.isabs(str(config.backbone)) else None,
        "datasets": [spec.hub[0]] if spec is not None and spec.hub else None,
        "metrics": [metric] if metric else None,
        "ee_gym": {k: v for k, v in block.items() if v is not None},
    }
    what = f"{facts.stage} of " if facts.stage else ""
    summary = (
        f"A multi-exit model ({what}ee-gym): `{config.backbone}` with an exit head after each of its "
        f"{num_layers} layers, for {f'the `{task}` task' if task else 'a classification task'} "
        f"({config.num_labels} labels{': ' + ', '.join(map(str, config.labels)) if config.labels else ''})."
    )
    sections = []
    if facts.dev_metrics:
        sections.append(("Dev metric of each exit", _metric_table(facts.dev_metrics)))
    load = ["```python", "from ee_gym.multiexit import MultiExitModel", "",
            'model = MultiExitModel.from_pretrained("<this folder>")', "```"]  # fmt: skip
    if task:
        env_name = spec.env_name if spec is not None else task  # ConsistentEE-<env name>-v0
        load += [
            "",
            f'or as an environment: `gym.make("ConsistentEE-{env_name}-v0", model="<this folder>")`.',
        ]
    sections.append(("Use", load))
    return _card(data, f"{config.backbone} multi-exit ({task or 'custom task'})", summary,
                 sections + _provenance(facts))  # fmt: skip


def policy_card(record: dict[str, Any], facts: CardFacts | None = None) -> ModelCard:
    """The card of an exit-policy folder (``record``: its ``policy.json`` content)."""
    facts = facts or CardFacts()
    shapes = record.get("shapes") or {}
    block = {
        "kind": "exit policy",
        "policy": record["name"],
        "params": record.get("params") or None,
        "shapes": shapes or None,
        "exit_threshold": record.get("exit_threshold"),
        "stage": facts.stage,
        "protocol": facts.protocol,
        "train_split": facts.train_split,
    }
    data = {
        "library_name": LIBRARY,
        "tags": ["early-exit", LIBRARY, "exit-policy", record["name"]],
        "ee_gym": {k: v for k, v in block.items() if v is not None},
    }
    layers = f" over {shapes['num_layers']} exits" if "num_layers" in shapes else ""
    summary = (
        f"An ee-gym exit policy, `{record['name']}`{layers}: after each layer it reads that layer's "
        "observation and decides EXIT or CONTINUE."
    )
    params = [f"- `{k}`: {v!r}" for k, v in (record.get("params") or {}).items()] or ["(class defaults)"]
    load = ["```python", "from ee_gym.policy import load_policy", "",
            'policy = load_policy("<this folder>")', "```"]  # fmt: skip
    return _card(data, f"exit policy: {record['name']}", summary,
                 [("Parameters", params), ("Use", load), *_provenance(facts)])  # fmt: skip


def write_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    """Write ``card`` as the folder's ``README.md``."""
    path = Path(folder) / CARD_NAME
    path.write_text(str(card), encoding="utf-8")
    return path
