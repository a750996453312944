"""Train and evaluate exit policies on one task: ``python -m agents --task rte``.

Learners train on the policy split of ``--protocol`` (default: ``paper``, stage 1 and policies both
on ``train``; ``held-out``: stage 1 on ``train[:90%]``, policies on ``train[90%:]``; see
:mod:`ee_gym.protocols`) and every policy is scored on the dev table of the same
model, each at its default settings; ``--alphas`` adds runs of ``reinforce`` at other layer prices.
Prints a Markdown table (and writes JSON with ``--json``). The full model (static exit at L) and the
two oracles are rows of the table too, for reference.
"""

from __future__ import annotations

import argparse
import json
import time

import agents
from agents.evaluate import evaluate
from ee_gym.cli import protocol_type
from ee_gym.envs import ConsistentEEVectorEnv
from ee_gym.envs.prepare import load_model, load_table, policy_table, policy_tables
from ee_gym.protocols import DEFAULT_PROTOCOL
from ee_gym.rewards import default_alpha
from ee_gym.tasks import get_task

DEFAULT_AGENTS = (
    "reinforce,ppo,a2c,dqn,static,entropy,normentropy,maxprob,top2gap,patience,pcee,oracle,oracle-consistent"
)


def train_policy(
    name: str, train_table, alpha: float, reward: str, seed: int, budget: dict | None = None, **params
):
    """A policy made by name (constructor ``params``) and, for learners, trained on the training
    table within ``budget`` (TrainingBudget fields, e.g. epochs); (policy, seconds)."""
    policy = agents.make(name, **params)
    began = time.perf_counter()
    if policy.learns:
        env = ConsistentEEVectorEnv(
            num_envs=256, table=train_table, obs_mode=policy.obs_mode, reward=reward, alpha=alpha
        )
        policy.learn(env, seed=seed, progress=False, **(budget or {}))
    return policy, time.perf_counter() - began


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="rte")
    parser.add_argument(
        "--model", default=None, help="a multi-exit checkpoint (default: stage 1 of --backbone)"
    )
    parser.add_argument("--protocol", default=DEFAULT_PROTOCOL, type=protocol_type)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--agents", default=DEFAULT_AGENTS, help="comma-separated registry names")
    parser.add_argument("--reward", default="hardness")
    parser.add_argument("--alphas", default="", help="extra reinforce runs, e.g. 0.035,0.14")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    task = get_task(args.task).name
    if args.model:  # a given model: its policy-split and dev tables
        model = load_model(task, model=args.model, data_dir=args.data_dir)
        train = policy_table(model, task, args.protocol, backbone=args.backbone, data_dir=args.data_dir)
        dev = load_table(model, task, "dev", data_dir=args.data_dir)
    else:
        train, dev = policy_tables(task, args.protocol, backbone=args.backbone, data_dir=args.data_dir)
    alpha = default_alpha(task, train.num_layers)
    runs = [(name, alpha, {}) for name in args.agents.split(",") if name]
    runs += [("reinforce", float(a), {}) for a in args.alphas.split(",") if a]
    runs.append(("static", alpha, {"layer": train.num_layers}))  # the full model

    rows = []
    for name, run_alpha, params in runs:
        policy, seconds = train_policy(name, train, run_alpha, args.reward, args.seed, **params)
        result = evaluate(policy, dev)
        label = "full model (static L)" if params.get("layer") == train.num_layers else name
        record = {
            **result.to_dict(),
            "label": label,
            "alpha": run_alpha if policy.learns else None,
            "params": policy.get_params(),
            "train_seconds": round(seconds, 2),
        }
        rows.append(record)
        print(_row(record), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            header = {"task": task, "protocol": args.protocol, "policy_split": train.split}
            json.dump({**header, "reward": args.reward, "runs": rows}, handle, indent=2)
    return 0


_HEADER_PRINTED = False


def _row(record: dict) -> str:
    global _HEADER_PRINTED
    lines = []
    if not _HEADER_PRINTED:
        lines.append(
            f"| policy | alpha | {record['metric']} | mean exit layer | saved layers | speed-up | train s |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        _HEADER_PRINTED = True
    alpha = "" if record["alpha"] is None else f"{record['alpha']:.3f}"
    mark = "" if record["deployable"] else " (reference)"
    lines.append(
        f"| {record['label']}{mark} | {alpha} | {100 * record['metrics'][record['metric']]:.1f} | "
        f"{record['mean_exit_layer']:.2f} | {100 * record['saved_layers']:.1f}% | {record['speedup']:.2f}x | "
        f"{record['train_seconds']:.1f} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
