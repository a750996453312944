"""The ``ee-gym`` command.

ee-gym tasks                                  list the tasks and where their data comes from
ee-gym stage1 --task rte [--epochs 3 ...]     stage 1: train every exit (resumes if interrupted)
ee-gym cache --task rte --split dev           build the per-layer cache of a trained model
ee-gym hardness --task rte                    histogram of the memorized layer on the train split
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence

import numpy as np

from ee_gym import paths
from ee_gym.training import Stage1Config, format_layer_metrics


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, defaulting to the field's."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _scalar_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f"(default: {f.default})")


def _scalar_type(hint) -> type:
    """int | None -> int, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _cmd_tasks(args: argparse.Namespace) -> int:
    from ee_gym.tasks import get_task, task_names

    source = paths.data_dir(args.data_dir)
    print(f"data: {source if source else 'Hugging Face hub (set EE_GYM_DATA for a local folder)'}")
    for name in task_names():
        spec = get_task(name)
        print(f"  {name:8s} labels={','.join(spec.labels)} metric={spec.metric}")
    return 0


def _cmd_stage1(args: argparse.Namespace) -> int:
    from ee_gym.training import train_stage1

    fields = {f.name for f in dataclasses.fields(Stage1Config)}
    config = Stage1Config(**{k: v for k, v in vars(args).items() if k in fields})
    result = train_stage1(config)
    print(f"model: {result.model_dir}")
    if result.history:
        print(format_layer_metrics(config.task, result.history[-1]["dev"], prefix="final dev"))
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from ee_gym.cache import build_cache
    from ee_gym.multiexit import MultiExitModel
    from ee_gym.training import Stage1Config, default_stage1_dir

    model_dir = args.model or default_stage1_dir(args.task, args.backbone) / "model"
    model = MultiExitModel.from_pretrained(model_dir)
    max_length = args.max_length or Stage1Config(task=args.task).resolved().max_length
    for split in args.split:
        cache = build_cache(
            model,
            args.task,
            split,
            args.output,
            data_dir=args.data_dir,
            max_length=max_length,
            limit=args.limit,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
        )
        print(
            f"{split}: {cache.num_inputs} inputs, {cache.num_layers} layers, "
            f"states {cache.manifest['state_dtype']} -> {cache.folder}"
        )
        print(format_layer_metrics(args.task, cache.manifest["layer_metrics"], prefix=f"{split}"))
    return 0


def _cmd_hardness(args: argparse.Namespace) -> int:
    from ee_gym.cache import build_cache
    from ee_gym.multiexit import MultiExitModel
    from ee_gym.training import Stage1Config, default_stage1_dir

    model_dir = args.model or default_stage1_dir(args.task, args.backbone) / "model"
    model = MultiExitModel.from_pretrained(model_dir)
    max_length = Stage1Config(task=args.task).resolved().max_length
    cache = build_cache(model, args.task, "train", data_dir=args.data_dir, max_length=max_length)
    counts = np.bincount(cache.memorized, minlength=cache.num_layers + 1)[1:]
    print(f"memorized layer on {args.task}/train ({cache.num_inputs} inputs):")
    for layer, count in enumerate(counts, start=1):
        print(f"  m={layer:2d}: {count:6d}  {'#' * int(60 * count / max(counts.max(), 1))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ee-gym", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="list the tasks")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("stage1", help="stage 1: fine-tune backbone and all exits")
    add_dataclass_arguments(p, Stage1Config)
    p.set_defaults(func=_cmd_stage1)

    for name, func, help_text in (
        ("cache", _cmd_cache, "build the per-layer cache of a trained model"),
        ("hardness", _cmd_hardness, "show the memorized-layer histogram of the train split"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--task", default="rte")
        p.add_argument("--backbone", default="minilm-l6", help="locates the default stage-1 model")
        p.add_argument("--model", default=None, help="a multi-exit model folder (default: stage 1's)")
        p.add_argument("--data-dir", default=None)
        p.set_defaults(func=func)
    cache_parser = sub.choices["cache"]
    cache_parser.add_argument("--split", nargs="+", default=["train", "dev"])
    cache_parser.add_argument("--output", default=None, help="cache folder (one split only)")
    cache_parser.add_argument("--max-length", type=int, default=None)
    cache_parser.add_argument("--limit", type=int, default=None)
    cache_parser.add_argument("--batch-size", type=int, default=64)
    cache_parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "output", None) and len(getattr(args, "split", [])) > 1:
        build_parser().error("--output names one cache folder: give one --split with it")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"ee-gym: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
