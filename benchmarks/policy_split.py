"""Which split should the exit policy learn on? The paper's training split, or a held-out slice of it.

    python -m benchmarks.policy_split                     # RTE, seeds 0-2, 5 epochs of REINFORCE
    python -m benchmarks.policy_split --task mrpc --seeds 5 --epochs 3 --json out.json

The heads of stage 1 have seen the training inputs and are over-confident on them, so a policy that
learns there may exit too early on new inputs. Three protocols, each a (stage-1 split, policy split):

    paper      stage 1 on train,        policy on train        (ConsistentEE)
    held-out   stage 1 on train[:90%],  policy on train[90%:]  (inputs the heads never saw)
    seen-90    stage 1 on train[:90%],  policy on train[:90%]  (same model as held-out, seen inputs:
                                                                 separates the smaller stage-1 set)

Every policy is ``agents.make("reinforce", seed=s)`` with its default settings, learning for
``--epochs`` epochs, then scored by ``agents.evaluate.evaluate`` on the dev table of its own stage-1
model and on the table it learnt from. Stage-1 models are trained on first use (``ee_gym.training``,
task defaults), caches built on first use; both are reused afterwards. Prints Markdown tables:
the protocols (mean +- std over seeds; "dev reward" is the env's reward, what REINFORCE maximises),
the paired dev-accuracy differences, and the static per-layer accuracy, mean confidence,
cross-entropy and reward of every table (confidence above accuracy = over-confident). The measured
run and its reading: ``benchmarks/results/policy-split/README.md``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import agents
from agents.evaluate import evaluate
from ee_gym.envs import ConsistentEEVectorEnv, ExitTable
from ee_gym.envs.prepare import load_model, load_table
from ee_gym.protocols import POLICY_PROTOCOLS

#: name: (stage-1 split, policy split); "paper" and "held-out" as offered by policy_tables
PROTOCOLS = {**POLICY_PROTOCOLS, "seen-90": ("train[:90%]", "train[:90%]")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.policy_split", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="rte")
    p.add_argument("--seeds", type=int, default=3, help="policy seeds 0..N-1 per protocol")
    p.add_argument("--epochs", type=int, default=5, help="REINFORCE epochs")
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--num-envs", type=int, default=256, help="sub-envs of the env the policy learns on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="PATH", help="also write every run's numbers here")
    return p.parse_args(argv)


def run_protocol(task: str, name: str, seeds: int, epochs: int, num_envs: int) -> dict:
    """Train and score one REINFORCE policy per seed under one protocol."""
    stage1_split, policy_split = PROTOCOLS[name]
    model = load_model(task, train_split=stage1_split)
    train_table = load_table(model, task, policy_split)
    dev_table = load_table(model, task, "dev")
    runs = []
    for seed in range(seeds):
        began = time.perf_counter()
        policy = agents.make("reinforce", seed=seed)
        env = ConsistentEEVectorEnv(num_envs=num_envs, table=train_table, obs_mode="state+layer")
        policy.learn(env, epochs=epochs, progress=False)
        dev, seen = evaluate(policy, dev_table), evaluate(policy, train_table)
        runs.append(
            {
                "seed": seed,
                "dev_reward": mean_reward(env, dev_table, dev.exit_layers),
                "dev_correct": (dev.predictions == dev_table.labels).tolist(),
                "dev_score": dev.score,
                "dev_mean_exit": dev.mean_exit_layer,
                "dev_speedup": dev.speedup,
                "dev_histogram": dev.exit_histogram,
                "train_score": seen.score,
                "train_mean_exit": seen.mean_exit_layer,
                "seconds": time.perf_counter() - began,
            }
        )
        print(
            f"  {name} seed {seed}: dev {dev.score:.3f} at {dev.mean_exit_layer:.2f} layers "
            f"{dev.exit_histogram}, {policy_split} {seen.score:.3f} at {seen.mean_exit_layer:.2f}",
            flush=True,
        )
    return {
        "protocol": name,
        "stage1_split": stage1_split,
        "policy_split": policy_split,
        "metric": dev.metric,
        "fingerprint": model.fingerprint(),
        "runs": runs,
        "tables": {policy_split: layer_summary(train_table), "dev": layer_summary(dev_table)},
    }


def mean_reward(env: ConsistentEEVectorEnv, table: ExitTable, exit_layers: np.ndarray) -> float:
    """The env's reward (what REINFORCE maximises) averaged over a table, exiting at ``exit_layers``."""
    rows, layers = np.arange(table.num_inputs), np.asarray(exit_layers)
    ce, correct = table.cross_entropy[rows, layers - 1], table.correct[rows, layers - 1]
    rewards = env.reward_fn(ce, correct, layers, table.memorized, table.num_layers, env.alpha)
    return float(np.mean(rewards))


def layer_summary(table: ExitTable) -> dict:
    """Static accuracy, mean top-class probability, cross-entropy and reward of every layer."""
    env = ConsistentEEVectorEnv(num_envs=1, table=table, final_obs=False)  # the default reward
    return {
        "inputs": table.num_inputs,
        "accuracy": table.correct.mean(0).tolist(),
        "confidence": table.probs.max(-1).mean(0).tolist(),
        "cross_entropy": table.cross_entropy.mean(0).tolist(),
        "reward": [
            mean_reward(env, table, np.full(table.num_inputs, layer))
            for layer in range(1, table.num_layers + 1)
        ],
    }


def paired_accuracy_difference(a: dict, b: dict) -> tuple[float, float]:
    """Dev accuracy of protocol ``b`` minus ``a`` and its standard error, paired over dev inputs
    (each input's correctness averaged over seeds)."""
    correct_a = np.mean([run["dev_correct"] for run in a["runs"]], 0)
    correct_b = np.mean([run["dev_correct"] for run in b["runs"]], 0)
    diff = correct_b - correct_a
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def markdown(results: list[dict]) -> str:
    metric = results[0]["metric"]
    lines = [
        f"| protocol | stage-1 split | policy split | dev {metric} | dev mean exit | dev speed-up "
        f"| dev reward | policy-split {metric} | policy-split mean exit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:

        def column(key: str, runs=r["runs"]) -> str:
            return mean_std([run[key] for run in runs])

        lines.append(
            f"| {r['protocol']} | `{r['stage1_split']}` | `{r['policy_split']}` | {column('dev_score')} "
            f"| {column('dev_mean_exit')} | {column('dev_speedup')} | {column('dev_reward')} "
            f"| {column('train_score')} | {column('train_mean_exit')} |"
        )
    lines.append("")
    for r in results[1:]:
        diff, se = paired_accuracy_difference(results[0], r)
        lines.append(
            f"Dev accuracy, {r['protocol']} minus {results[0]['protocol']}: {diff:+.3f} ± {se:.3f} "
            "(standard error, paired over dev inputs, seeds averaged)."
        )
    lines += [
        "",
        "Static exits by layer: accuracy, mean confidence, cross-entropy, mean reward:",
        "",
        "| stage-1 split | table | inputs | accuracy | confidence | cross-entropy | reward |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in results:
        for split, summary in r["tables"].items():
            if (r["stage1_split"], split) in seen:
                continue
            seen.add((r["stage1_split"], split))
            cells = [
                " ".join(f"{v:.3f}" for v in summary[k]) for k in ("accuracy", "confidence", "cross_entropy")
            ]
            cells.append(" ".join(f"{v:.2f}" for v in summary["reward"]))
            lines.append(f"| `{r['stage1_split']}` | `{split}` | {summary['inputs']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.protocols:
        print(f"{name}: stage 1 on {PROTOCOLS[name][0]}, policy on {PROTOCOLS[name][1]}", flush=True)
        results.append(run_protocol(args.task, name, args.seeds, args.epochs, args.num_envs))
    print()
    print(f"{args.task}, REINFORCE defaults, {args.epochs} epochs, seeds 0-{args.seeds - 1} (mean ± std):")
    print()
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
