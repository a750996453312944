"""Token-level early exit on XSum: full depth against CALM's rules, static exits and ConsistentEE.

    python -m benchmarks.generation                      # SmolLM2-135M-Instruct, the first 100 articles
    python -m benchmarks.generation --articles 5         # a quick run (same training, fewer scored)

A thin CLI over the library (``ee_gym.generation.method``: ``compare_exit_policies`` and the entry
points it calls, ``train_heads_for``, ``calm_rules``, ``train_token_policy``, ``evaluate_policies``):
the flags become a ``ComparisonConfig``, and this script writes what comes back. One run, in order,
with the time of each phase recorded:

1. exit heads (stage 1 for decoders) on ``--head-rows``, unless ``--heads`` names a folder of trained
   ones (``ee_gym.generation.prepare.train_heads``): ``--head-method regression`` fits full-rank
   adapters in closed form on the teacher-forced articles and reference summaries
   (``ee_gym.generation.regression``); ``gradient`` self-distils the rows (the model's own greedy
   continuations) and trains adapters with the depth-weighted cross-entropy
   (``ee_gym.generation.training``); ``regression+gradient`` (the default) does the first, then
   fine-tunes its adapters by the second (see ``benchmarks/results/xsum-finetuned-heads``);
2. the token table of ``--policy-rows`` (held out from the heads): the per-layer exits of every token
   the full model generates there;
3. thresholds of the CALM rules placed on that table at the layer speed-ups ``--speedups``
   (``threshold_for_speedup``; never on the scored articles), for each ``--calm-min-layers`` (no exit
   before that layer), and ConsistentEE's REINFORCE policy
   trained on ``ConsistentEE-XSum-v0`` over that table at each ``--alphas`` (reward -CE - alpha t),
   starting from exit probability 1/L at every layer (``set_exit_prior``: from 0.5 it never explores
   past the first layers of a 30-layer model); the same again at each ``--confidence-alphas`` with
   the ``state+confidence`` observation (the state and exit l's top-2 gap), all with no exit before
   ``--policy-min-layer``, each at every ``--policy-every`` (deciding at every k-th layer from the min
   layer only, so that a token pays for fewer decisions) and with each of ``--policy-seeds`` (a setting
   meets the target only if every seed's row does); and, unless ``--no-oracle``, the oracle reference (``OracleExit``, from the
   same min layer: each token leaves at the first layer whose head says the full model's next token
   for that history, which it finds by decoding every token twice). The min layers (11 by default)
   guard against shallow exits, whose propagated keys and values derail later tokens
   (``benchmarks/results/xsum-finetuned-heads``);
4. every policy decodes the first ``--articles`` of ``--eval-rows`` greedily (``--max-new-tokens``),
   from one shared prompt pass per batch: ROUGE-1/2/L (x100) against the references, mean exit layer
   over the tokens an exit decided, layer speed-up L / mean; each article's ROUGE-L is kept, so every
   row's difference from full depth carries a 95% paired bootstrap interval over the articles;
5. wall clock (``ee_gym.generation.timing``): on the first ``--timing-articles`` articles, every
   deployable policy and full depth decode in ``--timing-rounds`` rounds (the policies' order rotating
   each round) at each ``--timing-threads`` and ``--timing-batch-sizes``; tokens per second and the
   speed-up over full depth are medians over rounds, the prompt pass is timed apart, and each rule's
   decision cost is measured against a layer's in the same batch-1 run.

Writes ``results.md`` (the table, the target check, the settings) and ``results.json`` (everything,
summaries included) to ``--output-dir`` (default ``benchmarks/results/xsum``). Heads are saved under
``$EE_GYM_HOME/generation/heads/`` in a folder per method (``--save-heads`` to choose), never into the
repository. ``--render DIR`` rewrites DIR's page from its results.json, decoding nothing.
Threads: ``--threads`` (default 1).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from benchmarks.throughput import limit_threads

TARGET_SPEEDUP, TARGET_ROUGE_DROP = 1.5, 1.0  # layers (the previous round's target)
#: the wall-clock target: tokens/s at batch 1 over full depth's, with a decision at most this share of a layer
TARGET_WALL_SPEEDUP, TARGET_DECISION_FRACTION = 1.3, 0.05
#: ee_gym.generation.method.ORACLE and ee_gym.generation.prepare.HEAD_METHODS, spelled out:
#: importing them would import numpy and torch before --threads is applied
ORACLE = "oracle (reference, not deployable)"
HEAD_METHODS = ("regression", "gradient", "regression+gradient")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n")[0])
    p.add_argument("--decoder", default="smollm2", help="an embedded name, a hub name or a model folder")
    p.add_argument("--data-dir", default=None, help="holds xsum/xsum_0shot.jsonl (default: $EE_GYM_DATA)")
    p.add_argument("--eval-rows", default="eval", help="scored articles: a split name or rows 'start:stop'")
    p.add_argument("--articles", type=int, default=100, help="score the first N articles of --eval-rows")
    p.add_argument("--head-rows", default="100:200", help="articles the exit heads learn from")
    p.add_argument("--policy-rows", default="200:400", help="articles of the policy's table (and thresholds)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="articles decoded together (scores only)")
    p.add_argument("--heads", default=None, help="a folder of trained exit heads: skip head training")
    p.add_argument("--save-heads", default=None, help="where trained heads go (default under $EE_GYM_HOME)")
    p.add_argument("--head-method", default="regression+gradient", choices=HEAD_METHODS)
    p.add_argument("--adapter-rank", type=int, default=0,
                   help="0: full d x d adapters (regression needs them); e.g. 64 for gradient training")  # fmt: skip
    p.add_argument("--head-epochs", type=int, default=None,
                   help="gradient epochs (default 3 from zero, 4 after the regression)")  # fmt: skip
    p.add_argument("--head-lr", type=float, default=None,
                   help="gradient learning rate (default 3e-3 from zero, 1e-4 after the regression)")  # fmt: skip
    p.add_argument("--head-batch-size", type=int, default=32)
    p.add_argument("--layers-per-step", type=int, default=8, help="heads trained per step (0: all)")
    p.add_argument("--head-targets", default="greedy", choices=["greedy", "distribution"])
    p.add_argument("--static-layers", type=int, nargs="*", default=[20, 24])
    p.add_argument("--speedups", type=float, nargs="*", default=[1.3, 1.6],
                   help="layer speed-ups at which the CALM thresholds are placed on the policy table")  # fmt: skip
    p.add_argument("--calm-min-layers", type=int, nargs="*", default=[11],
                   help="CALM rows for each: no exit before this layer (1: none forbidden)")  # fmt: skip
    p.add_argument("--calm-every", type=int, nargs="+", default=[1],
                   help="CALM rows for each: the signal read at every k-th layer from the min layer (1: each)")  # fmt: skip
    p.add_argument("--alphas", type=float, nargs="*", default=[0.12, 0.18],
                   help="ConsistentEE policies reading the state (the paper's observation)")  # fmt: skip
    p.add_argument("--confidence-alphas", type=float, nargs="*", default=[0.14, 0.18, 0.22],
                   help="ConsistentEE policies reading the state and the exit's confidence")  # fmt: skip
    p.add_argument("--probe-alphas", type=float, nargs="*", default=[0.14, 0.18, 0.22],
                   help="ConsistentEE policies reading the state and a learned confidence probe's score")  # fmt: skip
    p.add_argument("--no-probe-rules", action="store_true",
                   help="skip the probe as a rule (one per --speedups x --calm-min-layers)")  # fmt: skip
    p.add_argument("--no-candidate-rules", action="store_true",
                   help="skip CALM's confidence over k candidate tokens (one per --speedups x --calm-min-layers)")  # fmt: skip
    p.add_argument("--policy-every", type=int, nargs="+", default=[1],
                   help="ConsistentEE rows for each: decide at every k-th layer from the min layer only (1: each)")  # fmt: skip
    p.add_argument("--policy-seeds", type=int, nargs="*", default=[],
                   help="ConsistentEE rows for each seed (default: --seed); the target needs every seed of a row")  # fmt: skip
    p.add_argument("--policy-min-layer", type=int, default=11,
                   help="ConsistentEE policies and the oracle: no exit before this layer (1: none forbidden)")  # fmt: skip
    p.add_argument("--reward", default="plain")
    p.add_argument("--policy-epochs", type=int, default=40)
    p.add_argument("--policy-lr", type=float, default=1e-3)
    p.add_argument("--exit-prior", type=float, default=None,
                   help="REINFORCE's starting exit probability per layer (default 1/L, see set_exit_prior)")  # fmt: skip
    p.add_argument("--no-oracle", action="store_true",
                   help="skip the oracle reference (perfect per-token exits; about 5x the cost of full depth)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-articles", type=int, default=20,
                   help="wall clock on the first N scored articles (0: no timing)")  # fmt: skip
    p.add_argument("--timing-rounds", type=int, default=3, help="alternating rounds; medians are quoted")
    p.add_argument("--timing-threads", type=int, nargs="+", default=[1, 2], help="torch thread counts timed")
    p.add_argument("--timing-batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes timed")
    p.add_argument(
        "--timing-policies",
        nargs="*",
        default=[],
        help="name prefixes of the policies timed (default: all; full depth always is)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of everything but the timing")
    p.add_argument("--verify-draft-tokens", type=int, nargs="*", default=[4],
                   help="the lossless verify mode at each k (drafts per verify pass; none: not run)")  # fmt: skip
    p.add_argument("--verify-drafters", nargs="*", default=["static", "probe", "consistentee"],
                   help="rows whose name starts with one of these draft for the verify mode")  # fmt: skip
    p.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results" / "xsum"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", metavar="DIR", default=None,
                   help="no run: rewrite DIR/results.md (and the target check) from DIR/results.json, "
                        "scoring each article's ROUGE-L from the summaries where the record lacks it")  # fmt: skip
    return p.parse_args(argv)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(record: dict) -> str:
    """The results table, the target check and the settings."""
    runs, full = record["runs"], record["runs"][0]
    cells = [f"{c['threads']} thr, batch {c['batch_size']}" for c in full.get("timing", [])]
    main, others = (cells[0], cells[1:]) if cells else ("batch 1", [])
    timing = record["settings"].get("timing") or {}
    lines = [
        f"# Token-level early exit on XSum ({record['settings']['decoder']}, {record['settings']['articles']} articles)",
        "",
        f"Command: `{record['command']}`  ",
        f"Wall time: {record['seconds']['total']:.0f} s on {record['settings']['threads']} thread(s) "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in record['seconds'].items() if k != 'total')}).",
        "",
        "| policy | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L vs full (95% paired CI) | mean exit | layer speed-up "
        f"| tokens/s ({main}) | wall-clock speed-up ({main}) | {' | '.join(f'wall ({c})' for c in others)}"
        f"{' | ' if others else ''}reads | decision (us, % of a layer) | speed-up on policy table |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * (len(others) + 3),
    ]
    for run in runs:
        walls = {
            f"{c['threads']} thr, batch {c['batch_size']}": c["wall_speedup"] for c in run.get("timing", [])
        }
        cost = run.get("decision_us")
        decision = "-" if cost is None else f"{cost:.0f} ({100 * run['decision_fraction']:.1f}%)"
        if cost is not None and (run.get("probe_us") or cost) > 1.05 * cost:  # probes at some layers only
            decision += f", {run['probe_us']:.0f} per probe"
        lines.append(
            f"| {run['name']} | {run['rouge']['rouge1']:.2f} | {run['rouge']['rouge2']:.2f} | "
            f"{run['rouge']['rougeL']:.2f} | {run['rouge']['rougeL'] - full['rouge']['rougeL']:+.2f}"
            f"{_interval_text(run.get('rouge_l_interval'))} | "
            f"{run['mean_exit_layer']:.2f} | {run['speedup']:.2f}x | {_fmt(run.get('tokens_per_second'), 1)} | "
            f"{_fmt(run.get('wall_speedup'))}{'x' if run.get('wall_speedup') else ''} | "
            + "".join(f"{_fmt(walls.get(c))}{'x' if walls.get(c) else ''} | " for c in others)
            + f"{run.get('reads') or '-'} | {decision} | "
            f"{_fmt(run.get('table_speedup'))}{'x' if run.get('table_speedup') else ''} |"
        )
    check = record["target"]
    lines += [
        "",
        f"Target: at >= {TARGET_WALL_SPEEDUP}x wall-clock tokens/s ({main}), ROUGE-L within {TARGET_ROUGE_DROP} "
        f"point of full depth ({full['rouge']['rougeL']:.2f}), a decision at most "
        f"{100 * TARGET_DECISION_FRACTION:.0f}% of a layer. **{'Met' if check['met'] else 'Not met'}**: "
        f"{check['detail']}",
        "",
        f"By ConsistentEE: **{'met' if check.get('consistentee_met') else 'not met'}**: "
        f"{check.get('consistentee_detail', '(not checked in this run)')}",
        "",
        f"At >= {TARGET_SPEEDUP}x layer speed-up (the layer count alone): {check.get('layers_detail', '-')}",
        "",
        "Mean exit and layer speed-up count the tokens an exit decided (all generated tokens but the first, "
        "which the full-depth prompt pass produces). Wall clock (`ee_gym.generation.timing`): decoding alone "
        f"on the first {timing.get('articles', '-')} articles ({full.get('timing_tokens', 0)} tokens timed per "
        f"round at full depth), {timing.get('rounds', '-')} rounds alternating the policies' order, medians "
        "quoted; the prompt pass is timed apart (median seconds per round: "
        + ", ".join(
            f"{k.replace('x', ' thr, batch ')}: {v:.2f} s"
            for k, v in (record["settings"].get("prompt_seconds") or {}).items()
        )
        + "). Decision cost: the time of one decision (the rule and "
        "the signals it reads) over one decoder layer's, both measured at batch 1 in the same run, per layer "
        "the rule is asked at from its min layer (a rule probing every k-th layer answers the others with one "
        "comparison; its cost per probe follows); `reads` is "
        "what a decision reads (`softmax`: exit l's full LM-head product; `state`: the hidden state only). "
        "The last column is the policy's layer speed-up on the held-out policy table (teacher forced on the "
        "full model's own tokens), where CALM thresholds were placed. The oracle exits each token at the first "
        "layer whose head says what the full model would say next for that history (it decodes every token "
        "twice, so it has no speed to time): what perfect exit decisions reach under state propagation; "
        "it does not count for the target.",
        "",
        *speculative_section(record),
        "Held-out cross-entropy of each exit against the full model's greedy token (policy table), layers 1..L:",
        "",
        "    " + " ".join(f"{x:.2f}" for x in record["table_summary"]["cross_entropy"]),
        "",
        "Agreement of each exit's top-1 with the full model's token:",
        "",
        "    " + " ".join(f"{x:.2f}" for x in record["table_summary"]["agreement"]),
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in record["settings"].items()),
        "",
    ]
    return "\n".join(lines)


def speculative_section(record: dict) -> list[str]:
    """The verify mode's table: drafter, k, acceptance, tokens per verify pass, wall clock, lossless."""
    rows = record.get("speculative") or []
    if not rows:
        return []
    lines = [
        "## Lossless verify mode (self-speculative decoding)",
        "",
        "A drafter decodes k tokens with its exits, one full-depth pass over them keeps the agreeing prefix "
        "and the full model's next token (`ee_gym.generation.speculative`): the output is full-depth greedy "
        "decoding's, token for token (checked: last column). Batch 1, the prompt pass included on both sides, "
        f"medians over {(record['settings'].get('timing') or {}).get('rounds', '-')} rounds against plain "
        "full-depth decoding in the same rounds.",
        "",
        "| drafter | k | acceptance | tokens per verify pass | tokens/s | full depth tokens/s | wall-clock speed-up | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['drafter']} | {row['draft_tokens']} | {row['acceptance']:.2f} | {row['tokens_per_round']:.2f} | "
            f"{row['tokens_per_second']:.1f} | {row['full_depth_tokens_per_second']:.1f} | "
            f"{row['wall_speedup']:.2f}x | {'yes' if row['identical_to_full_depth'] else 'NO'} |"
        )
    return [*lines, ""]


def rouge_l_interval(
    run: dict, full: dict, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """The ``confidence`` bootstrap interval (BCa, 10,000 resamples of the articles) of ``run``'s mean
    ROUGE-L minus ``full``'s over the same articles; None for full depth itself or a record without
    per-article scores. On 100 articles a summary's ROUGE-L varies by about 10 points, so a mean
    difference of one point is within the noise unless its interval says otherwise."""
    import numpy as np
    from scipy import stats

    ours, theirs = run.get("rouge_l_per_article") or [], full.get("rouge_l_per_article") or []
    if run is full or not ours or len(ours) != len(theirs):
        return None
    differences = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    if np.ptp(differences) == 0:  # every article alike: no spread to resample
        return float(differences[0]), float(differences[0])
    found = stats.bootstrap((differences,), np.mean, confidence_level=confidence, n_resamples=10_000,
                            method="BCa", random_state=np.random.default_rng(seed))  # fmt: skip
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


def with_intervals(runs: list[dict]) -> list[dict]:
    """Store on every run (full depth first) its ``rouge_l_interval`` against full depth, once: the
    table and the target check read it, and results.json keeps it."""
    for run in runs:
        run["rouge_l_interval"] = rouge_l_interval(run, runs[0])
    return runs


def _interval_text(interval: tuple[float, float] | None, before: str = " (", after: str = ")") -> str:
    if interval is None:
        return ""
    return f"{before}{interval[0]:+.2f} to {interval[1]:+.2f}{after}"


def _fast_enough(run: dict, wall: bool) -> bool:
    if not wall:
        return run["speedup"] >= TARGET_SPEEDUP
    cheap = run.get("decision_fraction") is None or run["decision_fraction"] <= TARGET_DECISION_FRACTION
    return (run.get("wall_speedup") or 0.0) >= TARGET_WALL_SPEEDUP and cheap


def _settings(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs grouped by setting: the rows of one ConsistentEE setting trained with several seeds
    (``..., seed s)``) form one group, every other row its own."""
    from ee_gym.generation.method import setting_name  # at call time: see ORACLE

    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(setting_name(run["name"]), []).append(run)
    return groups


def _best_at_target(runs: list[dict], prefix: str = "", wall: bool = True) -> tuple[str, list[dict]] | None:
    """The setting of highest worst-seed ROUGE-L among those named ``prefix...`` whose every seed
    reaches the wall-clock target (or, ``wall=False``, TARGET_SPEEDUP in layers); never the oracle."""
    fast = {
        name: rows for name, rows in _settings(runs).items()
        if name != ORACLE and name.startswith(prefix) and all(_fast_enough(r, wall) for r in rows)
    }  # fmt: skip
    if not fast:
        return None
    return max(fast.items(), key=lambda item: min(r["rouge"]["rougeL"] for r in item[1]))


def target_check(runs: list[dict]) -> dict:
    """Whether some policy reaches TARGET_WALL_SPEEDUP (at a decision cost of at most
    TARGET_DECISION_FRACTION of a layer) with ROUGE-L within TARGET_ROUGE_DROP of full depth; whether a
    ConsistentEE policy does (the issue's question), said apart; and the layer-count target, as before.
    A setting trained with several seeds counts only if every seed's row holds."""
    full = runs[0]["rouge"]["rougeL"]
    check: dict = {}
    checks = (("", "", "policy", True), ("consistentee_", "consistentee", "ConsistentEE policy", True),
              ("layers_", "", "policy", False))  # fmt: skip
    for key, prefix, who, wall in checks:
        best = _best_at_target(runs[1:], prefix, wall)
        where = f"{TARGET_WALL_SPEEDUP}x wall clock" if wall else f"{TARGET_SPEEDUP}x in layers"
        if best is None:
            check[f"{key}met"] = False
            check[f"{key}detail"] = f"no {who} reached {where}" + (" with every seed." if wall else ".")
            continue
        name, rows = best
        drop = full - min(r["rouge"]["rougeL"] for r in rows)
        check[f"{key}met"], check[f"{key}best"] = drop <= TARGET_ROUGE_DROP, name
        each = "; ".join(
            f"{r['name'] if len(rows) > 1 else 'it'}: {r['speedup']:.2f}x layers, {_fmt(r.get('wall_speedup'))}x wall, "
            f"ROUGE-L {r['rouge']['rougeL']:.2f} ({r['rouge']['rougeL'] - full:+.2f}"
            f"{_interval_text(r.get('rouge_l_interval'), ', 95% CI ', '')})"
            for r in rows
        )
        check[f"{key}detail"] = f"the best {who} at >= {where} is {name} ({each})."
    return check


def config_from_args(args: argparse.Namespace):
    """The library's :class:`~ee_gym.generation.method.ComparisonConfig` of the parsed flags."""
    from ee_gym.generation.method import ComparisonConfig, HeadSetup, PolicySetup
    from ee_gym.generation.timing import TimingSettings

    head = HeadSetup(
        method=args.head_method,
        rows=args.head_rows,
        adapter_rank=args.adapter_rank or None,
        epochs=args.head_epochs,
        learning_rate=args.head_lr,
        batch_size=args.head_batch_size,
        layers_per_step=args.layers_per_step or None,
        targets=args.head_targets,
    )
    policy = PolicySetup(
        min_layer=args.policy_min_layer,
        reward=args.reward,
        epochs=args.policy_epochs,
        learning_rate=args.policy_lr,
        exit_prior=args.exit_prior,
    )
    return ComparisonConfig(
        decoder=args.decoder,
        data_dir=args.data_dir,
        eval_rows=args.eval_rows,
        articles=args.articles,
        policy_rows=args.policy_rows,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        heads=args.heads,
        save_heads=args.save_heads,
        head=head,
        static_layers=tuple(args.static_layers),
        speedups=tuple(args.speedups),
        calm_min_layers=tuple(args.calm_min_layers),
        calm_every=tuple(args.calm_every),
        alphas=tuple(args.alphas),
        confidence_alphas=tuple(args.confidence_alphas),
        probe_alphas=tuple(args.probe_alphas),
        policy_every=tuple(args.policy_every),
        policy_seeds=tuple(args.policy_seeds),
        probe_rules=not args.no_probe_rules,
        candidate_rules=not args.no_candidate_rules,
        policy=policy,
        oracle=not args.no_oracle,
        timing=TimingSettings(
            args.timing_articles,
            args.timing_rounds,
            tuple(args.timing_threads),
            tuple(args.timing_batch_sizes),
            tuple(args.timing_policies),
        )
        if args.timing_articles
        else None,  # fmt: skip
        verify_draft_tokens=tuple(args.verify_draft_tokens),
        verify_drafters=tuple(args.verify_drafters),
        seed=args.seed,
    )


def render(folder: str | Path, data_dir: str | None = None) -> dict:
    """Rewrite ``folder``'s results.md and target check from its results.json, with no decoding; runs
    recorded before per-article ROUGE-L was kept get it from their summaries and the references of
    the record's own articles (``data_dir``: default $EE_GYM_DATA)."""
    from ee_gym.generation.data import load_xsum
    from ee_gym.generation.evaluate import rouge_per_article

    path = Path(folder) / "results.json"
    record = json.loads(path.read_text())
    settings = record["settings"]
    if any(not run.get("rouge_l_per_article") for run in record["runs"]):
        articles = load_xsum(settings["eval_rows"], data_dir, settings["articles"])
        references = [a.reference for a in articles]
        for run in record["runs"]:
            if not run.get("rouge_l_per_article"):
                if len(run.get("summaries") or []) != len(references):
                    raise ValueError(f"{path}: {run['name']!r} keeps no summary per article to score")
                run["rouge_l_per_article"] = (
                    rouge_per_article(run["summaries"], references)["rougeL"].round(4).tolist()
                )
    record["target"] = target_check(with_intervals(record["runs"]))
    path.write_text(json.dumps(record, indent=1))
    text = markdown(record)
    (Path(folder) / "results.md").write_text(text)
    return record


def main(argv=None) -> dict:
    """Parse the flags, run :func:`ee_gym.generation.method.compare_exit_policies`, write the results."""
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.data_dir)
    threads = limit_threads(args.threads)  # before numpy and torch are imported
    import numpy as np
    import torch

    from ee_gym.generation.method import compare_exit_policies

    command = "python -m benchmarks.generation " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.partial.json"

    def scored(runs: list[dict]) -> None:  # the scores, before the long timing phase
        partial.write_text(json.dumps({"command": command, "note": "scores only: the timing did not finish",
                                       "runs": runs}, indent=1))  # fmt: skip

    found = compare_exit_policies(config_from_args(args), progress=not args.no_progress, scored=scored)
    record = {
        "command": command,
        "settings": found.settings,
        "seconds": found.seconds,
        "target": target_check(with_intervals(found.runs)),
        "table_summary": found.table_summary,
        "head_history": found.head_history,
        "policy_history": found.policy_history,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "threads": threads,
        "runs": found.runs,
        "speculative": found.speculative,
    }
    text = json.dumps(record, indent=1)
    (out / "results.json").write_text(text)
    record = json.loads(text)  # the page shows what the file holds, as --render does
    partial.unlink(missing_ok=True)
    text = markdown(record)
    (out / "results.md").write_text(text)
    print(text)
    return record


if __name__ == "__main__":
    main()
