"""The whole method in one run folder: stage 1, the memorized layer, then rounds of (stage 2, stage 3).

``ee-gym train --task rte --agent reinforce --rounds 2`` calls :func:`train_pipeline`. Stage 1 is
:func:`ee_gym.training.train_stage1`, stage 2 the agent's ``learn`` on the current model's cached
training table, stage 3 :func:`ee_gym.joint.train_stage3`. Every finished stage appends one record
(with the dev scores of the policy and of the full-depth model) to ``pipeline.jsonl``; a re-run
resumes after the last finished stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from ee_gym import paths
from ee_gym.backbones import DEFAULT_BACKBONE, check_max_length
from ee_gym.files import folder_lock, read_jsonl, write_json_atomic, write_text_atomic
from ee_gym.joint import ROLLOUTS, Stage3Config, _save_npy_atomic, train_stage3
from ee_gym.multiexit import MultiExitModel
from ee_gym.policy import ExitPolicy, TrainingBudget, check_policy_name, load_policy, make_policy_with
from ee_gym.rewards import REWARDS
from ee_gym.tasks import get_task
from ee_gym.training import Stage1Config, _check_run_config
from ee_gym.validation import (
    check_choice,
    check_float,
    check_int,
    check_optional_float,
    check_optional_int,
    check_output_folder,
)


@dataclass
class PipelineConfig:
    """Arguments of :func:`train_pipeline` (``ee-gym train``). ``None`` fields take defaults."""

    task: str = "rte"
    backbone: str = DEFAULT_BACKBONE
    agent: str = "reinforce"  # any registered policy name; stage 2 trains it, stage 3 uses it
    # default: $EE_GYM_HOME/runs/<task>-<backbone>-<agent>
    output_dir: str | None = None
    data_dir: str | None = None
    rounds: int = 1
    seed: int = 42
    max_length: int | None = None  # None: the task's stage-1 default
    train_limit: int | None = None  # first N training rows, in every stage
    dev_limit: int | None = None
    stage1_model: str | None = None  # a finished stage-1 model folder: used instead of training one
    stage1_epochs: int | None = None  # None: the task's stage-1 default
    stage1_learning_rate: float | None = None
    stage1_batch_size: int | None = None
    policy_epochs: int = 1  # stage 2 (reinforce)
    policy_batch_size: int = 32
    policy_learning_rate: float = 3e-4
    policy_timesteps: int | None = None  # stage 2 (SB3 learners); None: the agent's default
    replicas: int = 8
    separate_replicas: bool = False
    rollout: str = "sample"
    reward: str = "hardness"
    alpha: float | None = None
    stage3_epochs: int = 1
    stage3_learning_rate: float = 2e-5
    stage3_batch_size: int = 8
    stage3_train_limit: int | None = None  # first N training rows in stage 3 (default: train_limit)
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> PipelineConfig:
        """Refuse (ConfigError) any value that cannot be right, and any that the stage-1 and stage-3
        configs built from it would refuse, before any stage runs; run on construction.
        ``max_length`` meets the backbone's limit at the top of :func:`train_pipeline`."""
        positive = dict(minimum=0.0, exclusive_minimum=True)
        check_policy_name("agent", self.agent)
        self.rounds = check_int("rounds", self.rounds, minimum=1)
        self.seed = check_int("seed", self.seed, minimum=0)
        self.max_length = check_optional_int("max_length", self.max_length, minimum=2)
        self.train_limit = check_optional_int("train_limit", self.train_limit, minimum=1)
        self.dev_limit = check_optional_int("dev_limit", self.dev_limit, minimum=1)
        self.stage1_epochs = check_optional_int("stage1_epochs", self.stage1_epochs, minimum=1)
        self.stage1_learning_rate = check_optional_float(
            "stage1_learning_rate", self.stage1_learning_rate, **positive
        )
        self.stage1_batch_size = check_optional_int("stage1_batch_size", self.stage1_batch_size, minimum=1)
        self.policy_epochs = check_int("policy_epochs", self.policy_epochs, minimum=1)
        self.policy_batch_size = check_int("policy_batch_size", self.policy_batch_size, minimum=1)
        self.policy_learning_rate = check_float("policy_learning_rate", self.policy_learning_rate, **positive)
        self.policy_timesteps = check_optional_int("policy_timesteps", self.policy_timesteps, minimum=1)
        self.replicas = check_int("replicas", self.replicas, minimum=1)
        self.rollout = check_choice("rollout", self.rollout, ROLLOUTS)
        self.reward = check_choice("reward", self.reward, REWARDS)
        self.alpha = check_optional_float("alpha", self.alpha, minimum=0.0)
        self.stage3_epochs = check_int("stage3_epochs", self.stage3_epochs, minimum=1)
        self.stage3_learning_rate = check_float("stage3_learning_rate", self.stage3_learning_rate, **positive)
        self.stage3_batch_size = check_int("stage3_batch_size", self.stage3_batch_size, minimum=1)
        self.stage3_train_limit = check_optional_int("stage3_train_limit", self.stage3_train_limit, minimum=1)
        check_output_folder("output_dir", self.output_dir)
        # the configs the stages will get validate themselves (e.g. reinforce's threshold rollout)
        run_dir = None if self.output_dir is None else Path(self.output_dir)
        _stage1_config(self, run_dir)
        _stage3_config(self, run_dir, 1)
        return self


@dataclass
class PipelineResult:
    model: MultiExitModel
    policy: Any  # an ee_gym.policy.ExitPolicy
    model_dir: Path
    policy_dir: Path
    stages: list[dict]  # as in pipeline.jsonl


def train_pipeline(config: PipelineConfig | None = None, model: MultiExitModel | None = None, **overrides):
    """ConsistentEE end to end in one run folder: stage 1, the memorized layer, then ``rounds`` rounds
    of (stage 2: the agent learns on the current model's cached training table; stage 3:
    :func:`train_stage3`, the model trains with the agent's exits).

    A policy that ``trains_jointly`` (``reinforce``) carries its networks from round to round and
    trains in stage 3 too. Any other learner is trained anew in each stage 2 on the refreshed table (an SB3 algorithm's ``learn`` starts a new
    model) and held fixed in stage 3; rules have nothing to learn and only decide stage 3's exits.

    Folder: ``config.json``, ``pipeline.jsonl`` (one record per finished stage, with its dev scores),
    ``stage1/``, ``memorized.npy``, ``round<r>/stage2/`` (policy), ``round<r>/stage3/`` (a stage-3 run
    folder). A re-run resumes after the last finished stage (and inside an unfinished stage 1 or 3
    after its last finished epoch). The reward of every round uses the stage-1 model's m(x)
    (METHOD.md), also in stage 2 of later rounds, whose table comes from the refreshed model's cache
    (caches are keyed by model fingerprint, so a new model gets new caches). ``model``: the model
    stage 1 starts from (a tiny one in tests) instead of ``config.backbone``.
    """
    config = dataclasses.replace(config or PipelineConfig(), **overrides)  # validates every setting
    if model is not None:
        config.backbone = model.config.backbone
    task = get_task(config.task)
    if config.stage1_model:
        _check_stage1_folder(config.stage1_model)
    slug = str(config.backbone).strip("/").replace("/", "--")
    max_length = config.max_length or Stage1Config(task=task.name).resolved().max_length
    # the backbone's input limit, from its config alone: before stage 1 (or the given model) loads
    check_max_length(config.stage1_model or (model if model is not None else config.backbone), max_length)
    config = dataclasses.replace(
        config,
        task=task.name,
        max_length=max_length,
        output_dir=config.output_dir or str(paths.home() / "runs" / f"{task.name}-{slug}-{config.agent}"),
    )
    # under torchrun / accelerate launch: stages 1 and 3 and the caches run on every process; the
    # main process alone trains stage 2 (small, on a cached table) and writes the run's files
    processes = PartialState(cpu=not torch.cuda.is_available())
    # one process: a second job on the same run folder waits, then resumes after what the first
    # finished (under torchrun all processes share one run: no lock, as in build_cache)
    alone = processes.num_processes == 1
    with folder_lock(config.output_dir) if alone else contextlib.nullcontext():
        return _run_pipeline(config, model, processes)


def _run_pipeline(config: PipelineConfig, model: MultiExitModel | None, processes: PartialState):
    """:func:`train_pipeline` on a resolved config, inside the run folder's lock."""
    from ee_gym.envs.prepare import load_table
    from ee_gym.evaluation import evaluate, full_depth_metrics
    from ee_gym.training import train_stage1

    task, max_length = get_task(config.task), config.max_length
    run_dir = Path(config.output_dir)
    _check_run_config(run_dir, config, "pipeline run")
    main = processes.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", dataclasses.asdict(config))
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
        stage1 = train_stage1(_stage1_config(config, run_dir), model=model)
    current = stage1.model.eval()
    if "stage1" not in done:
        finish({"stage": "stage1", "model_dir": str(stage1.model_dir), "dev": dev_scores(current, None)})

    memorized_path = run_dir / "memorized.npy"
    if "memorized" in done:
        memorized = np.load(memorized_path)
    else:
        train_table = load_table(current, task.name, "train", max_inputs=config.train_limit, **tables)
        memorized = np.asarray(train_table.memorized, dtype=np.int64)
        if main:
            _save_npy_atomic(memorized_path, memorized)
        finish(
            {
                "stage": "memorized",
                "path": str(memorized_path),
                "histogram": np.bincount(memorized, minlength=current.num_layers + 1)[1:].tolist(),
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
            table = load_table(current, task.name, "train", max_inputs=config.train_limit, **tables)
            table = dataclasses.replace(table, memorized=memorized, derived={})  # stage-1 m(x)
            if not carries:  # a new learner on the refreshed table (rules: nothing to learn)
                policy = _new_agent(config, config.seed + r)
            began = time.perf_counter()
            _learn(policy, config, table, seed=config.seed + r)
            policy.save(stage2_dir)
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
    """The stage-1 settings of a pipeline run (its run folder: ``<run_dir>/stage1``)."""
    return Stage1Config(
        task=config.task,
        backbone=config.backbone,
        output_dir=None if run_dir is None else str(run_dir / "stage1"),
        data_dir=config.data_dir,
        epochs=config.stage1_epochs,
        learning_rate=config.stage1_learning_rate,
        batch_size=config.stage1_batch_size,
        max_length=config.max_length,
        seed=config.seed,
        train_limit=config.train_limit,
        dev_limit=config.dev_limit,
        progress=config.progress,
    )


def _stage3_config(config: PipelineConfig, run_dir: Path | None, round_: int) -> Stage3Config:
    """The stage-3 settings of round ``round_`` (its run folder: ``<run_dir>/round<r>/stage3``)."""
    return Stage3Config(
        task=config.task,
        agent=config.agent,  # train_stage3 takes it from the policy it is given: the same name
        data_dir=config.data_dir,
        output_dir=None if run_dir is None else str(run_dir / f"round{round_}" / "stage3"),
        epochs=config.stage3_epochs,
        learning_rate=config.stage3_learning_rate,
        policy_learning_rate=config.policy_learning_rate,
        batch_size=config.stage3_batch_size,
        replicas=config.replicas,
        separate_replicas=config.separate_replicas,
        max_length=config.max_length,
        reward=config.reward,
        alpha=config.alpha,
        rollout=config.rollout,
        seed=config.seed + round_,
        train_limit=config.stage3_train_limit or config.train_limit,
        progress=config.progress,
    )


def _new_agent(config: PipelineConfig, seed: int) -> ExitPolicy:
    """A new policy of ``config.agent``, given the run's seed and rollout where it takes them."""
    return make_policy_with(config.agent, {"rollout": config.rollout, "seed": seed})


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
        epochs=config.policy_epochs,
        total_timesteps=config.policy_timesteps,
        batch_size=config.policy_batch_size,
        replicas=config.replicas,
        learning_rate=config.policy_learning_rate,
        rollout=config.rollout,
        seed=seed,
        progress=config.progress,
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
