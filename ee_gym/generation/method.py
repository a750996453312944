"""Token-level early exit as a library: make exit heads, train exit policies, score them by decoding.

The method ``python -m benchmarks.generation`` runs, as entry points a user (or another benchmark)
can call one at a time or all at once:

    make_decoder / train_heads_for / describe_heads
                           stage 1 for decoders: a decoder with adapter heads, trained on rows of
                           XSum (HeadSetup: regression, gradient or both), or the record of loaded ones
    policy_table           the token table of held-out rows, where policies train and thresholds are placed
    calm_rules             CALM's confidence and similarity rules, thresholds placed on that table
    train_token_policy     ConsistentEE's policy (REINFORCE by default) trained on ConsistentEE-XSum-v0
                           over a token table (PolicySetup: reward, epochs, min layer, exit prior...)
    evaluate_policies      every policy decodes the same articles: ROUGE, exit layers, tokens/s, and
                           the speed-up each showed on the policy table
    compare_exit_policies  all of it in the benchmark's order (ComparisonConfig), timed by phase

Why a library and not a script: the choices that make a ConsistentEE row meet the target (the exit
prior 1/L, the min layer, thresholds placed on held-out rows only) are part of the method, and a
second caller should get them by calling, not by copying ``main``. The core never imports ``agents``
at import time: the default learner is made by name in :func:`_learner_api`, the one place that
reaches for it.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ee_gym.generation.confidence import ConfidenceProbe, ProbeTraining, fit_probe, reads_probe, with_probe
from ee_gym.generation.data import Article, format_prompt, load_xsum
from ee_gym.generation.decoder import ExitFn, MultiExitDecoder
from ee_gym.generation.evaluate import evaluate_generation
from ee_gym.generation.policies import (
    CandidateConfidenceExit,
    ConfidenceExit,
    GenerationExit,
    OracleExit,
    PolicyExit,
    ProbeExit,
    StateSimilarityExit,
    StaticExit,
    set_exit_prior,
    threshold_for_speedup,
)
from ee_gym.generation.prepare import (
    FINETUNE_CONFIG,
    HEAD_METHODS,
    collect_split,
    default_heads_dir,
    table_path,
    train_heads,
)
from ee_gym.generation.table import TokenTable
from ee_gym.generation.timing import TimingSettings, time_speculative
from ee_gym.generation.training import HeadTrainingConfig
from ee_gym.policy import TrainingBudget

#: the name of the oracle's row in every comparison
ORACLE = "oracle (reference, not deployable)"
#: the folder under $EE_GYM_HOME/generation/heads/<decoder>- where each method's heads are saved
HEAD_FOLDERS = {"regression": "xsum-benchmark", "gradient": "xsum-benchmark-gradient",
                "regression+gradient": "xsum-benchmark-finetuned"}  # fmt: skip
#: the observation mode of each kind of ConsistentEE row: the paper's state, and state + exit l's top-2 gap
POLICY_KINDS = {"consistentee": "state+layer", "consistentee+confidence": "state+confidence",
                "consistentee+probe": "state+probe"}  # fmt: skip

Log = Callable[[str], None]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HeadSetup:
    """How the exit heads of layers 1..L-1 are made (stage 1 for decoders).

    ``method``: ``regression`` (closed form on teacher-forced text), ``gradient`` (the depth-weighted
    cross-entropy on self-distilled tokens, from zero adapters) or ``regression+gradient`` (the first,
    fine-tuned by the second: the benchmark's default, ``benchmarks/results/xsum-finetuned-heads``).
    ``epochs`` and ``learning_rate`` left None take the gradient phase's defaults, which differ from
    zero (3 epochs at 3e-3) and after the regression (:data:`~ee_gym.generation.prepare.FINETUNE_CONFIG`:
    4 at 1e-4).
    """

    method: str = "regression+gradient"
    rows: str = "100:200"  # the articles the heads learn from (a split name or 'start:stop')
    adapter_rank: int | None = None  # None: full d x d adapters (the regression needs them)
    epochs: int | None = None
    learning_rate: float | None = None
    batch_size: int = 32
    layers_per_step: int | None = 8  # heads trained per step (None: all)
    targets: str = "greedy"  # or "distribution"

    def __post_init__(self) -> None:
        if self.method not in HEAD_METHODS:
            raise ValueError(f"unknown head method {self.method!r}; choose one of {', '.join(HEAD_METHODS)}")

    def training(self, seed: int = 0) -> HeadTrainingConfig:
        """The gradient phase's settings (unused by ``regression``)."""
        start = FINETUNE_CONFIG if self.method == "regression+gradient" else HeadTrainingConfig()
        return HeadTrainingConfig(
            epochs=self.epochs or start.epochs,
            batch_size=self.batch_size,
            layers_per_step=self.layers_per_step,
            learning_rate=self.learning_rate or start.learning_rate,
            targets=self.targets,
            seed=seed,
        )


@dataclass(frozen=True)
class PolicySetup:
    """How a ConsistentEE exit policy is trained on the token env (reward -CE - alpha t per token).

    ``every`` > 1 lets the policy decide at every ``every``-th layer from ``min_layer`` only, in
    training and decoding alike: fewer decisions per token, so less decision time next to the layers.
    ``exit_prior`` (None: 1/L) is where every layer's exit probability starts (see
    :func:`~ee_gym.generation.policies.set_exit_prior`: from 0.5 a 30-layer model is never explored
    past its first layers). ``min_layer`` forbids exits below it in training and acting alike: the
    propagated keys and values of shallow exits derail later tokens.
    """

    min_layer: int = 11
    every: int = 1  # decide at min_layer, min_layer + every, ... only (1: each layer from min_layer)
    reward: str = "plain"
    epochs: int = 40
    learning_rate: float = 1e-3
    exit_prior: float | None = None
    num_envs: int = 64  # token episodes stepped together

    def __post_init__(self) -> None:
        if self.min_layer < 1 or self.every < 1:
            raise ValueError(
                f"a policy's min_layer and every are 1 or more (1: no guard, each layer), got "
                f"{self.min_layer} and {self.every}"
            )


@dataclass(frozen=True)
class ComparisonConfig:
    """Every setting of one comparison (what ``python -m benchmarks.generation`` parses into)."""

    decoder: str = "smollm2"  # an embedded name, a hub name or a model folder
    data_dir: str | None = None  # holds xsum/xsum_0shot.jsonl (default: $EE_GYM_DATA)
    eval_rows: str = "eval"  # scored articles: a split name or rows 'start:stop'
    articles: int = 100  # the first N of eval_rows are scored
    policy_rows: str = "200:400"  # the policy table's articles (and where thresholds are placed)
    max_new_tokens: int = 32
    batch_size: int = 16  # articles decoded together (scores only)
    heads: str | None = None  # a folder of trained heads: no head training
    save_heads: str | None = None  # where trained heads go (default under $EE_GYM_HOME)
    head: HeadSetup = field(default_factory=HeadSetup)
    static_layers: tuple[int, ...] = (20, 24)
    speedups: tuple[float, ...] = (1.3, 1.6)  # layer speed-ups at which CALM thresholds are placed
    calm_min_layers: tuple[int, ...] = (11,)
    calm_every: tuple[int, ...] = (1,)  # CALM rules reading their signal at every k-th layer, for each k
    alphas: tuple[float, ...] = (0.12, 0.18)  # ConsistentEE policies reading the state
    confidence_alphas: tuple[float, ...] = (0.14, 0.18, 0.22)  # ... reading the state and confidence
    probe_alphas: tuple[float, ...] = (0.14, 0.18, 0.22)  # ... reading the state and a learned probe's
    # every ConsistentEE row at each probing interval (PolicySetup.every)
    policy_every: tuple[int, ...] = (1,)
    policy_seeds: tuple[int, ...] = ()  # every ConsistentEE row trained with each seed (empty: (seed,))
    probe_rules: bool = True  # the probe as a rule too, at each of speedups x calm_min_layers
    candidate_rules: bool = True  # CALM's confidence over k candidates, at each of speedups x calm_min_layers
    probe_training: ProbeTraining = field(default_factory=ProbeTraining)  # fitted on the policy table
    policy: PolicySetup = field(default_factory=PolicySetup)
    oracle: bool = True  # the oracle reference (about 5x the cost of full depth)
    timing: TimingSettings | None = field(default_factory=TimingSettings)  # None: no wall clock
    # the lossless verify mode, timed with each deployable row whose name starts with one of
    # verify_drafters as the drafter, at each k of verify_draft_tokens (none: not run)
    verify_draft_tokens: tuple[int, ...] = (4,)
    verify_drafters: tuple[str, ...] = ("static", "probe", "consistentee")
    seed: int = 0

    def __post_init__(self) -> None:  # before any model is loaded
        if not self.policy_every or min(self.policy_every) < 1:
            raise ValueError(f"policy_every: probing intervals of 1 or more, got {self.policy_every}")
        if min((*self.policy_seeds, self.seed)) < 0 or len(set(self.policy_seeds)) != len(self.policy_seeds):
            raise ValueError(f"seeds are distinct and 0 or more, got {self.policy_seeds or self.seed}")


# --------------------------------------------------------------------------- heads


@dataclass
class HeadsReport:
    """How a decoder's heads were made: the training record and the settings a results file shows."""

    history: list[dict]
    settings: dict[str, Any]
    folder: Path | None = None  # where they were saved (None: loaded, not saved)


def make_decoder(
    name: str, heads: str | os.PathLike | None = None, setup: HeadSetup | None = None, device: str = "cpu"
) -> MultiExitDecoder:
    """``name`` with the heads of folder ``heads``, else with fresh adapter heads of ``setup``'s rank."""
    if heads is not None:
        return MultiExitDecoder.from_pretrained(name, heads=heads, device=device)
    rank = (setup or HeadSetup()).adapter_rank
    return MultiExitDecoder.from_pretrained(name, head_kind="adapter", adapter_rank=rank, device=device)


def train_heads_for(
    decoder: MultiExitDecoder,
    setup: HeadSetup,
    *,
    data_dir: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    save_to: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Log = print,
) -> HeadsReport:
    """Train ``decoder``'s heads on ``setup.rows`` (in place) and save them to ``save_to`` (default:
    the method's folder under :func:`~ee_gym.generation.prepare.default_heads_dir`)."""
    config = setup.training(seed)
    history = train_heads(
        decoder, "xsum", split=setup.rows, method=setup.method, data_dir=data_dir, max_prompts=None,
        max_new_tokens=max_new_tokens, config=config, progress=progress,
    )  # fmt: skip
    settings = {
        "head_method": setup.method,
        "head_rows": setup.rows,
        "head_tokens": decoder.heads_metadata.get("tokens"),  # self-distilled (gradient phase)
        "head_positions": None if setup.method == "gradient" else history[0]["positions"],
        "adapter_rank": setup.adapter_rank or "full",
        "head_training": None if setup.method == "regression" else asdict(config),
    }
    name = decoder.name or "decoder"
    folder = Path(save_to) if save_to else default_heads_dir(name, HEAD_FOLDERS[setup.method])
    decoder.save_heads(folder, metadata={**decoder.heads_metadata, "rows": setup.rows})
    log(f"heads saved to {folder}")
    return HeadsReport(history, settings, folder)


def describe_heads(decoder: MultiExitDecoder, folder: str | os.PathLike) -> HeadsReport:
    """What a loaded heads folder recorded of how its heads were made (older folders record less)."""
    meta = decoder.heads_metadata
    settings = {
        "heads": f"loaded from {folder}",
        "head_method": meta.get("method", meta.get("training", {}).get("method", "(not recorded)")),
        "head_rows": meta.get("rows", meta.get("split", "(not recorded)")),
        "head_tokens": meta.get("tokens"),
        "adapter_rank": decoder.adapter_rank or "full",
        "head_training": meta.get("training"),
    }
    return HeadsReport(meta.get("history", []), settings)


# --------------------------------------------------------------------------- policies


def policy_table(
    decoder: MultiExitDecoder,
    rows: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> TokenTable:
    """The token table of ``rows`` (held out from the heads): the per-layer exits of every token the
    full model generates there, what policies train on and thresholds are placed on. Kept under
    ``$EE_GYM_HOME/generation/tables`` by the decoder's fingerprint (weights and heads), so a second
    comparison with the same heads reads it instead of decoding 200 articles again."""
    path = table_path(decoder.fingerprint(), "xsum", f"policy-{rows}", None, max_new_tokens)
    if path.is_file():
        return TokenTable.load(path)
    tokens = collect_split(
        decoder, "xsum", rows, data_dir=data_dir, max_new_tokens=max_new_tokens, progress=progress
    )
    table = TokenTable.build(decoder, tokens, split="train", progress=progress)  # "train": drawn at random
    table.save(path)
    return table


def table_speedup(rule: GenerationExit, table: TokenTable) -> float:
    """L / the mean exit layer of a rule on a table's tokens."""
    return table.num_layers / rule.table_exit_layers(table).mean()


def _threshold_rules(
    kind: str, values, make: Callable[..., GenerationExit], speedups: Sequence[float],
    min_layers: Sequence[int], every: Sequence[int],
) -> dict[str, GenerationExit]:  # fmt: skip
    """One rule per (min layer, probing interval, speed-up), each threshold the most cautious that
    reaches the speed-up on the table's ``values`` [N, L] (never on the scored articles)."""
    rules: dict[str, GenerationExit] = {}
    for min_layer in min_layers:
        for step in every:
            for target in speedups:
                threshold = threshold_for_speedup(values, target, min_layer=min_layer, every=step)
                rule = make(threshold, min_layer=min_layer, every=step)
                extra = (f", min layer {min_layer}" if min_layer > 1 else "") + (
                    f", every {step}" if step > 1 else ""
                )
                rules[f"{kind} (lambda={rule.threshold:.4g}{extra})"] = rule
    return rules


def calm_rules(
    table: TokenTable,
    speedups: Sequence[float],
    min_layers: Sequence[int] = (1,),
    every: Sequence[int] = (1,),
) -> dict[str, GenerationExit]:
    """CALM's confidence and similarity rules, one per (min layer, probing interval ``every``,
    speed-up), each threshold the most cautious that reaches the speed-up on ``table``."""
    return {
        **_threshold_rules("calm-confidence", table.top2_gap, ConfidenceExit, speedups, min_layers, every),
        **_threshold_rules(
            "calm-similarity", table.similarity, StateSimilarityExit, speedups, min_layers, every
        ),
    }


def probe_rules(
    probe: ConfidenceProbe,
    decoder: MultiExitDecoder,
    table: TokenTable,
    speedups: Sequence[float],
    min_layers: Sequence[int] = (1,),
) -> dict[str, GenerationExit]:
    """The learned probe as a rule (CALM's cheap measure), one per (min layer, speed-up), each
    threshold the most cautious that reaches the speed-up on ``table``."""

    def make(threshold: float, min_layer: int, every: int) -> ProbeExit:
        return ProbeExit(probe, decoder, threshold, min_layer, every)

    return _threshold_rules("probe", probe.table_scores(table), make, speedups, min_layers, (1,))


def candidate_rules(
    decoder: MultiExitDecoder, table: TokenTable, speedups: Sequence[float], min_layers: Sequence[int] = (1,)
) -> dict[str, GenerationExit]:
    """CALM's confidence over k candidate tokens (:class:`CandidateConfidenceExit`, defaults k and
    rank), one per (min layer, speed-up), thresholds placed on ``table``."""
    rules: dict[str, GenerationExit] = {}
    for min_layer in min_layers if speedups else ():  # (the SVD and the table's signal cost seconds)
        base = CandidateConfidenceExit(decoder, min_layer=min_layer)
        values = base.table_signal(table)

        def make(threshold: float, min_layer: int, every: int, base=base) -> CandidateConfidenceExit:
            rule = copy.copy(base)  # shares the SVD factors
            rule.threshold = float(threshold)
            return rule

        rules.update(_threshold_rules("candidate-confidence", values, make, speedups, (min_layer,), (1,)))
    return rules


def _learner_api() -> tuple[Callable[..., Any], Callable[[Any, TokenTable], Any]]:
    """(make a policy by name, score a policy on a table), through the core's policy registry (which
    ``agents`` fills on first use), imported at call time so that importing this module stays light."""
    from ee_gym.evaluation import evaluate
    from ee_gym.policy import make_policy

    return make_policy, evaluate


@dataclass
class TrainedPolicy:
    """A policy trained on a token table, ready to decode with (``exit``) and what it did there."""

    name: str
    policy: Any  # the learner (any exit policy with bind/learn/act)
    exit: PolicyExit  # for MultiExitDecoder.generate(exit_fn=...)
    table: dict[str, Any]  # its evaluation on the training table (mean exit layer, speed-up...)
    history: list[dict]

    @property
    def table_speedup(self) -> float:
        return self.table["speedup"]


def policy_name(kind: str, alpha: float, min_layer: int, every: int = 1, seed: int | None = None) -> str:
    """A ConsistentEE row's name, e.g. ``consistentee+confidence (alpha=0.18, min layer 11)`` or
    ``consistentee (alpha=0.18, min layer 11, every 2, seed 1)``; the seed is named when a comparison
    trains several (:func:`setting_name` strips it)."""
    guard = f", min layer {min_layer}" if min_layer > 1 else ""
    interval = f", every {every}" if every > 1 else ""
    seeded = "" if seed is None else f", seed {seed}"
    return f"{kind} (alpha={alpha:g}{guard}{interval}{seeded})"


def setting_name(name: str) -> str:
    """A row's name without its seed: the rows of one setting trained with different seeds share it."""
    return re.sub(r", seed \d+\)$", ")", name)


def train_token_policy(
    decoder: MultiExitDecoder,
    table: TokenTable,
    alpha: float,
    obs_mode: str = "state+layer",
    setup: PolicySetup | None = None,
    *,
    name: str | None = None,
    policy: Any = None,
    seed: int = 0,
    progress: bool = True,
    probe: ConfidenceProbe | None = None,
) -> TrainedPolicy:
    """Train an exit policy on ``ConsistentEE-XSum-v0`` over ``table`` at reward weight ``alpha``.

    ``policy`` (default: ``reinforce`` with ``obs_mode``, ``setup.min_layer`` and ``seed``) is bound
    to the env, started at exit probability ``setup.exit_prior`` (1/L) at every layer when it has
    per-layer networks, and trained for ``setup.epochs``; then scored on the same table. ``probe``:
    the confidence probe of the ``state+probe`` mode (fitted on ``table`` when None).
    """
    from ee_gym.envs import ConsistentEEVectorEnv  # the env package imports this one: at call time

    setup = setup or PolicySetup()
    make, evaluate = _learner_api()
    if reads_probe(obs_mode):
        table, probe = with_probe(table, probe)  # the table's view whose observations read the probe
    else:
        probe = None  # the other modes read none
    env = ConsistentEEVectorEnv(
        setup.num_envs, table=table, split="train", reward=setup.reward, alpha=alpha, obs_mode=obs_mode,
        final_obs=False,
    )  # fmt: skip
    if policy is None:
        policy = make("reinforce", seed=seed, obs_mode=obs_mode, min_layer=setup.min_layer, every=setup.every)
    policy.bind(env)
    if hasattr(getattr(policy, "net", None), "layers"):  # per-layer exit networks: give them the prior
        set_exit_prior(policy, setup.exit_prior or 1.0 / decoder.num_layers)
    policy.learn(
        env, TrainingBudget(epochs=setup.epochs, learning_rate=setup.learning_rate, progress=progress)
    )
    name = name or policy_name("consistentee", alpha, setup.min_layer)
    exit_rule = PolicyExit(policy, decoder, label=name, probe=probe)
    return TrainedPolicy(
        name=name,
        policy=policy,
        exit=exit_rule,
        table=evaluate(policy, table).to_dict(),
        history=list(getattr(policy, "history", [])),
    )


# --------------------------------------------------------------------------- evaluation


def evaluate_policies(
    decoder: MultiExitDecoder,
    articles: Sequence[Article],
    policies: Mapping[str, ExitFn | None],
    table_speedups: Mapping[str, float] | None = None,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    timing: TimingSettings | None = None,
    progress: bool = True,
    timed: dict | None = None,
    scored: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Decode ``articles`` with every policy (name -> exit rule, None = full depth) and score it: one
    record per policy (``GenerationRun.to_dict`` with the summaries, and ``table_speedup``: its
    layer speed-up on the policy table, None where it has none); timed as ``timing`` says (``timed``
    receives the timing record; ``scored`` the records before the timing starts)."""

    def records(runs) -> list[dict]:
        out = []
        for run in runs:
            record = run.to_dict(with_summaries=True)
            record["table_speedup"] = (table_speedups or {}).get(run.name)
            out.append(record)
        return out

    runs = evaluate_generation(
        decoder, articles, policies, max_new_tokens=max_new_tokens, batch_size=batch_size,
        timing=timing, progress=progress, timed=timed,
        scored=None if scored is None else (lambda untimed: scored(records(untimed))),
    )  # fmt: skip
    return records(runs)


@dataclass
class Comparison:
    """What :func:`compare_exit_policies` found: the pieces of a results file."""

    settings: dict[str, Any]
    seconds: dict[str, float]
    table_summary: dict[str, list[float]]
    head_history: list[dict]
    policy_history: dict[str, dict]
    runs: list[dict]  # full depth first
    speculative: list[dict] = field(default_factory=list)  # the verify mode's rows (time_speculative)


def compare_exit_policies(
    config: ComparisonConfig,
    *,
    progress: bool = True,
    log: Log = print,
    scored: Callable[[list[dict]], None] | None = None,
) -> Comparison:
    """The whole comparison in order: heads, the policy table, thresholds, policies, evaluation.
    ``scored`` gets every policy's scores (ROUGE, exit layers) before the timing starts.

    Full depth, the oracle (unless ``config.oracle`` is False; from the policies' min layer), static
    exits, the CALM rules and the ConsistentEE policies (``state+layer`` at each of ``alphas``,
    ``state+confidence`` at each of ``confidence_alphas``) all decode the first ``articles`` of
    ``eval_rows``. Each phase's wall time goes to ``seconds``.
    """
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now
        log(f"[{name}] {seconds[name]:.0f} s")

    torch.manual_seed(config.seed)
    decoder = make_decoder(config.decoder, config.heads, config.head)
    lap("load")
    if config.heads:
        heads = describe_heads(decoder, config.heads)
    else:
        heads = train_heads_for(
            decoder, config.head, data_dir=config.data_dir, max_new_tokens=config.max_new_tokens,
            save_to=config.save_heads, seed=config.seed, progress=progress, log=log,
        )  # fmt: skip
        lap("heads: training")

    table = policy_table(
        decoder, config.policy_rows, data_dir=config.data_dir, max_new_tokens=config.max_new_tokens,
        progress=progress,
    )  # fmt: skip
    summary = table.layer_summary()
    log("held-out CE per layer: " + " ".join(f"{x:.2f}" for x in summary["cross_entropy"]))
    lap("policy table")

    rules: dict[str, GenerationExit] = {}
    if config.oracle:
        rules[ORACLE] = OracleExit(min_layer=config.policy.min_layer)
    rules.update({f"static (layer {layer})": StaticExit(layer) for layer in config.static_layers})
    rules.update(calm_rules(table, config.speedups, config.calm_min_layers, config.calm_every))
    probe = None
    if config.probe_rules or config.probe_alphas:
        probe, probe_history = fit_probe(table, config.probe_training)
        log(f"confidence probe: loss {probe_history[0]['loss']:.3f} -> {probe_history[-1]['loss']:.3f}")
    if config.probe_rules:
        rules.update(probe_rules(probe, decoder, table, config.speedups, config.calm_min_layers))
    if config.candidate_rules:
        rules.update(candidate_rules(decoder, table, config.speedups, config.calm_min_layers))
    policies: dict[str, ExitFn | None] = {"full depth": None, **rules}
    speedups = {name: table_speedup(rule, table) for name, rule in rules.items()}
    policy_history = {}
    alphas_of = (config.alphas, config.confidence_alphas, config.probe_alphas)
    seeds = config.policy_seeds or (config.seed,)
    for kind, alphas in zip(POLICY_KINDS, alphas_of, strict=True):
        for alpha, every, seed in itertools.product(alphas, config.policy_every, seeds):
            setup = replace(config.policy, every=every)
            name = policy_name(kind, alpha, setup.min_layer, every, seed if len(seeds) > 1 else None)
            trained = train_token_policy(
                decoder, table, alpha, POLICY_KINDS[kind], setup, seed=seed, name=name, progress=progress,
                probe=probe,
            )  # fmt: skip
            policies[trained.name] = trained.exit
            speedups[trained.name] = trained.table_speedup
            policy_history[trained.name] = {"history": trained.history, "table": trained.table}
            log(
                f"{trained.name}: table mean exit {trained.table['mean_exit_layer']:.2f} "
                f"({trained.table_speedup:.2f}x)"
            )
    lap("policies")

    articles = load_xsum(config.eval_rows, config.data_dir, config.articles)
    timed: dict = {}
    runs = evaluate_policies(
        decoder, articles, policies, speedups, max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size, timing=config.timing, progress=progress, timed=timed, scored=scored,
    )  # fmt: skip
    lap("evaluation")
    speculative = []
    if config.timing is not None and config.verify_draft_tokens:
        drafters = {name: fn for name, fn in policies.items() if fn is not None and name.startswith(config.verify_drafters)
                    and getattr(fn, "deployable", True)}  # fmt: skip
        prompts = [format_prompt(decoder.tokenizer, a.article) for a in articles]
        speculative = time_speculative(decoder, prompts, drafters, config.verify_draft_tokens, config.timing,
                                       config.max_new_tokens, progress)  # fmt: skip
        lap("verify mode")
    seconds["total"] = time.perf_counter() - started

    settings = {
        "decoder": config.decoder,
        "articles": len(articles),
        "eval_rows": config.eval_rows,
        **heads.settings,
        "calm_speedups": list(config.speedups),
        "calm_min_layers": list(config.calm_min_layers),
        "calm_every": list(config.calm_every),
        "policy_rows": config.policy_rows,
        "policy_tokens": table.num_inputs,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "reward": config.policy.reward,
        "policy_min_layer": config.policy.min_layer,
        "policy_every": list(config.policy_every),
        "policy_seeds": list(seeds),
        "policy_epochs": config.policy.epochs,
        "policy_lr": config.policy.learning_rate,
        "exit_prior": config.policy.exit_prior or f"1/{decoder.num_layers}",
        "timing": None if config.timing is None else asdict(config.timing),
        "verify_draft_tokens": list(config.verify_draft_tokens),
        "prompt_seconds": timed.get("prompt_seconds"),  # per thread count x batch size, one round
        "threads": torch.get_num_threads(),  # everything but the timing (the script sets it by --threads)
        "seed": config.seed,
    }
    return Comparison(settings, seconds, summary, heads.history, policy_history, runs, speculative)
