"""Which inputs the exit policy learns from: a protocol, one (stage-1 split, policy split) pair.

An exit policy learns from the heads' outputs. On inputs the heads were fitted to, those outputs are
more confident and more often right than on new inputs, so a policy trained there learns to exit too
early. A protocol names the split stage 1 trains on and the split the policy learns from; every
entry point (``gym.make``, ``ee-gym train``, ``ee-gym predict``, ``python -m agents``,
``benchmarks.compare``) reads it from here, so one name means one stage-1 model per (task, backbone,
protocol), and every run folder and results file records it. Why ``held-out`` is the default, with
the measurements: ``benchmarks/results/policy-split/README.md``.

This module imports nothing heavy: configs and env keywords are checked against it before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ee_gym.validation import check_choice


@dataclass(frozen=True)
class Protocol:
    """One protocol: where stage 1 trains and where the exit policy learns."""

    name: str
    stage1_split: str  # the split stage 1 (and stage 3's model loss) trains on
    policy_split: str  # the split stage 2 trains the exit policy on, and gym.make's default split
    summary: str


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
            "held-out",
            "train[:90%]",
            "train[90%:]",
            "stage 1 fits the first 90 % of train; the policy learns on the last 10 %, which the heads "
            "never saw, so their confidence there is what it will be on new inputs",
        ),
    )
}
#: The protocol every entry point uses when none is named (measured: benchmarks/results/policy-split).
DEFAULT_PROTOCOL = "held-out"
#: (stage-1 split, policy split) by name: the plain-data view older code reads.
POLICY_PROTOCOLS: dict[str, tuple[str, str]] = {
    name: (p.stage1_split, p.policy_split) for name, p in PROTOCOLS.items()
}


def get_protocol(name: str | None = None) -> Protocol:
    """The protocol ``name`` (None: :data:`DEFAULT_PROTOCOL`), or ConfigError listing the choices."""
    return PROTOCOLS[check_choice("protocol", DEFAULT_PROTOCOL if name is None else name, PROTOCOLS)]


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
