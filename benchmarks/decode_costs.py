"""What the parts of an early-exit decoding step cost on a real decoder, with no trained heads.

    python -m benchmarks.decode_costs --articles 5 --rounds 3

Early exit pays off in wall clock only if what it adds is cheap next to the layers it skips. Two of
those additions do not depend on how good the heads or the policy are, so they can be measured on
the decoder as it ships (its own LM head at every exit):

* **state propagation**: a token that exits at layer t still writes keys and values at layers
  t+1..L. Timed as a static exit at ``--static-layer`` with the skipped layers propagated in one
  batched product (``DecoderLayers.propagate_from``) against layer by layer (``propagate``).
* **a ConsistentEE decision**: a REINFORCE policy (``agents.make("reinforce", min_layer=...)``)
  whose networks never exit, so that every token asks it at every layer from ``--min-layer`` on and
  decodes at full depth: what remains against full depth is the decisions' cost. Timed on the
  state-only path (``Reinforce.exits_at_layer``) and on the observation path (``act`` on the joined
  observation), each decision also by :class:`~ee_gym.generation.costs.DecisionTimer` against the
  layers between them; and a policy probing every ``--every`` layers (``every=k``), whose other
  layers answer with one comparison.

Batch 1, greedy, ``--max-new-tokens`` per article; each round decodes every variant from the same
prefill in a rotated order, and medians over rounds are printed (tokens per second, and the speed-up
over full depth within each round). For the whole benchmark, with trained heads and ROUGE, see
``benchmarks/generation.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

import agents
from ee_gym.generation import MultiExitDecoder, PolicyExit, StaticExit
from ee_gym.generation.costs import DecisionTimer
from ee_gym.generation.data import format_prompt, load_xsum


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoder", default="smollm2", help="an embedded name, a hub name or a folder")
    parser.add_argument("--data-dir", default=None, help="holds xsum/xsum_0shot.jsonl ($EE_GYM_DATA)")
    parser.add_argument("--articles", type=int, default=5, help="the first N articles of the eval split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--static-layer", type=int, default=19, help="the static exit timed for propagation")
    parser.add_argument("--min-layer", type=int, default=11, help="the policy's first decision layer")
    parser.add_argument("--every", type=int, default=2, help="the probing interval of the sparse policy")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if min(args.articles, args.rounds, args.max_new_tokens, args.every) < 1:
        parser.error("--articles, --rounds, --max-new-tokens and --every must be 1 or more")
    return args


def _variants(decoder: MultiExitDecoder, args: argparse.Namespace) -> dict[str, tuple]:
    """name -> (exit rule, batched propagation?, state-only decisions?)."""
    if not 1 <= args.static_layer < decoder.num_layers or not 1 <= args.min_layer < decoder.num_layers:
        raise SystemExit(f"--static-layer and --min-layer must be in 1..{decoder.num_layers - 1}")
    rule, sparse = (never_exiting(decoder, args.min_layer, every) for every in (1, args.every))
    static = StaticExit(args.static_layer)
    return {
        "full depth": (None, True, True),
        f"static {args.static_layer}, batched propagation": (static, True, True),
        f"static {args.static_layer}, per-layer propagation": (static, False, True),
        "policy, state-only decisions": (rule, True, True),
        "policy, observation decisions": (rule, True, False),
        f"policy probing every {args.every} layers, state-only decisions": (sparse, True, True),
    }


def never_exiting(decoder: MultiExitDecoder, min_layer: int, every: int) -> PolicyExit:
    """A REINFORCE policy asked at every layer from ``min_layer`` (probing every ``every``-th) whose
    exit logit is -50: it never exits, so the token decodes at full depth plus its decisions."""
    policy = agents.make("reinforce", seed=0, obs_mode="state+layer", min_layer=min_layer, every=every)
    rule = PolicyExit(policy, decoder, label="never exits")
    with torch.no_grad():
        for net in rule.policy.net.layers:
            net[-1].bias.fill_(-50.0)
    return rule


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.no_grad():
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> list[dict]:
    decoder = MultiExitDecoder.from_pretrained(args.decoder, head_kind="shared")
    variants = _variants(decoder, args)
    adapter = decoder.layer_adapter
    prefilled = []
    for article in load_xsum("eval", args.data_dir, limit=args.articles):
        batch = decoder.tokenizer([format_prompt(decoder.tokenizer, article.article)], return_tensors="pt")
        prefilled.append((batch, *decoder.prefill(batch["input_ids"], batch["attention_mask"])))
    names = list(variants)
    speed = {name: [] for name in names}
    costs: dict[str, list] = {name: [] for name in names}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rule, batched, state_only = variants[name]
            adapter.batch_propagation = batched
            if isinstance(rule, PolicyExit):
                rule.state_path = rule.policy.exits_at_layer if state_only else None
            timer = DecisionTimer(rule) if rule is not None else None
            count, seconds = 0, 0.0
            for batch, first, state in prefilled:
                started = time.perf_counter()
                out = decoder.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                                       exit_fn=timer, prefilled=(first, state.clone()))  # fmt: skip
                seconds += time.perf_counter() - started
                count += out.tokens.numel() - 1  # the first token is the prompt pass's
            speed[name].append(count / seconds)
            tokens[name] = count
            if timer is not None and timer.cost.decisions and isinstance(rule, PolicyExit):
                costs[name].append(timer.cost)
    adapter.batch_propagation = True
    base = np.array(speed["full depth"])
    rows = []
    for name in names:
        row = {"variant": name, "tokens_per_round": tokens[name],
               "tokens_per_second": round(float(np.median(speed[name])), 2),
               "wall_speedup": round(float(np.median(np.array(speed[name]) / base)), 3)}  # fmt: skip
        if costs[name]:
            row["decision_us"] = round(float(np.median([c.decision_us for c in costs[name]])), 1)
            row["layer_us"] = round(float(np.median([c.layer_us for c in costs[name]])), 1)
            row["decision_fraction_of_layer"] = round(row["decision_us"] / row["layer_us"], 4)
            row["probe_us"] = round(float(np.median([c.probe_us for c in costs[name]])), 1)
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"articles": args.articles, "rounds": args.rounds, "threads": args.threads,
                      "machine": platform.machine(), "processor": platform.processor() or None}))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
