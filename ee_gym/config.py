"""The configuration tree: one shared setup every stage reads, and the rule that joins it to a stage.

A run (``ee-gym train``, :class:`ee_gym.pipeline.PipelineConfig`) is one :class:`RunSetup` (task,
backbone, protocol, data, max length, seed, limits) plus one section per stage: ``stage1``
(:class:`ee_gym.training.Stage1Config`), ``stage2`` (:class:`ee_gym.pipeline.PolicyTraining`) and
``stage3`` (:class:`ee_gym.joint.Stage3Config`). A stage config is a complete, standalone config
(``train_stage1(task="rte", epochs=1)`` works on its own), so it has some of the setup's fields too;
inside a run, :func:`follow_run` fills those from the run, so that no field is copied by hand and
one setting means one thing in every stage. A stage's own value wins where it was set (not left at
its default): ``stage3=Stage3Config(train_limit=200)`` trains stage 3 on fewer rows than the rest.

:func:`config_dict` is what a run folder's ``config.json`` holds (the stage sections nested) and
:func:`differing_settings` what the resume check compares (dotted names, ``stage1.epochs``).

This module imports nothing heavy (the CLI builds its options from these dataclasses).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ee_gym.protocols import DEFAULT_PROTOCOL, get_protocol
from ee_gym.scalars import check_tensorboard, tensorboard_field
from ee_gym.tasks import get_task, task_default
from ee_gym.validation import check_int, check_optional_int

DEFAULT_BACKBONE = "minilm-l6"  # ee_gym.backbones.DEFAULT_BACKBONE, without importing torch
#: settings that say where a run's files go or how it reports, not what it computes: they may change
#: between a run and its resumption, and a model card does not list them
RESUMABLE_CHANGES = frozenset(
    {"progress", "eval_batch_size", "output_dir", "data_dir", "model_dir", "policy_dir", "tensorboard"}
)


@dataclass
class RunSetup:
    """What every stage of a run reads: the task and its data, the model, the protocol, the limits."""

    task: str = "rte"
    backbone: str = DEFAULT_BACKBONE
    # which inputs the exit policy learns from (ee_gym.protocols): "held-out" or "paper"
    protocol: str = DEFAULT_PROTOCOL
    data_dir: str | None = None
    max_length: int | None = None  # None: the task's default (ee_gym.tasks.task_default)
    seed: int = 42
    train_limit: int | None = None  # first N training rows, in every stage
    dev_limit: int | None = None
    progress: bool = True
    tensorboard: str | None = tensorboard_field()

    def validate(self) -> RunSetup:
        """Refuse (ConfigError) a setup value that cannot be right (the task, the protocol, the ranges)."""
        get_task(self.task)
        get_protocol(self.protocol)
        self.max_length = check_optional_int("max_length", self.max_length, minimum=2)
        self.seed = check_int("seed", self.seed, minimum=0)
        self.train_limit = check_optional_int("train_limit", self.train_limit, minimum=1)
        self.dev_limit = check_optional_int("dev_limit", self.dev_limit, minimum=1)
        self.tensorboard = check_tensorboard("tensorboard", self.tensorboard)
        return self

    def resolved_max_length(self) -> int:
        """``max_length``, or the task's default when it is None."""
        return self.max_length or task_default(self.task, "max_length")


def run_fields(config: Any) -> list[str]:
    """The top-level (not nested) settings of a run config: what a stage may take from it."""
    return [f.name for f in dataclasses.fields(config) if not _is_section(f)]


def follow_run(config: Any, stage: Any, **derived) -> Any:
    """``stage`` (a stage config inside the run ``config``) with each field the run also has taken
    from the run, where the stage left it at its default; ``derived`` (the stage's folder and split,
    which the run decides) set as given. Returns a new, validated stage config."""
    defaults = _defaults(type(stage))
    stage_names = {f.name for f in dataclasses.fields(stage)}
    changes = {
        name: getattr(config, name)
        for name in run_fields(config)
        if name in stage_names and name not in derived and getattr(stage, name) == defaults.get(name)
    }
    return dataclasses.replace(stage, **changes, **derived)


#: Stage fields a run decides itself (each stage's split and folders): no section sets them.
RUN_DECIDES = ("train_split", "output_dir", "model_dir", "policy_dir")


def section_fields(config_cls: Any, stage_cls: Any) -> list[str]:
    """The fields of a stage section of a run config (class) that the section itself sets: neither a
    top-level setting of the run nor one the run decides (:data:`RUN_DECIDES`); the CLI's
    ``--stage1.<field>`` options."""
    top = set(run_fields(config_cls)) | set(RUN_DECIDES)
    return [f.name for f in dataclasses.fields(stage_cls) if f.name not in top]


def config_dict(config: Any) -> dict:
    """A config as its run folder's ``config.json`` holds it: the top-level settings, then one dict
    per stage section with the section's own settings (and any shared one it sets otherwise than
    its default, which then wins for that stage)."""
    top = run_fields(config)
    data = {name: getattr(config, name) for name in top}
    for f in dataclasses.fields(config):
        if not _is_section(f):
            continue
        stage = getattr(config, f.name)
        own = set(section_fields(type(config), type(stage)))
        defaults = _defaults(type(stage))
        data[f.name] = {
            k: v
            for k, v in dataclasses.asdict(stage).items()
            if k in own or (k not in RUN_DECIDES and v != defaults.get(k))
        }
    return data


def flat_settings(data: dict, prefix: str = "") -> dict:
    """A nested settings dict with dotted keys: ``{"stage1": {"epochs": 2}}`` -> ``{"stage1.epochs": 2}``."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_section(f: dataclasses.Field) -> bool:
    """Whether a field holds a nested config (a stage section)."""
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
