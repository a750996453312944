"""Which inputs the exit policy learns from: a protocol, one (stage-1 split, policy split) pair.

An exit policy learns from the heads' outputs. On inputs the heads were fitted to, those outputs are
more confident and more often right than on new inputs, so a policy trained there learns to exit too
early. A protocol names the split stage 1 trains on and the split the policy learns from; every
entry point (``gym.make``, ``ee-gym train``, ``ee-gym predict``, ``python -m agents``,
``benchmarks.compare``) reads it from here, so one name means one stage-1 model per (task, backbone,
protocol), and every run folder and results file records it. Why ``paper`` is the default, with
the measurements: :data:`DEFAULT_PROTOCOL` and ``docs/protocols.md``.

This module imports nothing heavy: configs and env keywords are checked against it before torch loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fractions import Fraction

from ee_gym.validation import ConfigError, check_choice


@dataclass(frozen=True)
class Protocol:
    """One protocol: where stage 1 trains and where the exit policy learns."""

    name: str
    stage1_split: str  # the split stage 1 (and stage 3's model loss) trains on
    policy_split: str  # the split stage 2 trains the exit policy on, and gym.make's default split
    summary: str
    #: cross-fitting: the policy split's table comes from ``folds`` fold models, each trained on the
    #: rest of the split, so that every row is an input its model never saw (0: one model, no folds)
    folds: int = 0
    #: a labelled evaluation split carved from the end of train (``"train[90%:]"``), which neither
    #: stage 1 nor the policy ever sees (both splits above lie before it); None: policies are
    #: evaluated on dev only. Named ``<protocol>,eval=<p>%`` (:func:`get_protocol`).
    evaluation: str | None = None

    @property
    def cross_fit(self) -> bool:
        return self.folds > 0

    def carved(self, percent: Fraction) -> Protocol:
        """This protocol played on the first ``100 - percent`` % of train, the rest held out as its
        evaluation split: every split's percentages scaled into the kept part."""
        keep = 100 - percent
        return replace(
            self,
            name=f"{self.name},eval={_percent(percent)}%",
            stage1_split=_scaled(self.stage1_split, keep),
            policy_split=_scaled(self.policy_split, keep),
            evaluation=f"train[{_percent(keep)}%:]",
            summary=f"{self.summary}; the last {_percent(percent)} % of train is a labelled evaluation split "
            "that neither stage 1 nor the policy sees",
        )


def _percent(value: Fraction) -> str:
    """A percentage as the shortest exact decimal (``Fraction(81)`` -> ``"81"``, ``81/2`` -> ``"40.5"``)."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    if Fraction(text) != value:
        raise ConfigError(f"the percentage {float(value)} has more than 6 decimals")
    return text


def _scaled(split: str, keep: Fraction) -> str:
    """``split`` (train, or a percentage slice of it) moved into the first ``keep`` % of train."""
    from ee_gym.tasks import parse_split  # light: no torch

    base, start, end = parse_split(split)
    bounds = []
    for bound, default in ((start, Fraction(0)), (end, Fraction(100))):
        if bound is not None and not bound.endswith("%"):
            raise ConfigError(f"cannot carve an evaluation split from a protocol split in rows ({split!r})")
        bounds.append(default if bound is None else Fraction(bound[:-1]))
    low, high = (b * keep / 100 for b in bounds)
    return f"{base}[{'' if low == 0 else _percent(low) + '%'}:{_percent(high)}%]"


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "paper",
            "train",
            "train",
            "the policy learns on the training inputs the heads were fitted to (ConsistentEE)",
        ),
        Protocol(
            "cross-fit",
            "train",
            "train",
            "stage 1 fits all of train (the evaluated model); the policy learns on all of train, each "
            "input's per-layer table coming from one of 3 fold models that never saw it (each fits "
            "the other folds); 'cross-fit:<k>' takes k folds",
            folds=3,
        ),
        Protocol(
            "held-out",
            "train[:90%]",
            "train[90%:]",
            "stage 1 fits the first 90 % of train; the policy learns on the last 10 %, which the heads "
            "never saw, so their confidence there is what it will be on new inputs",
        ),
    )
}
#: The protocol every entry point uses when none is named: chosen from the comparisons under each
#: (benchmarks/results/protocols/<task>, docs/protocols.md). On RTE (all three) and MRPC (held-out,
#: paper) no protocol changes a paired verdict; on CoLA (all three) held-out and cross-fit leave every
#: learner but DQN exiting at layer 1 on the majority class (Matthews 0), while under paper every RL
#: learner exits input-adaptively at layers 3-6, REINFORCE moves from -5.5 to +0.2 AUC points against
#: the best rule and DQN beats it (+2.2, 95% +0.5 to +4.0). Paper also costs no extra stage 1 (cross-fit
#: 2-3 more runs) and drives a model fit on all of train. On SST-2 (all three, eval=10%) paper moves
#: REINFORCE, PPO and DQN from behind max-prob to ties with the best rule (REINFORCE -0.3 -> +0.1),
#: and cross-fit (on a 16,000-input subset) costs every learner 0.1-0.5 AUC points against paper.
DEFAULT_PROTOCOL = "paper"
#: (stage-1 split, policy split) by name: the plain-data view older code reads.
POLICY_PROTOCOLS: dict[str, tuple[str, str]] = {
    name: (p.stage1_split, p.policy_split) for name, p in PROTOCOLS.items()
}


#: the most folds ``cross-fit:<k>`` takes (each fold is one more stage-1 run)
MAX_FOLDS = 20
#: the largest evaluation split ``<protocol>,eval=<p>%`` carves from train
MAX_CARVE = 50
_CARVE = re.compile(r"^(?P<base>[^,]+),\s*eval\s*=\s*(?P<percent>\d+(?:\.\d+)?)\s*%$")


def get_protocol(name: str | None = None) -> Protocol:
    """The protocol ``name`` (None: :data:`DEFAULT_PROTOCOL`), or ConfigError listing the choices.

    ``"cross-fit:<k>"`` is ``cross-fit`` with k folds (2 to :data:`MAX_FOLDS`) instead of 3.
    ``"<protocol>,eval=<p>%"`` (e.g. ``"held-out,eval=10%"``) plays the protocol on the first
    100 - p % of train and keeps the last p % as a labelled evaluation split
    (:attr:`Protocol.evaluation`): for tasks whose dev set is too small to tell policies apart.
    """
    name = DEFAULT_PROTOCOL if name is None else name
    if isinstance(name, str) and "," in name:
        match = _CARVE.match(name.strip())
        if not match or not 0 < Fraction(match.group("percent")) <= MAX_CARVE:
            raise ConfigError(
                f"protocol {name!r}: an evaluation split is '<protocol>,eval=<p>%' with 0 < p <= {MAX_CARVE}, "
                "e.g. 'held-out,eval=10%'"
            )
        return get_protocol(match.group("base").strip()).carved(Fraction(match.group("percent")))
    if isinstance(name, str) and name.startswith("cross-fit:"):
        folds = name.split(":", 1)[1].strip()
        if not folds.isdigit() or not 2 <= int(folds) <= MAX_FOLDS:
            raise ConfigError(
                f"protocol {name!r}: cross-fit:<k> takes a whole number of folds k from 2 to {MAX_FOLDS}, "
                f"e.g. 'cross-fit:5'"
            )
        base = PROTOCOLS["cross-fit"]
        return replace(
            base,
            name=f"cross-fit:{int(folds)}",
            folds=int(folds),
            summary=base.summary.replace(f"one of {base.folds} fold", f"one of {int(folds)} fold"),
        )
    return PROTOCOLS[check_choice("protocol", name, PROTOCOLS)]


def check_protocol(name: str | None) -> str:
    """The canonical name of protocol ``name`` (None: the default), or ConfigError naming the choices."""
    try:
        return get_protocol(name).name
    except ConfigError as error:
        if isinstance(name, str) and (name.startswith("cross-fit") or "," in name):
            raise
        raise ConfigError(f"{error}; or 'cross-fit:<k>' for k folds, '<protocol>,eval=<p>%' for an "
                          "evaluation split carved from train") from None  # fmt: skip


def protocol_choices() -> str:
    """The protocols a command-line option takes, for its help text."""
    return ", ".join(PROTOCOLS) + ", cross-fit:<k>, and any of them with ',eval=<p>%'"


def protocol_of_split(stage1_split: str) -> str | None:
    """The protocol whose stage 1 trains on ``stage1_split`` (None when no protocol does)."""
    return next((p.name for p in PROTOCOLS.values() if p.stage1_split == stage1_split.strip()), None)


def env_split(split: str | None, protocol: str | None, model=None, table=None) -> str:
    """The split an env plays: ``split`` when given (or the given ``table``'s); else the protocol's
    policy split, because the env finds its own stage-1 model of that protocol (``model`` None) or
    was told the protocol; else, for a model you pass with no protocol named, ``"train"`` (which
    inputs trained it is not known)."""
    if split is not None:
        return split
    if table is not None:
        return table.split
    if model is None or protocol is not None:
        return get_protocol(protocol).policy_split
    return "train"


def check_policy_split(protocol: Protocol, task, split: str, data_dir) -> None:
    """ConfigError, before any stage 1, when ``split`` cannot be the learners' split under
    ``protocol`` without a silently wrong result: it shares inputs with the split policies are scored
    on (the carved evaluation split, or dev); under a protocol whose stage 1 never sees its policy
    split (``held-out``), it shares inputs with the stage-1 split; under ``cross-fit``, it is not one
    slice of the cross-fitted split (:func:`ee_gym.crossfit.rows_within`). Reads the split sizes only."""
    from functools import cache

    from ee_gym.tasks import split_parts, split_rows

    @cache  # each split's rows once: split_rows reads the whole split to count them
    def rows(name: str) -> list[tuple[str, int, int]]:
        found = []
        for part in split_parts(name):
            base, low, high, _ = split_rows(task, part, data_dir)
            found.append(("dev" if base == "validation" else base, low, high))
        return found

    def shared(a: str, b: str) -> int:
        return sum(
            max(0, min(h1, h2) - max(l1, l2)) for n1, l1, h1 in rows(a) for n2, l2, h2 in rows(b) if n1 == n2
        )

    judged = protocol.evaluation or "dev"
    if overlap := shared(split, judged):
        raise ConfigError(
            f"the policy split {split!r} shares {overlap} inputs with {judged!r}, where policies are scored "
            f"under {protocol.name!r}: take the policy split from the rows before it (the protocol's own is "
            f"{protocol.policy_split!r})"
        )
    if protocol.cross_fit:
        from ee_gym.crossfit import rows_within

        rows_within(task, split, protocol.policy_split, data_dir)
    elif not shared(protocol.policy_split, protocol.stage1_split) and (
        overlap := shared(split, protocol.stage1_split)
    ):
        raise ConfigError(
            f"under {protocol.name!r} stage 1 never sees the policy split, and {split!r} shares {overlap} inputs "
            f"with its stage-1 split {protocol.stage1_split!r}: take rows of {protocol.policy_split!r}, or "
            "use the 'paper' protocol to learn on inputs stage 1 trained on"
        )
