"""The same task compared under several protocols: what the policy's data does to each learner.

    python -m benchmarks.compare --task rte --protocol paper --output-dir ee-gym-results/rte-paper
    python -m benchmarks.compare --task rte --protocol held-out --output-dir ee-gym-results/rte-held-out
    python -m benchmarks.compare --task rte --protocol cross-fit --output-dir ee-gym-results/rte-cross-fit
    python -m benchmarks.protocols ee-gym-results/rte-paper ee-gym-results/rte-held-out ee-gym-results/rte-cross-fit

The same protocol on several stage-1 models (another ``--seed`` of ``ee-gym stage1``, passed with
``--model``) measures stage 1's own spread: rows are then named by protocol and model fingerprint.

Reads each folder's ``results.json`` (:mod:`benchmarks.compare`) and prints one Markdown table per
learner: per protocol, the inputs it learnt from, its dev metric at the operating point (95% interval
over seeds), layer speed-up, the first seed's exit histogram on dev (input-adaptive or one static
exit?), its AUC and its paired AUC difference to that run's best rule, how far it keeps the full
model's metric (``tie_speedups``, where the results carry it), and the extra stage-1 seconds the
protocol cost (cross-fit's fold models). Nothing is re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.paired import tie_share


def load(folders: list[str]) -> list[dict]:
    records = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise SystemExit(f"ee-gym: error: {path} does not exist: run python -m benchmarks.compare first")
        records.append(json.loads(path.read_text()))
    tasks = {r["task"] for r in records}
    if len(tasks) != 1:
        raise SystemExit(
            f"ee-gym: error: these results are of several tasks ({sorted(tasks)}); give one task's"
        )
    return records


def setup_label(record: dict, records: list[dict]) -> str:
    """A row's name: its protocol, and its stage-1 model's fingerprint when another record shares the
    protocol (the same protocol on two stage-1 seeds measures stage 1's own spread)."""
    protocol = record["protocol"]
    if sum(r["protocol"] == protocol for r in records) > 1:
        return f"{protocol}, model {record.get('model_fingerprint', '?')}"
    return protocol


def fold_seconds(record: dict) -> float:
    """The stage-1 training seconds of the protocol's fold models (0 without cross-fitting)."""
    folds = (record.get("cross_fit") or {}).get("folds", [])
    return float(sum(f.get("stage1_seconds", 0.0) for f in folds))


def auc_of(record: dict, label: str) -> float:
    return next(r["auc"] for r in record["table"] if r["label"] == label)


def learner_table(records: list[dict], learner: str) -> list[str]:
    lines = [
        f"**{learner}**",
        "",
        "| protocol | policy inputs | dev metric (95% CI seeds) | speed-up | dev exit histogram | AUC | AUC - best rule (95%) | at the full model's metric up to | extra stage-1 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        row = next((r for r in record["table"] if r["label"] == learner), None)
        if row is None:
            continue
        diff = next(
            (p for p in record["paired"]
             if p["policy"] == learner and p["reference"] == record["best_rule"] and p["statistic"] == "auc"),
            None,
        )  # fmt: skip
        low, high = row["metric_ci"]
        ci = "" if low != low else f" ({100 * low:.1f} to {100 * high:.1f})"  # nan: one seed
        paired = (
            ""
            if diff is None
            else f"{diff['delta']:+.1f} ({diff['low']:+.1f} to {diff['high']:+.1f}), vs {record['best_rule']}"
        )
        ties = record.get("tie_speedups") or {}  # older results do not carry it
        share = tie_share(ties, learner)
        tie = "" if learner not in ties else f"{ties[learner]:.2f}x" + (
            "" if share is None else f" ({share:.2f} of oracle-consistent's)")  # fmt: skip
        lines.append(
            f"| {setup_label(record, records)} | {record['policy_inputs']} | {100 * row['metric']:.1f}{ci} | "
            f"{row['speedup']:.2f}x | {row.get('exit_histogram', '')} | {100 * row['auc']:.1f} | {paired} | "
            f"{tie} | {fold_seconds(record):.0f} |"
        )
    return lines


def page(records: list[dict], folders: list[str]) -> str:
    """The Markdown page: the setups, then one table per learner."""
    learners = list(dict.fromkeys(
        r["label"] for record in records for r in record["table"] if r["kind"] == "learner"
    ))  # fmt: skip
    full = " / ".join(
        f"{setup_label(rec, records)} {100 * next(r['metric'] for r in rec['table'] if r['label'] == 'full model'):.1f}"
        for rec in records
    )
    lines = [
        f"# {records[0]['task']}: learners under each protocol",
        "",
        f"Full model dev {records[0]['metric']}: {full}; minimum detectable AUC difference: "
        + " / ".join(f"{setup_label(rec, records)} {rec['mde_auc']:.2f}" for rec in records)
        + "; best rule's AUC: "
        + " / ".join(f"{setup_label(rec, records)} {rec['best_rule']} {100 * auc_of(rec, rec['best_rule']):.1f}" for rec in records)
        + ". Pages: " + ", ".join(f"[{setup_label(rec, records)}]({Path(f).name}/results.md)" for rec, f in zip(records, folders, strict=True))
        + ".",
        "",
    ]  # fmt: skip
    for record in records:
        spread = record.get("stage1_spread")
        if spread:
            lines += [f"Stage-1 spread ({setup_label(record, records)}): {spread['text']}.", ""]
    for learner in learners:
        lines += [*learner_table(records, learner), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.protocols", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "folders",
        nargs="+",
        help="benchmarks.compare output folders, one task, several protocols or stage-1 models",
    )
    parser.add_argument(
        "--output", default=None, help="also write the page here (README.md beside the folders)"
    )
    args = parser.parse_args(argv)
    text = page(load(args.folders), args.folders)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
