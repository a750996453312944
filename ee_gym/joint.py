"""Stage 3, joint ("consistent") training of the model with its exit policy, on the live model.

docs/method.md, "Stage 3": everything is trainable; each input pays cross-entropy only at the exit the policy
chose, plus the policy loss:

    loss3 = mean_x CE(C_t(s_t), y) + loss2,    loss2 = -mean_{x,k} (R - b(x)) log pi(tau)

Which exits, by capability (:class:`ee_gym.policy.ExitPolicy`), never by name:

* a policy with ``trains_jointly`` (``reinforce``, the paper's learner) trains end to end. Each input
  has K = ``replicas`` trajectories, drawn by the policy's ``joint_decider`` (REINFORCE: at layer l
  its per-layer network gives p_l from what it reads, s_l and, in ``state+confidence``, exit l's
  confidence; each replica still running exits with a Bernoulli(p_l) draw, ``rollout="sample"``,
  the default; none below its ``min_layer``: the decisions its stage-2 rollouts make, in the same
  code, :class:`ee_gym.runner.NetworkExits`); at layer L every replica exits. The reward of each
  replica is the named reward of :mod:`ee_gym.rewards` from its (detached) CE, its exit t and the
  memorized layer m(x) (an array over the training split, computed once from the starting model);
  the policy's ``joint_loss`` turns the rewards into loss2 (REINFORCE: the baseline b(x) is the
  mean reward of the input's K replicas).
* any other policy (an SB3 learner, a rule) is **held fixed**: at each layer it reads the observation
  the envs would give it (:meth:`ObservationEncoder.from_outputs` on the live states and head logits)
  and its deterministic action decides where the input pays CE; there is no loss2. The pipeline
  (:func:`ee_gym.pipeline.train_pipeline`) then re-trains it on the refreshed model's table: the
  "frozen, then jointly trained" loop of the paper for every algorithm.

Every rollout runs through :func:`ee_gym.runner.run_layers`, the loop batched inference runs.

Replicas share one forward pass by default: the K trajectories of an input differ only by their
exit draws, so the model runs once per input, up to the last of its replicas' exits, and a replica
that exits at t pays the CE of head t on that shared pass: the same loss in expectation as K separate
passes, for about 1/K of the compute. ``separate_replicas=True`` runs each replica through the model
on its own (they then also differ by dropout; K times the compute); the authors' ``threshold`` rollout
needs it, as its replicas differ by nothing else.

Rows leave the batch at their exit (``MultiExitModel.select``): the layers above an input's exit never
run for it, and the CE's gradient reaches the embeddings, the layers up to the exit, the shared pooler
and the chosen exit's head only.

Design choice: the policy reads the pooled state **detached** (``s_l.detach()``), so loss2 trains only
the policy networks and never pushes the backbone or the pooler; the model learns only from the CE at
the chosen exits. (Letting loss2 reach the backbone would make the representation serve the policy's
advantage estimate, a high-variance signal the paper does not ask the backbone to follow.)

Optimisers: AdamW for the model (linear decay, no decay on biases and LayerNorm weights, as stage 1),
Adam for the policy; the model's gradients are clipped to ``max_grad_norm``. The run folder holds
``config.json``, ``memorized.npy``, ``metrics.jsonl``, ``checkpoint/`` (model, ``policy/`` and
``trainer_state.pt`` after the last finished epoch) and, once done, ``model/`` and ``policy/``. A
re-run with the same settings resumes after the last finished epoch, or returns the finished run.

Several processes (``accelerate launch`` or ``torchrun``): each takes its share of every batch, runs
its rows to their own exits, and the gradients are averaged over processes before each step (an
all-reduce of every parameter's gradient, zeros for heads a process did not use, so that exits at
different depths on different processes need no special care). Only the main process writes. A
multi-process run resumes from its checkpoint too, but not bit-identically (only the main process's
random state is saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ee_gym import paths
from ee_gym.backbones import DEFAULT_BACKBONE, check_max_length
from ee_gym.batching import all_exit_logits, shuffled_batches, tokenize_examples
from ee_gym.files import folder_lock, write_json_atomic
from ee_gym.hardness import memorized_layer_from_logits
from ee_gym.inference import acting_exits
from ee_gym.model_card import CardFacts, card_settings
from ee_gym.multiexit import MultiExitModel
from ee_gym.policy import ROLLOUTS, check_policy_name, load_policy, make_policy_with, policy_class
from ee_gym.rewards import REWARDS, default_alpha, get_reward
from ee_gym.runner import ActingExits, Decider, NetworkExits, run_layers
from ee_gym.scalars import ScalarLog, check_tensorboard, tensorboard_field
from ee_gym.targets import Target
from ee_gym.tasks import get_task, load_split, task_default
from ee_gym.training import (
    _check_run_config,
    _load_trainer_state,
    _parameter_groups,
    _read_history,
    _write_history,
    default_stage1_dir,
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


@dataclass
class Stage3Config:
    """Arguments of stage 3. ``None`` fields take defaults (see :meth:`resolved`). Complete on its
    own; inside a run, the run's shared setup fills the fields it also has
    (:func:`ee_gym.config.follow_run`)."""

    task: str = "rte"
    model_dir: str | None = None  # the model to start from; default: stage 1 of (task, minilm-l6)
    agent: str = "reinforce"  # the exit policy: one that trains_jointly learns here, any other is held fixed
    policy_dir: str | None = None  # a saved policy; default: the one passed, else a new ``agent``
    data_dir: str | None = None
    # default: $EE_GYM_HOME/checkpoints/<task>-stage3-<agent>-<fingerprint of the starting model>
    output_dir: str | None = None
    epochs: int = 1
    learning_rate: float = 2e-5  # the model
    policy_learning_rate: float = 3e-4
    batch_size: int = 8  # inputs per step (x replicas trajectories)
    replicas: int = 8
    separate_replicas: bool = False  # True: one forward pass per replica (see the module docstring)
    max_length: int | None = None  # None: the task's stage-1 default
    reward: str = "hardness"
    alpha: float | None = None  # None: ee_gym.rewards.default_alpha(task, L)
    rollout: str = "sample"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    train_split: str = "train"
    train_limit: int | None = None
    progress: bool = True
    tensorboard: str | None = tensorboard_field()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Stage3Config:
        """Refuse (ConfigError) any value that cannot be right, before any work; run on construction
        and again by :meth:`resolved`. ``max_length`` meets the model's limit in :meth:`resolved`."""
        positive = dict(minimum=0.0, exclusive_minimum=True)
        check_policy_name("agent", self.agent)
        self.epochs = check_int("epochs", self.epochs, minimum=1)
        self.learning_rate = check_float("learning_rate", self.learning_rate, **positive)
        self.policy_learning_rate = check_float("policy_learning_rate", self.policy_learning_rate, **positive)
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        self.replicas = check_int("replicas", self.replicas, minimum=1)
        self.max_length = check_optional_int("max_length", self.max_length, minimum=2)
        self.reward = check_choice("reward", self.reward, REWARDS)
        self.alpha = check_optional_float("alpha", self.alpha, minimum=0.0)
        self.rollout = check_choice("rollout", self.rollout, ROLLOUTS)
        self.weight_decay = check_float("weight_decay", self.weight_decay, minimum=0.0)
        self.warmup_ratio = check_float("warmup_ratio", self.warmup_ratio, minimum=0.0, maximum=1.0)
        self.max_grad_norm = check_float("max_grad_norm", self.max_grad_norm, **positive)
        self.seed = check_int("seed", self.seed, minimum=0)
        self.train_limit = check_optional_int("train_limit", self.train_limit, minimum=1)
        check_output_folder("output_dir", self.output_dir)
        self.tensorboard = check_tensorboard("tensorboard", self.tensorboard)
        jointly = policy_class(self.agent).trains_jointly
        if jointly and self.rollout == "threshold" and not self.separate_replicas:
            raise ConfigError(
                "the threshold rollout's replicas differ only by dropout, so with a shared forward pass "
                "they are identical and learn nothing: set separate_replicas=True (or rollout='sample')"
            )
        return self

    def resolved(self, model: MultiExitModel) -> Stage3Config:
        """A copy with every default filled in (what a run folder records)."""
        task = get_task(self.task)
        self.validate()  # again: the agent may have been set from the policy since construction
        max_length = self.max_length or task_default(task, "max_length")
        check_max_length(model, max_length)
        alpha = default_alpha(task.name, model.num_layers) if self.alpha is None else float(self.alpha)
        output_dir = self.output_dir or str(
            paths.home() / "checkpoints" / f"{task.name}-stage3-{self.agent}-{model.fingerprint()}"
        )
        return dataclasses.replace(
            self, task=task.name, max_length=max_length, alpha=alpha, output_dir=output_dir
        )


@dataclass
class Stage3Result:
    model: MultiExitModel
    policy: Any  # an ee_gym.policy.ExitPolicy (trained here when it trains_jointly)
    model_dir: Path
    policy_dir: Path
    history: list[dict]  # one record per epoch, as in metrics.jsonl


# -- who decides the exits: the runner's deciders, under their stage-3 names ----------------------
#: REINFORCE-style per-layer networks ``net(states, layers) -> exit logits``, K trajectories per row
LearnedExits = NetworkExits


def FixedAgentExits(policy: Any, model: MultiExitModel) -> ActingExits:  # noqa: N802 (a former class)
    """Any deployable exit policy, held fixed: its deterministic action on the envs' observation."""
    return acting_exits(policy, model)


# -- one rollout on the live model --------------------------------------------------------------
@dataclass
class JointRollout:
    """One row per (input, replica), replica-minor: row i * K + k is replica k of input i."""

    ce: torch.Tensor  # [N] CE at the chosen exit, with its graph into the model
    policy_logits: torch.Tensor | None  # [N, L] the policy's exit logits with their graph (0 after the exit)
    exit_layer: torch.Tensor  # [N] int64, 1..L
    exit_chosen: torch.Tensor  # [N] bool, False when forced out at L
    correct: torch.Tensor  # [N] bool


def joint_rollout(
    model: MultiExitModel,
    decide: Decider,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    target: Target | None = None,
) -> JointRollout:
    """Run ``batch`` layer by layer (:func:`ee_gym.runner.run_layers`); ``decide`` picks the exits of
    its ``replicas`` trajectories per row, and each trajectory pays the loss of the head it exited at
    (cross-entropy; squared error for a regression ``target``, whose right is within its tolerance)."""
    target = target or Target()
    run = run_layers(model, batch, decide)
    labels = labels.to(run.exit_logits.device).repeat_interleave(run.replicas)
    if target.regression:
        value = run.exit_logits.float()[:, 0]
        ce = (value - labels.float()) ** 2
        correct = (value.detach() - labels.float()).abs() <= target.tolerance
    else:
        ce = F.cross_entropy(run.exit_logits.float(), labels, reduction="none")
        correct = run.exit_logits.detach().argmax(-1) == labels
    return JointRollout(ce, run.policy_logits, run.exit_layer, run.exit_chosen, correct)


def replicate(batch: dict[str, torch.Tensor], replicas: int) -> dict[str, torch.Tensor]:
    """Each row ``replicas`` times in a row (the layout group_baseline expects)."""
    return {k: v.repeat_interleave(replicas, dim=0) for k, v in batch.items()}


def stage1_memorized(
    model: MultiExitModel, split, batch_size: int = 64, target: Target | None = None
) -> np.ndarray:
    """m(x) of every row of a tokenized split under ``model`` in eval mode."""
    return memorized_layer_from_logits(all_exit_logits(model, split, batch_size), split.labels, target)


def average_gradients(parameters, accelerator: Accelerator) -> None:
    """Mean gradient over processes; a parameter a process did not use counts as a zero gradient."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad /= accelerator.num_processes


# -- the training loop --------------------------------------------------------------------------
def train_stage3(
    config: Stage3Config | None = None,
    model: MultiExitModel | None = None,
    policy: Any = None,
    memorized: np.ndarray | None = None,
    **overrides,
) -> Stage3Result:
    """Run (or resume, or reuse) stage 3 and return the trained model and policy.

    ``model``: the model to start from (else ``config.model_dir``, else stage 1 of the task's default
    backbone). ``policy``: an exit policy to start from (else ``config.policy_dir``, else a new
    ``config.agent``; a learner that does not train jointly must have been trained: stage 2). A
    policy with ``trains_jointly`` trains with the model; any other is held fixed.
    ``memorized``: m(x) of every row of the training split (``train_split``, ``train_limit``); None:
    computed from the starting model (eval mode) and kept in the run folder. Model and a jointly
    trained policy are trained in place on a fresh run.
    """
    config = dataclasses.replace(config or Stage3Config(), **overrides)
    if policy is not None:
        config.agent = policy.name
    if model is None:
        model_dir = config.model_dir or default_stage1_dir(config.task, DEFAULT_BACKBONE) / "model"
        model = MultiExitModel.from_pretrained(model_dir)
    config = config.resolved(model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # joins torchrun's processes
    # one process: a second job on the same folder waits, then finds the finished run (under
    # torchrun / accelerate launch all processes share one run: no lock, as in build_cache)
    alone = accelerator.num_processes == 1
    with folder_lock(config.output_dir) if alone else contextlib.nullcontext():
        return _train_stage3(config, model, policy, memorized, accelerator)


def _train_stage3(
    config: Stage3Config, model: MultiExitModel, policy: Any, memorized: np.ndarray | None, accelerator
) -> Stage3Result:
    """:func:`train_stage3` on a resolved config, inside the run folder's lock."""
    task = get_task(config.task)
    run_dir = Path(config.output_dir)
    final_model, final_policy = run_dir / "model", run_dir / "policy"
    ckpt_dir = run_dir / "checkpoint"
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    _check_run_config(run_dir, config, "stage-3 run")

    if (final_model / "fingerprint").is_file() and (final_policy / "policy.json").is_file():
        return Stage3Result(
            MultiExitModel.from_pretrained(final_model),
            load_policy(final_policy),
            final_model,
            final_policy,
            _read_history(run_dir),
        )

    resuming = (ckpt_dir / "trainer_state.pt").is_file()
    state = _load_trainer_state(ckpt_dir) if resuming else None  # a torn file fails before any work
    torch.manual_seed(config.seed + rank)  # each process its own dropout masks
    tokenizer = model.tokenizer
    train = tokenize_examples(
        load_split(task, config.train_split, config.data_dir, config.train_limit),
        tokenizer,
        config.max_length,
    )
    target = Target.of_task(task)  # what the exit's loss and "right" are (ee_gym.targets)
    memorized = _memorized(run_dir, model, train, memorized, write=main, target=target)
    if resuming:
        model = MultiExitModel.from_pretrained(ckpt_dir)
        policy = load_policy(ckpt_dir / "policy")
    elif policy is None and config.policy_dir:
        policy = load_policy(config.policy_dir)
    elif policy is None:  # the run's rollout and seed go to a policy that takes them
        policy = make_policy_with(config.agent, {"rollout": config.rollout, "seed": config.seed})
    learned = policy.trains_jointly  # trains here with the model; any other is held fixed
    device = accelerator.device
    model.to(device).train()
    if learned:
        net = policy.joint_module(model)  # built for the model's sizes, or checked against them
        net.to(device).train()
        policy_optimizer = torch.optim.Adam(net.parameters(), lr=config.policy_learning_rate)
    else:
        net, policy_optimizer = None, None

    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay, config.learning_rate, None))
    total_steps = math.ceil(len(train) / (config.batch_size * world)) * config.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config.warmup_ratio * total_steps), total_steps
    )
    sampler = torch.Generator().manual_seed(config.seed + rank)
    start_epoch = 0
    if resuming:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if learned:
            policy_optimizer.load_state_dict(state["policy_optimizer"])
        if rank == 0:  # the other processes keep their own seeds
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])  # dropout on the GPU draws from these
            sampler.set_state(state["sampler_rng"])
        start_epoch = state["epoch"]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", dataclasses.asdict(config))

    reward_fn, num_layers = get_reward(config.reward), model.num_layers
    # separate replicas: K copies of each row, one trajectory each; else K trajectories per row
    copies = config.replicas if learned and config.separate_replicas else 1
    if learned:
        decide = policy.joint_decider(model, config.replicas // copies, sampler, config.rollout)
    else:
        decide = policy.joint_decider(model)
    group = config.replicas if learned else 1  # trajectories per input
    trained = list(model.parameters()) + (list(net.parameters()) if learned else [])
    history = _read_history(run_dir)[:start_epoch]
    scalars = ScalarLog(config.tensorboard if main else None, "stage3")
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        model.train()
        exits = []  # this process's exit layers of the epoch, for the histogram
        batches = shuffled_batches(len(train), config.batch_size, config.seed + epoch, rank, world)
        bar = tqdm(
            batches,
            desc=f"stage 3 [{task.name}, {config.agent}] epoch {epoch + 1}/{config.epochs}",
            disable=not (config.progress and main),
            unit="batch",
        )
        totals = np.zeros(7)  # loss, ce, loss2, reward, layer, correct, rows
        for rows in bar:
            batch = train.batch(rows, tokenizer, device)
            labels = batch.pop("labels")
            if copies > 1:
                batch, labels = replicate(batch, copies), labels.repeat_interleave(copies)
            out = joint_rollout(model, decide, batch, labels, target)
            m = np.repeat(memorized[np.asarray(rows)], group)
            exit_layer = out.exit_layer.cpu().numpy()
            exits.append(exit_layer)
            rewards = reward_fn(
                out.ce.detach().cpu().numpy(),
                out.correct.cpu().numpy(),
                exit_layer,
                m,
                num_layers,
                config.alpha,
            )
            rewards = torch.as_tensor(np.asarray(rewards), dtype=torch.float32, device=device)
            ce_loss = out.ce.mean()
            policy_loss = torch.zeros((), device=device)
            if learned:
                policy_loss = policy.joint_loss(out, rewards, group)
            loss = ce_loss + policy_loss
            optimizer.zero_grad(set_to_none=True)
            if learned:
                policy_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(trained, accelerator)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if learned:
                policy_optimizer.step()
            n = len(out.ce)
            totals += (
                loss.item() * n,
                ce_loss.item() * n,
                policy_loss.item() * n,
                float(rewards.sum()),
                float(exit_layer.sum()),
                float(out.correct.sum()),
                n,
            )
            bar.set_postfix(loss=f"{loss.item():.4f}", layer=f"{exit_layer.mean():.2f}")

        if world > 1:  # the epoch's figures over every process's rows
            summed = torch.as_tensor(totals, dtype=torch.float64, device=device)
            torch.distributed.all_reduce(summed)
            totals = summed.cpu().numpy()
        loss_sum, ce_sum, pl_sum, reward_sum, layer_sum, correct_sum, count = totals
        count = max(count, 1)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / count,
                "ce_loss": ce_sum / count,
                "policy_loss": pl_sum / count,
                "mean_reward": reward_sum / count,
                "mean_exit_layer": layer_sum / count,
                "train_accuracy": correct_sum / count,
                "seconds": round(time.perf_counter() - began, 2),
            }
        )
        scalars.scalars(history[-1], epoch + 1)
        scalars.exit_histogram(np.concatenate(exits) if exits else np.zeros(0), num_layers, epoch + 1)
        if learned and isinstance(getattr(policy, "history", None), list):
            policy.history.append({"stage": 3, **history[-1]})
        if main:  # history first: a checkpoint never claims an epoch that metrics.jsonl lacks
            _write_history(run_dir, history)
            _save_checkpoint(
                model, policy, ckpt_dir, optimizer, scheduler, policy_optimizer, sampler, epoch + 1
            )
        accelerator.wait_for_everyone()

    scalars.close()
    model.eval()
    if learned:
        net.eval().cpu()  # policies act on CPU tensors
    if main:
        card = CardFacts(stage="stage 3", settings=card_settings(config))
        model.save_pretrained(final_model, card=card)
        policy.save(final_policy, card=card)
    accelerator.wait_for_everyone()
    return Stage3Result(model, policy, final_model, final_policy, history)


# -- helpers ------------------------------------------------------------------------------------
def _memorized(
    run_dir: Path,
    model: MultiExitModel,
    train,
    given: np.ndarray | None,
    write: bool = True,
    target: Target | None = None,
) -> np.ndarray:
    """m(x) over the training split: the given array, else the run's saved one, else computed now."""
    path = run_dir / "memorized.npy"
    if given is None and path.is_file():
        given = np.load(path)
    if given is None:
        given = stage1_memorized(model, train, target=target)
    given = np.asarray(given, dtype=np.int64)
    if given.shape != (len(train),):
        raise ValueError(f"memorized has shape {given.shape}; the training split has {len(train)} rows")
    if given.min() < 1 or given.max() > model.num_layers:
        raise ValueError(f"memorized layers must lie in 1..{model.num_layers}")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic(path, given)
    return given


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary sibling and a rename (a killed write leaves no torn file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as stream:
        np.save(stream, array)
    tmp.replace(path)


def _save_checkpoint(
    model, policy, folder: Path, optimizer, scheduler, policy_optimizer, sampler, epochs_done: int
) -> None:
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "policy_optimizer": None if policy_optimizer is None else policy_optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "sampler_rng": sampler.get_state(),
        "epoch": epochs_done,
    }

    def extra(tmp: Path) -> None:  # lands together with the weights (one rename)
        policy.save(tmp / "policy")
        torch.save(state, tmp / "trainer_state.pt")

    model.save_pretrained(folder, extra=extra)
