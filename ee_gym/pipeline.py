"""The whole method in one run folder: stage 1, the memorized layer, then rounds of (stage 2, stage 3).

``ee-gym train --task rte --agent reinforce --rounds 2`` calls :func:`train_pipeline`. Stage 1 is
:func:`ee_gym.training.train_stage1`, stage 2 the agent's ``learn`` on the current model's cached
table of the protocol's policy split, stage 3 :func:`ee_gym.joint.train_stage3`. The settings are one
tree (:class:`PipelineConfig`: a shared :class:`~ee_gym.config.RunSetup` and one section per stage). Every finished stage appends one record
(with the dev scores of the policy and of the full-depth model) to ``pipeline.jsonl``; a re-run
resumes after the last finished stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from ee_gym import paths
from ee_gym.backbones import check_max_length
from ee_gym.config import RunSetup, config_dict, follow_run
from ee_gym.files import folder_lock, read_jsonl, write_json_atomic, write_text_atomic
from ee_gym.joint import ROLLOUTS, Stage3Config, _save_npy_atomic, train_stage3
from ee_gym.model_card import CardFacts, card_settings
from ee_gym.multiexit import MultiExitModel
from ee_gym.policy import ExitPolicy, TrainingBudget, check_policy_name, load_policy, make_policy_with
from ee_gym.protocols import DEFAULT_PROTOCOL, get_protocol
from ee_gym.rewards import REWARDS
from ee_gym.tasks import get_task
from ee_gym.training import Stage1Config, _check_run_config
from ee_gym.validation import (
    ConfigError,
    check_choice,
    check_float,
    check_int,
    check_optional_float,
    check_optional_int,
    check_output_folder,
)


@dataclass
class PolicyTraining:
    """Stage 2: how the exit policy learns on the frozen model's cached table of the policy split."""

    epochs: int = 1  # reinforce (and any learner that takes epochs)
    batch_size: int = 32
    learning_rate: float = 3e-4
    timesteps: int | None = None  # SB3 learners; None: the agent's default
    replicas: int = 8  # reinforce: trajectories per input
    rollout: str = "sample"  # reinforce: "sample" or "threshold"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> PolicyTraining:
        """Refuse (ConfigError) any value that cannot be right; run on construction."""
        self.epochs = check_int("epochs", self.epochs, minimum=1)
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        self.learning_rate = check_float(
            "learning_rate", self.learning_rate, minimum=0.0, exclusive_minimum=True
        )
        self.timesteps = check_optional_int("timesteps", self.timesteps, minimum=1)
        self.replicas = check_int("replicas", self.replicas, minimum=1)
        self.rollout = check_choice("rollout", self.rollout, ROLLOUTS)
        return self


#: The flat keywords of PipelineConfig before its stage sections (deprecated, kept for one release):
#: old name -> the section fields it sets now.
LEGACY_FIELDS: dict[str, tuple[str, ...]] = {
    "stage1_epochs": ("stage1.epochs",),
    "stage1_learning_rate": ("stage1.learning_rate",),
    "stage1_batch_size": ("stage1.batch_size",),
    "policy_epochs": ("stage2.epochs",),
    "policy_batch_size": ("stage2.batch_size",),
    "policy_learning_rate": ("stage2.learning_rate", "stage3.policy_learning_rate"),
    "policy_timesteps": ("stage2.timesteps",),
    "replicas": ("stage2.replicas", "stage3.replicas"),
    "rollout": ("stage2.rollout", "stage3.rollout"),
    "separate_replicas": ("stage3.separate_replicas",),
    "stage3_epochs": ("stage3.epochs",),
    "stage3_learning_rate": ("stage3.learning_rate",),
    "stage3_batch_size": ("stage3.batch_size",),
    "stage3_train_limit": ("stage3.train_limit",),
}


@dataclass
class PipelineConfig(RunSetup):
    """Arguments of :func:`train_pipeline` (``ee-gym train``): the shared setup (:class:`RunSetup`:
    task, backbone, protocol, data, max length, seed, limits), what the run is (agent, rounds, reward,
    folders), and one section per stage. Each stage reads the setup (:func:`ee_gym.config.follow_run`);
    its section holds what only it sets. ``None`` fields take defaults.

    Stage 1 trains on the protocol's stage-1 split, stage 2 on its policy split, and stage 3 (the
    model's cross-entropy at the policy's exits) on the stage-1 split again, so the policy split stays
    unseen by the heads in every round. On the command line a section's field is
    ``--stage1.epochs``, ``--stage3.learning-rate``; the flat keywords of earlier releases
    (``stage1_epochs=``, ``policy_batch_size=``, ... :data:`LEGACY_FIELDS`) still work, with a
    DeprecationWarning.
    """

    agent: str = "reinforce"  # any registered policy name; stage 2 trains it, stage 3 uses it
    rounds: int = 1
    reward: str = "hardness"  # stage 2's env and stage 3's policy loss
    alpha: float | None = None  # None: ee_gym.rewards.default_alpha(task, L)
    # default: $EE_GYM_HOME/runs/<task>-<backbone>-<agent>[-<protocol>, unless the default]
    output_dir: str | None = None
    stage1_model: str | None = None  # a finished stage-1 model folder: used instead of training one
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: PolicyTraining = field(default_factory=PolicyTraining)
    stage3: Stage3Config = field(default_factory=Stage3Config)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> PipelineConfig:
        """Refuse (ConfigError) any value that cannot be right, and any that the stage configs built
        from it would refuse, before any stage runs; run on construction (each section validated
        itself when it was made). ``max_length`` meets the backbone's limit at the top of
        :func:`train_pipeline`."""
        RunSetup.validate(self)
        check_policy_name("agent", self.agent)
        self.rounds = check_int("rounds", self.rounds, minimum=1)
        if self.rounds > 1 and get_protocol(self.protocol).cross_fit:
            raise ConfigError(
                f"protocol {self.protocol!r} takes rounds=1: its policy table comes from stage-1 fold "
                "models, which stage 3 does not refresh; use rounds=1, or protocol 'held-out' for more rounds"
            )
        self.reward = check_choice("reward", self.reward, REWARDS)
        self.alpha = check_optional_float("alpha", self.alpha, minimum=0.0)
        check_output_folder("output_dir", self.output_dir)
        for name, cls in (("stage1", Stage1Config), ("stage2", PolicyTraining), ("stage3", Stage3Config)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(
                    f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}"
                )
        # the configs the stages will get validate themselves (e.g. reinforce's threshold rollout)
        run_dir = None if self.output_dir is None else Path(self.output_dir)
        _stage1_config(self, run_dir)
        _stage3_config(self, run_dir, 1)
        return self


_dataclass_init = PipelineConfig.__init__


@functools.wraps(_dataclass_init)
def _init_with_legacy_keywords(self, *args, **kwargs) -> None:
    """The dataclass's ``__init__``, also taking the flat keywords of :data:`LEGACY_FIELDS`
    (``dataclasses.replace(config, stage1_epochs=2)`` passes through here too)."""
    legacy = {name: kwargs.pop(name) for name in list(kwargs) if name in LEGACY_FIELDS}
    _dataclass_init(self, *args, **kwargs)  # runs validate()
    if not legacy:
        return
    warnings.warn(
        f"PipelineConfig({', '.join(legacy)}=...) is deprecated: set the stage sections instead "
        f"({', '.join(t for name in legacy for t in LEGACY_FIELDS[name])})",
        DeprecationWarning,
        stacklevel=2,
    )
    changes: dict[str, dict] = {}
    for name, value in legacy.items():
        for target in LEGACY_FIELDS[name]:
            section, key = target.split(".")
            changes.setdefault(section, {})[key] = value
    for section, fields in changes.items():
        try:  # one replace per section: settings that only go together (threshold, separate_replicas)
            setattr(self, section, dataclasses.replace(getattr(self, section), **fields))
        except ConfigError as error:
            named = ", ".join(n for n in legacy if any(t.startswith(section + ".") for t in LEGACY_FIELDS[n]))
            raise ConfigError(f"{named} (now {section}.*): {error}") from None
    self.validate()


PipelineConfig.__init__ = _init_with_legacy_keywords


@dataclass
class PipelineResult:
    model: MultiExitModel
    policy: Any  # an ee_gym.policy.ExitPolicy
    model_dir: Path
    policy_dir: Path
    stages: list[dict]  # as in pipeline.jsonl


def train_pipeline(config: PipelineConfig | None = None, model: MultiExitModel | None = None, **overrides):
    """ConsistentEE end to end in one run folder: stage 1, the memorized layer, then ``rounds`` rounds
    of (stage 2: the agent learns on the current model's cached table of the protocol's policy split;
    stage 3:
    :func:`train_stage3`, the model trains with the agent's exits).

    A policy that ``trains_jointly`` (``reinforce``) carries its networks from round to round and
    trains in stage 3 too. Any other learner is trained anew in each stage 2 on the refreshed table (an SB3 algorithm's ``learn`` starts a new
    model) and held fixed in stage 3; rules have nothing to learn and only decide stage 3's exits.

    Folder: ``config.json``, ``pipeline.jsonl`` (one record per finished stage, with its dev scores),
    ``stage1/``, ``memorized.npy`` (the stage-1 model's m(x) on stage 3's rows, the protocol's stage-1
    split) and ``memorized-policy.npy`` (on stage 2's, its policy split), ``round<r>/stage2/``
    (policy), ``round<r>/stage3/`` (a stage-3 run folder). A re-run resumes after the last finished stage (and inside an unfinished stage 1 or 3
    after its last finished epoch). The reward of every round uses the stage-1 model's m(x)
    (docs/method.md), also in stage 2 of later rounds, whose table comes from the refreshed model's cache
    (caches are keyed by model fingerprint, so a new model gets new caches). ``model``: the model
    stage 1 starts from (a tiny one in tests) instead of ``config.backbone``.
    """
    config = dataclasses.replace(config or PipelineConfig(), **overrides)  # validates every setting
    if model is not None:
        config.backbone = model.config.backbone
    task = get_task(config.task)
    if config.stage1_model:
        _check_stage1_folder(config.stage1_model)
    max_length = config.resolved_max_length()
    # the backbone's input limit, from its config alone: before stage 1 (or the given model) loads
    check_max_length(config.stage1_model or (model if model is not None else config.backbone), max_length)
    config = dataclasses.replace(
        config,
        task=task.name,
        max_length=max_length,
        output_dir=config.output_dir
        or str(default_run_dir(task.name, config.backbone, config.agent, config.protocol)),
    )
    # under torchrun / accelerate launch: stages 1 and 3 and the caches run on every process; the
    # main process alone trains stage 2 (small, on a cached table) and writes the run's files
    processes = PartialState(cpu=not torch.cuda.is_available())
    # one process: a second job on the same run folder waits, then resumes after what the first
    # finished (under torchrun all processes share one run: no lock, as in build_cache)
    alone = processes.num_processes == 1
    with folder_lock(config.output_dir) if alone else contextlib.nullcontext():
        return _run_pipeline(config, model, processes)


def default_run_dir(task: str, backbone: str, agent: str, protocol: str = DEFAULT_PROTOCOL) -> Path:
    """``$EE_GYM_HOME/runs/<task>-<backbone>-<agent>``, plus ``-<protocol>`` unless it is the default."""
    slug = str(backbone).strip("/").replace("/", "--")
    suffix = "" if protocol == DEFAULT_PROTOCOL else f"-{protocol}"
    return paths.home() / "runs" / f"{get_task(task).name}-{slug}-{agent}{suffix}"


def _run_pipeline(config: PipelineConfig, model: MultiExitModel | None, processes: PartialState):
    """:func:`train_pipeline` on a resolved config, inside the run folder's lock."""
    from ee_gym.envs.prepare import load_table, policy_table
    from ee_gym.evaluation import evaluate, full_depth_metrics
    from ee_gym.training import train_stage1

    task, max_length = get_task(config.task), config.max_length
    run_dir = Path(config.output_dir)
    _check_run_config(run_dir, config, "pipeline run")
    main = processes.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config_dict(config))
    log_path = run_dir / "pipeline.jsonl"
    log_fix = f"delete that line to run its stage again, or delete the folder {run_dir} to start over"
    records = read_jsonl(log_path, log_fix)  # a torn last record (a killed write): its stage runs again
    done = {r["stage"]: r for r in records}

    def finish(record: dict) -> None:
        done[record["stage"]] = record
        if not main:
            return
        # the whole log, rewritten atomically: a torn tail is dropped, never appended after
        records.append(record)
        write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in records))
        if config.progress:
            print(f"[{record['stage']}] done: {record.get('dev', '')}")

    tables = dict(data_dir=config.data_dir, max_length=max_length, progress=config.progress)
    protocol = get_protocol(config.protocol)
    stage1_config = _stage1_config(config, run_dir)
    stage3_limit = _stage3_config(config, run_dir, 1).train_limit

    def dev_scores(current_model, current_policy) -> dict:
        """The policy's dev scores, and (under "full_depth") the current model's at layer L."""
        dev = load_table(current_model, task.name, "dev", max_inputs=config.dev_limit, **tables)
        full = full_depth_metrics(dev)
        if current_policy is None:
            return {"full_depth": full}
        result = evaluate(current_policy, dev)
        scores = {**result.metrics, "mean_exit_layer": result.mean_exit_layer, "speedup": result.speedup}
        return {**scores, "full_depth": full}

    if config.stage1_model:
        stage1 = _given_stage1(config.stage1_model)
    else:
        stage1 = train_stage1(stage1_config, model=model)
    current = stage1.model.eval()
    if "stage1" not in done:
        finish(
            {
                "stage": "stage1",
                "protocol": protocol.name,
                "train_split": protocol.stage1_split,
                "policy_split": protocol.policy_split,
                "model_dir": str(stage1.model_dir),
                "dev": dev_scores(current, None),
            }
        )

    # the stage-1 model's m(x), on stage 3's rows (the stage-1 split) and on stage 2's (the policy split)
    memorized_path, policy_memorized_path = run_dir / "memorized.npy", run_dir / "memorized-policy.npy"
    if "memorized" in done:
        memorized, policy_memorized = np.load(memorized_path), np.load(policy_memorized_path)
    else:
        stage3_rows = load_table(current, task.name, protocol.stage1_split, max_inputs=stage3_limit, **tables)
        policy_rows = policy_table(
            current,
            task.name,
            protocol.name,
            backbone=config.backbone,
            max_inputs=config.train_limit,
            **tables,
        )
        memorized = np.asarray(stage3_rows.memorized, dtype=np.int64)
        policy_memorized = np.asarray(policy_rows.memorized, dtype=np.int64)
        if main:
            _save_npy_atomic(memorized_path, memorized)
            _save_npy_atomic(policy_memorized_path, policy_memorized)
        finish(
            {
                "stage": "memorized",
                "path": str(memorized_path),
                "split": protocol.stage1_split,
                "histogram": np.bincount(memorized, minlength=current.num_layers + 1)[1:].tolist(),
                "policy_path": str(policy_memorized_path),
                "policy_split": protocol.policy_split,
                "policy_histogram": np.bincount(policy_memorized, minlength=current.num_layers + 1)[
                    1:
                ].tolist(),
            }
        )

    # a policy that trains jointly carries its training from round to round; any other learner is
    # made anew in each stage 2, on the refreshed model's table
    policy = _new_agent(config, config.seed)
    carries = policy.trains_jointly
    model_dir, policy_dir = stage1.model_dir, None
    for r in range(1, config.rounds + 1):
        stage2_dir = run_dir / f"round{r}" / "stage2"
        if f"stage2-round{r}" in done:
            policy = load_policy(stage2_dir)
        elif not main:  # the main process trains it; take its saved policy
            processes.wait_for_everyone()
            policy = load_policy(stage2_dir)
            done[f"stage2-round{r}"] = {}
        else:
            table = policy_table(
                current, task.name, protocol.name, backbone=config.backbone, max_inputs=config.train_limit,
                **tables,
            )  # fmt: skip
            table = dataclasses.replace(table, memorized=policy_memorized, derived={})  # stage-1 m(x)
            if not carries:  # a new learner on the refreshed table (rules: nothing to learn)
                policy = _new_agent(config, config.seed + r)
            began = time.perf_counter()
            _learn(policy, config, table, seed=config.seed + r)
            policy.save(stage2_dir, card=CardFacts(stage=f"stage 2 (round {r})", protocol=protocol.name,
                                                   train_split=protocol.policy_split, settings=card_settings(config)))  # fmt: skip
            processes.wait_for_everyone()
            finish(
                {
                    "stage": f"stage2-round{r}",
                    "policy_dir": str(stage2_dir),
                    "train": policy.history[-1] if getattr(policy, "history", None) else None,
                    "seconds": round(time.perf_counter() - began, 2),
                    "dev": dev_scores(current, policy),
                }
            )
        policy_dir = stage2_dir

        stage3 = train_stage3(
            _stage3_config(config, run_dir, r),
            model=current,
            policy=policy,
            memorized=memorized,
        )
        current, policy = stage3.model.eval(), stage3.policy
        model_dir, policy_dir = stage3.model_dir, stage3.policy_dir
        if f"stage3-round{r}" not in done:
            finish(
                {
                    "stage": f"stage3-round{r}",
                    "model_dir": str(model_dir),
                    "policy_dir": str(policy_dir),
                    "train": stage3.history[-1] if stage3.history else None,
                    "dev": dev_scores(current, policy),
                }
            )
    processes.wait_for_everyone()  # the main process has written every record
    stages = read_jsonl(log_path, log_fix)
    return PipelineResult(current, policy, Path(model_dir), Path(policy_dir or ""), stages)


def _stage1_config(config: PipelineConfig, run_dir: Path | None) -> Stage1Config:
    """The stage-1 settings of a pipeline run: its ``stage1`` section on the run's setup, trained on the
    protocol's stage-1 split (run folder: ``<run_dir>/stage1``)."""
    return follow_run(
        config,
        config.stage1,
        output_dir=None if run_dir is None else str(run_dir / "stage1"),
        train_split=get_protocol(config.protocol).stage1_split,
    )


def _stage3_config(config: PipelineConfig, run_dir: Path | None, round_: int) -> Stage3Config:
    """The stage-3 settings of round ``round_``: its ``stage3`` section on the run's setup, the model
    trained on the protocol's stage-1 split, seeded ``seed + round`` (run folder:
    ``<run_dir>/round<r>/stage3``)."""
    stage = follow_run(
        config,
        config.stage3,
        output_dir=None if run_dir is None else str(run_dir / f"round{round_}" / "stage3"),
        train_split=get_protocol(config.protocol).stage1_split,
    )
    return dataclasses.replace(stage, seed=stage.seed + round_)


def _new_agent(config: PipelineConfig, seed: int) -> ExitPolicy:
    """A new policy of ``config.agent``, given the run's seed and rollout where it takes them."""
    return make_policy_with(config.agent, {"rollout": config.stage2.rollout, "seed": seed})


def _learn(policy: ExitPolicy, config: PipelineConfig, table, seed: int) -> None:
    """Stage 2: train ``policy`` on ``table`` with the pipeline's reward, price and budget (one
    budget for every learner: each reads what applies to it; rules: no-op)."""
    from ee_gym.envs import ConsistentEEVectorEnv

    if not policy.learns:
        return
    env = ConsistentEEVectorEnv(
        256,  # parallel inputs; a learner that trains on another number rebuilds it over the table
        table=table,
        split=table.split,
        reward=config.reward,
        alpha=config.alpha,
        obs_mode=policy.obs_mode,
    )
    budget = TrainingBudget(
        epochs=config.stage2.epochs,
        total_timesteps=config.stage2.timesteps,
        batch_size=config.stage2.batch_size,
        replicas=config.stage2.replicas,
        learning_rate=config.stage2.learning_rate,
        rollout=config.stage2.rollout,
        seed=seed,
        progress=config.progress,
        tensorboard_log=config.tensorboard,
    )
    policy.learn(env, budget)


def _given_stage1(folder: str):
    """A finished stage-1 model folder in the shape :func:`train_stage1` returns."""
    from ee_gym.training import Stage1Result

    path = _check_stage1_folder(folder)
    return Stage1Result(MultiExitModel.from_pretrained(path), path, [])


def _check_stage1_folder(folder: str) -> Path:
    """``folder`` as a Path when it holds a saved multi-exit model, else FileNotFoundError."""
    path = Path(folder)
    if not (path / "fingerprint").is_file():
        raise FileNotFoundError(
            f"stage1_model={folder!r} is not a saved multi-exit model (no fingerprint file); pass the "
            "model/ folder of a finished stage-1 run"
        )
    return path
