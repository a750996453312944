"""Wall-clock speed-up of batched early exiting next to its layer speed-up.

    python -m benchmarks.wallclock --task rte --policy maxprob --policy-arg threshold=0.6 \\
        --batch-sizes 1 8 64 --limit 64
    python -m benchmarks.wallclock --policy path/to/saved/policy --model path/to/checkpoint

On the same inputs (the first ``--limit`` of ``--split``), each batch size times full-depth inference
(``policy=None``: every input to layer L, only the last head) against early-exit inference with the
policy (``ee_gym.inference.predict_batches``: rows dropped and padding trimmed as they exit), on the
same tokenised and padded batches (``prepare_batches``): what is timed is the model, which is what
exiting saves; the time to tokenise and pad, the same for both, is reported beside. The layer speed-up is L / mean exit layer; the wall speed-up is full s / early-exit s;
their ratio says how much of the layer saving reaches the clock (target >= 0.9: heads, policies and
compaction cost time too). Beside it, the token-weighted layer speed-up sum_i n_i L / sum_i n_i t_i
(n_i the input's tokens, t_i its exit layer): a layer costs about in proportion to its tokens, so when
long inputs exit later than short ones this, not L / mean t, is what the clock can reach. Every timing is the best of ``--repeat`` runs after one warm-up run of
each kind (on a shared machine other work only slows a run down); full and early-exit runs alternate.

Default model: the task's stage-1 model under ``--protocol`` (ee_gym.envs.prepare.load_model; for
the default, paper: ~/.cache/ee_gym/checkpoints/rte-minilm-l6-stage1/model). Default data: $EE_GYM_DATA, else the
``shared/data`` folder beside the checkout when it exists, else the Hugging Face hub.
Threads: ``--threads`` (default 1) as in benchmarks.throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.throughput import limit_threads

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wallclock", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="rte")
    p.add_argument("--model", default=None, help="a checkpoint folder (default: the task's stage-1 model)")
    p.add_argument("--protocol", default=None, help="whose stage-1 model is the default (default: paper)")
    p.add_argument("--split", default="dev")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--policy", default="maxprob", help="a policy name or a folder saved with ExitPolicy.save")
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--limit", type=int, default=None, help="the first N inputs of the split")
    p.add_argument("--max-length", type=int, default=None, help="(default: the task's default)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per cell; the best is kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    return p.parse_args(argv)


def make_policy(spec: str, pairs: list[str]):
    import agents

    if Path(spec).is_dir():
        return agents.load_policy(spec)
    kwargs = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return agents.make(spec, **kwargs)


def token_layer_speed_up(batches, exit_layers, num_layers: int) -> float:
    """sum_i n_i L / sum_i n_i t_i over the inputs of prepared batches (n_i: the input's tokens)."""
    import numpy as np

    tokens = np.zeros(len(exit_layers))
    for batch in batches:
        tokens[batch.rows] = batch.inputs["attention_mask"].sum(1).cpu().numpy()
    return float((tokens * num_layers).sum() / (tokens * exit_layers).sum())


def elapsed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = limit_threads(args.threads)  # before torch and numpy do any work

    from ee_gym.envs.prepare import default_max_length, load_model
    from ee_gym.inference import predict_batches, prepare_batches
    from ee_gym.tasks import compute_metrics, load_split

    data_dir = args.data_dir
    if data_dir is None and not os.environ.get("EE_GYM_DATA") and (SHARED_DATA / "glue").is_dir():
        data_dir = str(SHARED_DATA)
    model = load_model(args.task, model=args.model, data_dir=data_dir, progress=False, protocol=args.protocol)
    policy = make_policy(args.policy, args.policy_arg)
    examples = load_split(args.task, args.split, data_dir, args.limit)
    max_length = args.max_length or default_max_length(args.task)
    inputs, n = (examples.text_a, examples.text_b), len(examples)

    rows, reference = [], None
    for batch_size in args.batch_sizes:
        began = time.perf_counter()
        batches = prepare_batches(model, *inputs, batch_size=batch_size, max_length=max_length)
        prepare_s = time.perf_counter() - began
        full = predict_batches(model, batches, n, policy=None)  # warm-up runs
        early = predict_batches(model, batches, n, policy=policy)
        if reference is None:
            reference = early
        differ = (early.exit_layers != reference.exit_layers) | (early.predictions != reference.predictions)
        full_s, early_s = float("inf"), float("inf")
        for _ in range(args.repeat):  # alternate, so that a busy spell hits both kinds alike
            full_s = min(full_s, elapsed(lambda b=batches: predict_batches(model, b, n, policy=None)))
            early_s = min(early_s, elapsed(lambda b=batches: predict_batches(model, b, n, policy=policy)))
        wall, layer = full_s / early_s, early.speed_up
        rows.append(
            {
                "batch_size": batch_size,
                "tokenise_pad_s": prepare_s,
                "full_s": full_s,
                "early_exit_s": early_s,
                "wall_speed_up": wall,
                "layer_speed_up": layer,
                "token_layer_speed_up": token_layer_speed_up(batches, early.exit_layers, model.num_layers),
                "ratio": wall / layer,
                "mismatched_vs_first_batch_size": int(differ.sum()),
            }
        )

    metric = next(iter(compute_metrics(args.task, full.predictions, examples.labels)))
    full_score = compute_metrics(args.task, full.predictions, examples.labels)[metric]
    early_score = compute_metrics(args.task, reference.predictions, examples.labels)[metric]
    print(
        f"{args.task}/{args.split}: {len(examples)} inputs, L={model.num_layers}, max length {max_length}, "
        f"policy {policy!r}: mean exit layer {reference.mean_exit_layer:.2f}, {metric} full "
        f"{full_score:.4f} / early exit {early_score:.4f}"
    )
    print(f"{threads}; torch {__import__('torch').__version__}; {platform.processor() or platform.machine()}")
    print(f"best of {args.repeat} runs after a warm-up; model time (tokenise + pad timed apart, once)\n")
    print(
        "| batch size | tokenise + pad s | full s | early-exit s | wall speed-up | layer speed-up "
        "| token-weighted layer speed-up | wall / layer |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['tokenise_pad_s']:.3f} | {r['full_s']:.3f} | {r['early_exit_s']:.3f} "
            f"| {r['wall_speed_up']:.2f}x | {r['layer_speed_up']:.2f}x | {r['token_layer_speed_up']:.2f}x "
            f"| {r['ratio']:.2f} |"
        )
    bad = [r["batch_size"] for r in rows if r["mismatched_vs_first_batch_size"]]
    if bad:
        print(f"\nwarning: exits or predictions differ from batch size {args.batch_sizes[0]} at {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
