"""One page over every task: each policy's AUC, its paired difference to the best rule, its mean rank.

    python -m benchmarks.summary                         # reads benchmarks/results/<task>/results.json
    python -m benchmarks.summary --results ee-gym-results --output ee-gym-results/README.md

Reads the results contract of :mod:`benchmarks.compare` (``table``, ``paired``, ``best_rule``,
``mde_auc``, ``protocol``) of every task folder found, and writes ``README.md`` (one table, policy x
task: AUC and, in brackets, the paired AUC difference to that task's best rule with its 95% interval;
the mean rank over the tasks; each task's minimum detectable difference) and ``summary.png`` (the
paired differences with their intervals, one panel per task). Nothing is re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.paired import tie_share, ties_unresolved

RESULTS = Path(__file__).resolve().parent / "results"
TASK_ORDER = ("rte", "mrpc", "cola", "sst2", "stsb", "qnli", "qqp", "mnli")


def load_results(root: Path) -> dict[str, dict]:
    """page -> its results.json, for every ``<root>/<page>/results.json`` in the results contract. A
    page is named by its folder: ``rte``, or ``rte-mpnet-base`` for the same task on another backbone
    (each its own column), ordered by task, then name."""
    found = {}
    for path in sorted(root.glob("*/results.json")):
        record = json.loads(path.read_text())
        if {"table", "paired", "mde_auc", "protocol"} <= set(record):
            found[path.parent.name] = record
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    return dict(sorted(found.items(), key=lambda item: (order.get(item[1]["task"], len(order)), item[0])))


def auc_difference(record: dict, policy: str) -> dict | None:
    """The paired AUC difference of ``policy`` to the task's best rule (None for the best rule itself)."""
    return next(
        (
            p
            for p in record["paired"]
            if p["policy"] == policy and p["reference"] == record["best_rule"] and p["statistic"] == "auc"
        ),
        None,
    )


def mean_ranks(results: dict[str, dict], policies: list[str]) -> dict[str, float]:
    """Each policy's rank by AUC (1 = best) averaged over the tasks it ran on (deployable ones only)."""
    from scipy.stats import rankdata

    ranks: dict[str, list[float]] = {p: [] for p in policies}
    for record in results.values():
        rows = {r["label"]: r["auc"] for r in record["table"] if r["label"] in ranks}
        names = list(rows)
        for name, rank in zip(names, rankdata([-rows[n] for n in names]), strict=True):
            ranks[name].append(float(rank))
    return {p: float(np.mean(r)) if r else float("nan") for p, r in ranks.items()}


def summary_table(results: dict[str, dict]) -> tuple[str, list[str]]:
    """The markdown table and the policies in it, best mean rank first."""
    policies = list(
        dict.fromkeys(
            r["label"]
            for rec in results.values()
            for r in rec["table"]
            if r["deployable"] and r["label"] != "full model"
        )
    )
    ranks = mean_ranks(results, policies)
    policies.sort(key=lambda p: ranks[p])
    tasks = list(results)
    lines = [
        "| policy | " + " | ".join(tasks) + " | mean rank |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for policy in policies:
        cells = []
        for task in tasks:
            row = next((r for r in results[task]["table"] if r["label"] == policy), None)
            if row is None:
                cells.append("")
                continue
            diff = auc_difference(results[task], policy)
            delta = (
                "best rule"
                if policy == results[task]["best_rule"]
                else ""
                if diff is None
                else f"{diff['delta']:+.1f} [{diff['low']:+.1f}, {diff['high']:+.1f}]"
            )
            cells.append(f"{100 * row['auc']:.1f} ({delta})")
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {ranks[policy]:.1f} |")
    footer = ["| full model (metric) | "]
    footer[0] += " | ".join(
        f"{100 * next(r['metric'] for r in results[t]['table'] if r['label'] == 'full model'):.1f}"
        for t in tasks
    )
    footer[0] += " | |"
    lines += footer
    return "\n".join(lines), policies


def tie_table(results: dict[str, dict], policies: list[str]) -> str | None:
    """Policy x task: the speed-up up to which the policy keeps the full model's metric (paired) and,
    in brackets, its share of oracle-consistent's; None when no task's results carry it (older runs)."""
    tasks = [t for t, rec in results.items() if rec.get("tie_speedups")]
    if not tasks:
        return None

    def header(task: str) -> str:  # where exiting at layer 1 already ties, the column resolves nothing
        record = results[task]
        unresolved = ties_unresolved(record["tie_speedups"], record["num_layers"])
        return f"{task} (layer 1 ties: unresolved)" if unresolved else task

    lines = ["| policy | " + " | ".join(map(header, tasks)) + " |", "|---|" + "---|" * len(tasks)]
    for policy in [*policies, "oracle-consistent"]:
        cells = []
        for task in tasks:
            ties = results[task]["tie_speedups"]
            share = tie_share(ties, policy)
            cells.append(
                ""
                if policy not in ties
                else f"{ties[policy]:.2f}x" + ("" if share is None else f" ({share:.2f})")
            )
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage1_noise(root: Path, results: dict[str, dict]) -> list[str]:
    """What stage 1 alone moves, per task, read from ``<root>/protocols/<task>/*/results.json``: the
    cross-fit fold models' full-depth spread, and every record of the task page's protocol on another
    stage-1 model (another seed): its full model and best rule, and each learner's paired AUC
    difference to its own best rule beside the page's. The page's intervals hold one stage-1 model;
    these lines are the noise they leave out."""
    lines = []
    for task, page in results.items():  # a page of another backbone (rte-mpnet-base) has no protocols folder
        for path in sorted((root / "protocols" / task).glob("*/results.json")):
            record = json.loads(path.read_text())
            spread = record.get("stage1_spread") or {}
            if spread.get("std") is not None:
                lines.append(f"- {task} ({record['protocol']}): {spread['text']}.")
            other_model = record.get("model_fingerprint") != page.get("model_fingerprint")
            if record["protocol"] == page["protocol"] and other_model:
                lines.append(f"- {task}: {seed_comparison(page, record, path.parent.name)}.")
    return lines


def seed_comparison(page: dict, other: dict, name: str) -> str:
    """One line: the task page's stage-1 model against another of the same protocol (folder ``name``)."""

    def full(record: dict) -> float:
        return 100 * next(r["metric"] for r in record["table"] if r["label"] == "full model")

    def best(record: dict) -> str:
        auc = next(r["auc"] for r in record["table"] if r["label"] == record["best_rule"])
        return f"{record['best_rule']} {100 * auc:.1f}"

    moves = []
    for learner in (r["label"] for r in other["table"] if r["kind"] == "learner"):
        a, b = auc_difference(page, learner), auc_difference(other, learner)
        if a is not None and b is not None:
            moves.append(f"{learner} {a['delta']:+.1f} [{a['low']:+.1f}, {a['high']:+.1f}] -> "
                         f"{b['delta']:+.1f} [{b['low']:+.1f}, {b['high']:+.1f}]")  # fmt: skip
    return (
        f"another stage-1 model ([{name}](protocols/{page['task']}/{name}/results.md), "
        f"`{other.get('model_fingerprint')}`, against the page's `{page.get('model_fingerprint')}`): "
        f"full model {full(page):.1f} -> {full(other):.1f}, best rule {best(page)} -> {best(other)}; "
        "AUC difference to the best rule " + ("; ".join(moves) if moves else "(no learner in both)")
    )


def plot_summary(results: dict[str, dict], policies: list[str], path: Path) -> None:
    """One panel per task: each policy's paired AUC difference to the best rule, with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1.5, 0.32 * len(policies) + 1.6),
                             sharey=True, squeeze=False)  # fmt: skip
    colours = plt.get_cmap("tab20").colors
    for ax, task in zip(axes[0], tasks, strict=True):
        record = results[task]
        for y, policy in enumerate(policies):
            diff = auc_difference(record, policy)
            if policy == record["best_rule"]:
                ax.plot([0], [y], "k|", markersize=12)
            elif diff is not None:
                ax.errorbar([diff["delta"]], [y], xerr=[[diff["delta"] - diff["low"]], [diff["high"] - diff["delta"]]],
                            fmt="o", color=colours[(2 * y) % 20], capsize=2, ms=4)  # fmt: skip
        ax.axvline(0, color="0.5", lw=0.8)
        mde = record["mde_auc"]
        ax.axvspan(-mde, mde, color="0.9", zorder=0)
        ax.set_title(f"{task} (best rule: {record['best_rule']})", fontsize=9)
        ax.set_xlabel("AUC - best rule (points)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_yticks(range(len(policies)), policies, fontsize=8)
    axes[0][0].invert_yaxis()
    # on two lines: one task's panel is narrower than the title on one line
    fig.suptitle("paired AUC difference to each task's best rule, 95% interval\n"
                 "(grey: +/- the minimum detectable difference)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


RECIPE = """## Your policy in this table

1. Write the class: subclass `ee_gym.policy.ExitPolicy` in a module of your own (`act`; for a learner
   `learns = True`, `fit(env, budget)`, and `candidates`, the few settings the comparison may choose
   among on its validation slice; for a dense curve `sweeps_threshold = True` and `exit_scores`).
2. Register it: `ee_gym.policy.register_policy("my-policy", MyPolicy)`, or an entry point in the group
   `ee_gym.policies` of your package's `pyproject.toml`.
3. Run one command per task, on the same protocol as the pages here:
   `python -m benchmarks.compare --task rte --agents my-policy,reinforce,entropy,patience,pcee,maxprob,static,oracle,oracle-consistent --protocol <protocol> --output-dir my-results/rte`,
   then `python -m benchmarks.summary --results my-results --output my-results/README.md`.
4. What to commit: each task's `results.md`, `results.json` and `curves.png`, and this page; the
   verdicts stand on the paired intervals, so quote them, not the AUCs alone.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder of <task>/results.json")
    parser.add_argument("--output", default=None, help="the page to write (default: <results>/README.md)")
    args = parser.parse_args(argv)
    root = Path(args.results)
    results = load_results(root)
    if not results:
        print(f"ee-gym: error: no <task>/results.json with paired statistics under {root}: run "
              "python -m benchmarks.compare --task <task> first", file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.output) if args.output else root / "README.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    table, policies = summary_table(results)
    plot_summary(results, policies, out.parent / "summary.png")
    setup = "; ".join(
        f"{task}: {rec['protocol']} protocol, {rec['dev_inputs']} {rec.get('evaluation', 'dev')} inputs, "
        f"{rec['policy_inputs']} policy inputs, "
        f"minimum detectable AUC difference {rec['mde_auc']:.2f}"
        for task, rec in results.items()
    )
    text = [
        "# Exit policies across tasks",
        "",
        "Each cell: the policy's AUC (mean metric over layer speed-ups 1x to L/2x, on the task's evaluation "
        "split: dev, or a split carved from train where the setup says so) and, in brackets, its "
        "paired AUC difference to that task's best rule with the 95% interval (evaluation inputs and learners' seeds "
        "resampled jointly, `benchmarks.paired`). An interval above 0 is a win over the best rule, one holding "
        "0 a tie. Mean rank: by AUC among the deployable policies, averaged over the tasks. Pages per task: "
        + ", ".join(f"[{t}]({t}/results.md)" for t in results)
        + ".",
        "",
        table,
        "",
        f"Setups: {setup}.",
        "",
        *(
            [
                "How far each policy goes at the full model's metric: the largest layer speed-up up to which "
                "its paired 95% interval against the full model reaches 0 (`benchmarks.paired.tie_speedups`), "
                "and in brackets its share of oracle-consistent's (the fastest exits that keep every "
                "full-model answer). A small evaluation split gives wide intervals, which reach 0 further out: "
                "there a share above 1 is a tie the split cannot resolve, not a policy faster than the oracle.",
                "",
                ties,
                "",
            ]
            if (ties := tie_table(results, policies))
            else []
        ),
        *(
            [
                "Stage 1's own noise, which the intervals above leave out (each task's page is one stage-1 "
                "model): fold models of a cross-fit and stage-1 runs with another seed, under `protocols/`.",
                "",
                *noise,
                "",
            ]
            if (noise := stage1_noise(root, results))
            else []
        ),
        "![paired differences](summary.png)",
        "",
        RECIPE,
        "Regenerate: `python -m benchmarks.summary` (after `python -m benchmarks.compare --task <task> --publish`).",
        "",
    ]
    out.write_text("\n".join(text))
    print("\n".join(text[:8]))
    print(f"written: {out}, {out.parent / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
