"""Stage 1: fine-tune backbone, pooler and every exit head with the depth-weighted loss.

    loss1 = sum_l l * CE(C_l(s_l), y) / sum_l l            (docs/method.md, weights 1..L as PABEE)

AdamW with linear warm-up and decay, gradient clipping, dynamic padding, per-layer dev metrics after
each epoch, and a checkpoint after each epoch that a re-run resumes from. The loop is written for
``accelerate``: under ``accelerate launch`` every process trains on its share of each batch and only
the main process writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pickle
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ee_gym import paths
from ee_gym.backbones import DEFAULT_BACKBONE, check_max_length
from ee_gym.batching import TokenizedSplit, all_exit_logits, shuffled_batches, tokenize_examples
from ee_gym.config import RESUMABLE_CHANGES, config_dict, flat_settings
from ee_gym.files import (
    CorruptFileError,
    folder_lock,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from ee_gym.model_card import CardFacts, card_settings
from ee_gym.multiexit import POOLINGS, MultiExitModel
from ee_gym.protocols import protocol_of_split
from ee_gym.scalars import ScalarLog, check_tensorboard, tensorboard_field
from ee_gym.targets import Target
from ee_gym.tasks import (
    BUILTIN_TASKS,
    compute_metrics,
    get_task,
    load_split,
    split_slug,
    task_default,
)
from ee_gym.validation import (
    ConfigError,
    check_choice,
    check_float,
    check_int,
    check_optional_float,
    check_optional_int,
    check_output_folder,
)

#: The built-in tasks' stage-1 defaults, as plain dicts (deprecated: they live on each task's spec,
#: ``TaskSpec.defaults``, and are read with :func:`ee_gym.tasks.task_default`).
TASK_DEFAULTS: dict[str, dict] = {
    spec.name: {k: getattr(spec.defaults, k) for k in ("learning_rate", "epochs", "max_length", "batch_size")}
    for spec in BUILTIN_TASKS
}
#: the stage-1 settings a None field takes from the task's spec
TASK_DEFAULT_FIELDS = ("learning_rate", "head_learning_rate", "epochs", "max_length", "batch_size")


@dataclass
class Stage1Config:
    """Arguments of stage 1. ``None`` fields take the task's defaults (``TaskSpec.defaults``, read
    with :func:`ee_gym.tasks.task_default`). Complete on its own (``ee-gym stage1``); inside a run,
    the run's shared setup fills the fields it also has (:func:`ee_gym.config.follow_run`)."""

    task: str = "rte"
    backbone: str = DEFAULT_BACKBONE
    # default: $EE_GYM_HOME/checkpoints/<task>-<backbone>-stage1[-<train_split slug>], see default_stage1_dir
    output_dir: str | None = None
    data_dir: str | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    head_learning_rate: float | None = None  # pooler and heads; None: the task's (TaskDefaults)
    batch_size: int | None = None
    max_length: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    head_dropout: float = 0.1
    pooling: str | None = None  # None: as the backbone was pre-trained
    seed: int = 42
    # The split stage 1 learns from; a slice such as "train[:90%]" keeps the rest of the training
    # split unseen by the heads (e.g. to train an exit policy on it, see ee_gym.envs.prepare).
    train_split: str = "train"
    train_limit: int | None = None  # use only the first N rows of train_split
    dev_limit: int | None = None
    eval_batch_size: int = 64
    progress: bool = True
    tensorboard: str | None = tensorboard_field()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Stage1Config:
        """Refuse (ConfigError) any value that cannot be right, before any work; run on construction.

        ``max_length`` is checked against the backbone's limit once the model is loaded (see
        :func:`ee_gym.backbones.check_max_length`), before any data is tokenized.
        """
        positive = dict(minimum=0.0, exclusive_minimum=True)
        self.epochs = check_optional_int("epochs", self.epochs, minimum=1)
        self.learning_rate = check_optional_float("learning_rate", self.learning_rate, **positive)
        self.head_learning_rate = check_optional_float(
            "head_learning_rate", self.head_learning_rate, **positive
        )
        self.batch_size = check_optional_int("batch_size", self.batch_size, minimum=1)
        self.max_length = check_optional_int("max_length", self.max_length, minimum=2)
        self.weight_decay = check_float("weight_decay", self.weight_decay, minimum=0.0)
        self.warmup_ratio = check_float("warmup_ratio", self.warmup_ratio, minimum=0.0, maximum=1.0)
        self.max_grad_norm = check_float("max_grad_norm", self.max_grad_norm, **positive)
        self.head_dropout = check_float(
            "head_dropout", self.head_dropout, minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        if self.pooling is not None:
            self.pooling = check_choice("pooling", self.pooling, POOLINGS)
        self.seed = check_int("seed", self.seed, minimum=0)
        self.train_limit = check_optional_int("train_limit", self.train_limit, minimum=1)
        self.dev_limit = check_optional_int("dev_limit", self.dev_limit, minimum=1)
        self.eval_batch_size = check_int("eval_batch_size", self.eval_batch_size, minimum=1)
        check_output_folder("output_dir", self.output_dir)
        self.tensorboard = check_tensorboard("tensorboard", self.tensorboard)
        return self

    def resolved(self) -> Stage1Config:
        """A copy with every default filled in (what a run folder records)."""
        task = get_task(self.task)
        filled = {
            k: task_default(task, k) if getattr(self, k) is None else getattr(self, k)
            for k in TASK_DEFAULT_FIELDS
        }
        output_dir = self.output_dir or str(default_stage1_dir(task.name, self.backbone, self.train_split))
        return dataclasses.replace(self, task=task.name, output_dir=output_dir, **filled)


def default_stage1_dir(task: str, backbone: str, train_split: str = "train") -> Path:
    """Where stage 1 for (task, backbone) lives unless told otherwise.

    ``<task>-<backbone>-stage1``, plus ``-<split slug>`` when it trains on another split than
    ``"train"``: ``train_split="train[:90%]"`` gives ``rte-minilm-l6-stage1-train-to90pct``
    (see :func:`ee_gym.tasks.split_slug`).
    """
    slug = str(backbone).strip("/").replace("/", "--")
    name = f"{get_task(task).name}-{slug}-stage1"
    if train_split.strip() != "train":
        name += f"-{split_slug(train_split.strip())}"
    return paths.home() / "checkpoints" / name


def weighted_exit_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_l l * loss(logits[:, l-1], y) / sum_l l for logits [B, L, K] and labels [B]: cross-entropy
    for label ids, squared error for real-valued labels (float ``labels``, K = 1; ee_gym.targets)."""
    num_layers = logits.shape[1]
    if labels.is_floating_point():
        per_layer = ((logits[..., 0].float() - labels[:, None].float()) ** 2).mean(0)
    else:
        per_layer = torch.stack([F.cross_entropy(logits[:, i], labels) for i in range(num_layers)])
    weights = torch.arange(1, num_layers + 1, dtype=per_layer.dtype, device=per_layer.device)
    return (weights * per_layer).sum() / weights.sum()


def layer_metrics(task, logits: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """The task metric of every exit, from logits [N, L, K]."""
    predictions = Target.of_task(task).predictions(logits)
    return [compute_metrics(task, predictions[:, i], labels) for i in range(logits.shape[1])]


def evaluate_exits(model: MultiExitModel, split: TokenizedSplit, task, batch_size: int = 64) -> list[dict]:
    """Per-layer dev metrics of a multi-exit model."""
    return layer_metrics(task, all_exit_logits(model, split, batch_size), split.labels)


@dataclass
class Stage1Result:
    model: MultiExitModel
    model_dir: Path
    history: list[dict]  # one record per epoch, as in metrics.jsonl


def train_stage1(
    config: Stage1Config | None = None, model: MultiExitModel | None = None, **overrides
) -> Stage1Result:
    """Run (or resume, or reuse) stage 1 and return the trained model.

    The run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint/`` (weights and optimizer
    after the last finished epoch) and, once done, ``model/``. Calling again with the same config
    resumes after the last finished epoch, or returns the finished model at once. ``model`` starts
    from an existing multi-exit model (a random tiny one in tests) instead of ``config.backbone``.
    """
    config = dataclasses.replace(config or Stage1Config(), **overrides)  # validates every setting
    if model is not None:
        config.backbone = model.config.backbone
    config = config.resolved()
    # cpu=True on CPU-only machines: accelerate then joins processes started by torchrun (gloo).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # One process: another job may run the same folder at once (two gym.make on a fresh home); the
    # first trains, the others wait and then find the finished model. Under torchrun / accelerate
    # launch all processes share one run, so there is no lock (as in build_cache).
    alone = accelerator.num_processes == 1
    with folder_lock(config.output_dir) if alone else contextlib.nullcontext():
        return _train_stage1(config, model, accelerator)


def _train_stage1(
    config: Stage1Config, model: MultiExitModel | None, accelerator: Accelerator
) -> Stage1Result:
    """:func:`train_stage1` on a resolved config, inside the run folder's lock."""
    task = get_task(config.task)
    run_dir = Path(config.output_dir)
    final_dir, ckpt_dir = run_dir / "model", run_dir / "checkpoint"
    main = accelerator.is_main_process
    _check_run_config(run_dir, config)

    if (final_dir / "fingerprint").is_file():
        return Stage1Result(MultiExitModel.from_pretrained(final_dir), final_dir, _read_history(run_dir))

    torch.manual_seed(config.seed)
    resume = None
    if (ckpt_dir / "trainer_state.pt").is_file():
        resume = _load_trainer_state(ckpt_dir)
        model = MultiExitModel.from_pretrained(ckpt_dir).train()
    elif model is None:
        model = MultiExitModel.from_backbone(
            config.backbone,
            num_labels=task.num_labels,
            pooling=config.pooling,
            head_dropout=config.head_dropout,
            labels=list(task.labels),
            task=task.name,
        )
    check_max_length(model, config.max_length)  # before any data is tokenized
    tokenizer = model.tokenizer
    train = tokenize_examples(
        load_split(task, config.train_split, config.data_dir, config.train_limit),
        tokenizer,
        config.max_length,
    )
    dev = tokenize_examples(
        load_split(task, "dev", config.data_dir, config.dev_limit), tokenizer, config.max_length
    )

    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay, config.learning_rate, config.head_learning_rate)
    )
    steps_per_epoch = math.ceil(len(train) / (config.batch_size * accelerator.num_processes))
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    start_epoch = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        start_epoch = resume["epoch"]
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config_dict(config))

    history = _read_history(run_dir)[:start_epoch]
    scalars = ScalarLog(config.tensorboard if main else None, "stage1")
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        model.train()
        batches = shuffled_batches(
            len(train),
            config.batch_size,
            config.seed + epoch,
            accelerator.process_index,
            accelerator.num_processes,
        )
        bar = tqdm(
            batches,
            desc=f"stage 1 [{task.name}] epoch {epoch + 1}/{config.epochs}",
            disable=not (config.progress and main),
            unit="batch",
        )
        losses = []
        for rows in bar:
            batch = train.batch(rows, tokenizer, accelerator.device)
            labels = batch.pop("labels")
            loss = weighted_exit_loss(model(**batch).logits, labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            scalars.scalars({"train_loss_step": losses[-1]}, epoch * steps_per_epoch + len(losses))

        unwrapped = accelerator.unwrap_model(model)
        dev_metrics = evaluate_exits(unwrapped, dev, task, config.eval_batch_size)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "dev": dev_metrics,
            "seconds": round(time.perf_counter() - began, 2),
            # CPU kernels sum in an order that depends on the thread count: the same settings and seed
            # give the same weights on the same thread count only (measured: a tiny BERT, 1 vs 2 threads)
            "torch_threads": torch.get_num_threads(),
        }
        history.append(record)
        _warn_if_heads_miss_the_scale(record, train.labels, config)
        scalars.scalars({"train_loss": record["train_loss"], "seconds": record["seconds"]}, epoch + 1)
        for name in dev_metrics[0]:
            scalars.layers(f"dev_{name}", [m[name] for m in dev_metrics], epoch + 1)
        if main:  # history first: a checkpoint never claims an epoch that metrics.jsonl lacks
            _write_history(run_dir, history)
            _save_checkpoint(unwrapped, ckpt_dir, optimizer, scheduler, epoch + 1)
            if config.progress:
                print(format_layer_metrics(task, dev_metrics, prefix=f"epoch {epoch + 1} dev"))
        accelerator.wait_for_everyone()

    scalars.close()
    model = accelerator.unwrap_model(model).eval()
    if main:
        card = CardFacts(stage="stage 1", train_split=config.train_split,
                         dev_metrics=history[-1]["dev"] if history else None, settings=card_settings(config))  # fmt: skip
        model.save_pretrained(final_dir, card=card)
    accelerator.wait_for_everyone()
    return Stage1Result(model, final_dir, history)


def finished_stage1_model(config: Stage1Config, progress: bool | None = None) -> MultiExitModel | None:
    """The model of a finished stage-1 run in ``config``'s folder, whatever settings trained it (for
    callers that want "stage 1 of this task and backbone", such as ``gym.make``); None when the folder
    holds no run, or an unfinished one with ``config``'s settings (:func:`train_stage1` resumes it).

    A finished run with other settings than ``config``'s is used, and they are reported in one line
    (printed when ``progress``, else logged). An unfinished run with other settings raises ConfigError
    naming the folder, the differing settings and the ways out.
    """
    config = config.resolved()
    run_dir = Path(config.output_dir)
    progress = config.progress if progress is None else progress
    saved = _saved_config(run_dir)
    differing = [] if saved is None else _differing_settings(saved, config)
    if (run_dir / "model" / "fingerprint").is_file():
        if differing:
            settings = ", ".join(f"{k}={saved.get(k)!r}" for k in differing)
            line = (
                f"ee-gym: using the finished stage-1 model {run_dir / 'model'} for {config.task} on "
                f"{config.backbone}, trained with {settings} (the rest as the defaults)"
            )
            if progress:
                print(line)
            else:
                logging.getLogger(__name__).info(line)
        return MultiExitModel.from_pretrained(run_dir / "model")
    if not differing:
        return None
    command = ["ee-gym", "stage1", "--task", config.task]
    if config.backbone != DEFAULT_BACKBONE:
        command += ["--backbone", str(config.backbone)]
    if config.train_split != "train":
        protocol = protocol_of_split(config.train_split)
        command += ["--train-split", config.train_split] if protocol is None else ["--protocol", protocol]
    if config.data_dir:
        command += ["--data-dir", str(config.data_dir)]
    for k in differing:
        if saved.get(k) is not None:
            command += [f"--{k.replace('_', '-')}", str(saved[k])]
    here = ", ".join(f"{k}={saved.get(k)!r} (here {getattr(config, k)!r})" for k in differing)
    raise ConfigError(
        f"{run_dir} holds an unfinished stage-1 run with other settings: {here}. Finish it with its "
        f"settings (`{shlex.join(command)}`; it is then used), or pass model=<a model folder>, or "
        "delete that folder to train one with these settings"
    )


def _warn_if_heads_miss_the_scale(record: dict, labels: np.ndarray, config: Stage1Config) -> None:
    """A regression run whose depth-weighted squared error is still above the labels' variance
    predicts worse than their mean: say so, and what to change, rather than hand on weak heads."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.floating) or labels.size < 2:
        return
    variance = float(labels.var())
    if record["train_loss"] > variance:
        warnings.warn(
            f"stage 1 epoch {record['epoch']}: the heads' mean squared error {record['train_loss']:.3f} is "
            f"above the labels' variance {variance:.3f} (predicting the mean would do better); raise "
            f"head_learning_rate (now {config.head_learning_rate or config.learning_rate:g}; "
            "--head-learning-rate) or epochs",
            stacklevel=2,
        )


def format_layer_metrics(task, metrics: list[dict], prefix: str = "") -> str:
    """One line: the primary metric of each exit, in percent."""
    name = next(iter(metrics[0]))
    values = " ".join(f"{100 * m[name]:.1f}" for m in metrics)
    return f"{prefix} {get_task(task).name} {name} by layer: {values}".strip()


# -- helpers ----------------------------------------------------------------------------------
def _parameter_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, head_lr: float | None
) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights, as usual for BERT
    fine-tuning; the exits (pooler and heads) may learn at their own rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        is_exit = name.startswith(("pooler.", "heads."))
        decays = not (param.ndim < 2 or "LayerNorm" in name)
        groups.setdefault((is_exit, decays), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": (head_lr or lr) if is_exit else lr,
        }
        for (is_exit, decays), params in sorted(groups.items())
    ]


def _save_checkpoint(model, folder: Path, optimizer, scheduler, epochs_done: int) -> None:
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epochs_done,
    }
    model.save_pretrained(folder, extra=lambda tmp: torch.save(state, tmp / "trainer_state.pt"))


def _check_run_config(run_dir: Path, config, what: str = "stage-1 run") -> None:
    """Refuse to resume a run folder (of any stage's config dataclass) started with other settings."""
    saved = _saved_config(run_dir)
    differing = [] if saved is None else _differing_settings(saved, config)
    if differing:
        raise ValueError(
            f"{run_dir} holds a {what} with other settings ({', '.join(differing)}). "
            "Pass another output_dir (--output-dir), or delete that folder to start over."
        )


def _saved_config(run_dir: Path) -> dict | None:
    """The settings a run folder records in ``config.json`` (None when it has none yet)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    return read_json(
        path,
        f"delete that file to go on with the settings you pass now (it is written again from them), "
        f"or delete the folder {run_dir} to start over",
    )


def _differing_settings(saved: dict, config) -> list[str]:
    """The settings of ``config`` (any stage's or the pipeline's config dataclass; nested sections as
    dotted names, ``stage1.epochs``) whose value ``saved`` records otherwise, except those a run may
    change between resumptions (:data:`RESUMABLE_CHANGES`)."""
    current, recorded = flat_settings(config_dict(config)), flat_settings(saved)
    # A setting added since the run was saved counts as its default (train_split: "train").
    defaults = flat_settings(_field_defaults(type(config)))
    return sorted(
        k
        for k in set(current) | set(recorded)
        if k.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES
        and recorded.get(k, defaults.get(k)) != current.get(k, defaults.get(k))
    )


def _field_defaults(cls) -> dict:
    """The declared defaults of a config dataclass, a nested section's as a dict of its class's."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif dataclasses.is_dataclass(f.default_factory):
            defaults[f.name] = _field_defaults(f.default_factory)
    return defaults


def _load_trainer_state(ckpt_dir: Path) -> dict:
    """The optimizer, scheduler and random states of a checkpoint, or CorruptFileError naming the
    file and the fix when it cannot be read (truncated by a full disk, a copy, an edit)."""
    path = Path(ckpt_dir) / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CorruptFileError(
            f"{path} cannot be read ({reason}); delete the checkpoint folder {ckpt_dir} to restart "
            "this run from its first epoch"
        ) from None


def _read_history(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (a torn last record, from a killed write, is skipped)."""
    return read_jsonl(
        Path(run_dir) / "metrics.jsonl", f"delete that file or the folder {run_dir} to start over"
    )


def _write_history(run_dir: Path, history: list[dict]) -> None:
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
