"""The ``ee-gym`` command.

ee-gym tasks                                  list the tasks and where their data comes from
ee-gym stage1 --task rte [--epochs 3 ...]     stage 1: train every exit (resumes if interrupted)
ee-gym train --task rte --agent reinforce --rounds 1 [--protocol held-out --stage1.epochs 2 ...]
                                              stage 1, then rounds of stage 2 + stage 3 (resumes)
ee-gym cache --task rte --split dev           build the per-layer cache of a trained model
ee-gym hardness --task rte                    histogram of the memorized layer on the train split
ee-gym predict --policy entropy --texts FILE  batched early-exit predictions (or --task/--split)

The options of ``stage1`` and ``train`` are generated from their config dataclasses (nested stage
sections as ``--stage1.<field>``); ``cache``, ``hardness`` and ``predict`` default to the stage-1
model of ``--protocol`` (default ``paper``: the one ``gym.make`` and the benchmarks use);
``stage1`` trains on ``--train-split`` (default ``train``, the ``paper`` protocol's) unless
``--protocol`` names one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence

import numpy as np

from ee_gym import paths
from ee_gym.cache import StaleCacheError
from ee_gym.files import CorruptFileError
from ee_gym.tasks import task_default


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls,
    skip: Sequence[str] = (),
    help: Mapping[str, str] | None = None,
    prefix: str = "",
) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, defaulting to the field's.

    A field that holds a nested config (a stage section of :class:`ee_gym.pipeline.PipelineConfig`)
    becomes a group of ``--<section>.<field>`` options (``--stage1.epochs``, ``--stage3.learning-rate``)
    for the fields the section sets itself (:func:`ee_gym.config.section_fields`); read them back
    with :func:`dataclass_from_args`. ``help``: a description per field name (else the field's
    ``metadata["help"]``, if any), shown before the default.
    """
    from ee_gym.config import section_fields

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if _is_section(f):
            stage_cls = f.default_factory
            own = section_fields(cls, stage_cls)
            group = parser.add_argument_group(f"{f.name} ({stage_cls.__name__})")
            add_dataclass_arguments(
                group,
                stage_cls,
                skip=[n.name for n in dataclasses.fields(stage_cls) if n.name not in own],
                prefix=f"{prefix}{f.name}.",
            )
            continue
        kind = _scalar_type(hints[f.name])
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = prefix + f.name
        text = (help or {}).get(f.name) or f.metadata.get("help")
        if kind is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default, help=text
            )
        else:
            default = f"(default: {f.default})"
            parser.add_argument(
                flag, dest=dest, type=kind, default=f.default, help=f"{text} {default}" if text else default
            )


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = "", **extra):
    """The ``cls`` config that :func:`add_dataclass_arguments` options parsed into ``args`` describe
    (each section built from its ``--<section>.<field>`` options); ``extra``: more keywords."""
    values = vars(args)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _is_section(f):
            kwargs[f.name] = dataclass_from_args(f.default_factory, args, f"{prefix}{f.name}.")
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs, **extra)


def _is_section(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def _scalar_type(hint) -> type:
    """int | None -> int, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _legacy_type(cls, target: str) -> type:
    """The scalar type of ``<section>.<field>`` of the config class ``cls``."""
    section, name = target.split(".")
    stage_cls = next(f.default_factory for f in dataclasses.fields(cls) if f.name == section)
    return _scalar_type(typing.get_type_hints(stage_cls)[name])


def _cmd_tasks(args: argparse.Namespace) -> int:
    from ee_gym.tasks import data_status, get_task, task_names

    source = paths.data_dir(args.data_dir)
    print(f"data: {source if source else 'Hugging Face hub (set EE_GYM_DATA for a local folder)'}")
    for name in task_names():
        spec = get_task(name)
        status = data_status(spec, args.data_dir)
        print(f"  {name:8s} labels={','.join(spec.labels)} metric={spec.metric}  data: {status}")
    return 0


def _cmd_stage1(args: argparse.Namespace) -> int:
    from ee_gym.protocols import get_protocol
    from ee_gym.training import Stage1Config, format_layer_metrics, train_stage1

    fields = {f.name for f in dataclasses.fields(Stage1Config)}
    settings = {k: v for k, v in vars(args).items() if k in fields}
    if args.protocol is not None:  # the protocol's stage-1 split (held-out: the model gym.make uses)
        if args.train_split not in ("train", get_protocol(args.protocol).stage1_split):
            raise ValueError("give --protocol or --train-split, not both")
        settings["train_split"] = get_protocol(args.protocol).stage1_split
    config = Stage1Config(**settings)
    result = train_stage1(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch: main process only
        return 0
    print(f"model: {result.model_dir}")
    if result.history:
        print(format_layer_metrics(config.task, result.history[-1]["dev"], prefix="final dev"))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ee_gym.pipeline import PipelineConfig, train_pipeline

    legacy = {k.removeprefix("legacy."): v for k, v in vars(args).items() if k.startswith("legacy.")}
    result = train_pipeline(dataclass_from_args(PipelineConfig, args, **legacy))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch: main process only
        return 0
    print(f"model: {result.model_dir}\npolicy: {result.policy_dir}")
    print(format_stages(result.stages))
    return 0


def format_stages(stages: list[dict]) -> str:
    """A Markdown table of the pipeline's dev scores, one row per finished stage."""
    lines = ["| stage | dev metric | mean exit | speed-up | full depth |", "|---|---|---|---|---|"]
    for record in stages:
        dev = record.get("dev")
        if not dev:
            continue
        full = dev.get("full_depth", {})
        metric = next(iter(full), None)
        score = f"{100 * dev[metric]:.1f}" if metric in dev else ""
        exit_layer = f"{dev['mean_exit_layer']:.2f}" if "mean_exit_layer" in dev else ""
        speedup = f"{dev['speedup']:.2f}x" if "speedup" in dev else ""
        full_score = f"{metric} {100 * full[metric]:.1f}" if metric else ""
        lines.append(f"| {record['stage']} | {score} | {exit_layer} | {speedup} | {full_score} |")
    return "\n".join(lines)


def _cmd_cache(args: argparse.Namespace) -> int:
    from ee_gym.cache import build_cache
    from ee_gym.multiexit import MultiExitModel
    from ee_gym.training import format_layer_metrics

    model = MultiExitModel.from_pretrained(_model_dir(args))
    max_length = args.max_length or task_default(args.task, "max_length")
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

    model = MultiExitModel.from_pretrained(_model_dir(args))
    max_length = task_default(args.task, "max_length")
    cache = build_cache(model, args.task, "train", data_dir=args.data_dir, max_length=max_length)
    counts = np.bincount(cache.memorized, minlength=cache.num_layers + 1)[1:]
    print(f"memorized layer on {args.task}/train ({cache.num_inputs} inputs):")
    for layer, count in enumerate(counts, start=1):
        print(f"  m={layer:2d}: {count:6d}  {'#' * int(60 * count / max(counts.max(), 1))}")
    return 0


def _model_dir(args: argparse.Namespace):
    """``--model``, else the stage-1 model of (task, backbone) under ``--protocol``: the one the main
    job (``benchmarks.compare``, ``gym.make``) trains, in its default folder."""
    if args.model:
        return args.model
    from ee_gym.protocols import get_protocol
    from ee_gym.training import default_stage1_dir

    return default_stage1_dir(args.task, args.backbone, get_protocol(args.protocol).stage1_split) / "model"


def _policy_from_args(args: argparse.Namespace):
    """None (full depth), a saved policy folder, or a registry name with --policy-arg pairs."""
    if args.policy is None:
        if args.policy_arg:
            raise ValueError("--policy-arg needs --policy")
        return None
    import json
    from pathlib import Path

    from ee_gym.policy import load_policy, make_policy  # the registry: the core never imports agents

    if Path(args.policy).is_dir():
        if args.policy_arg:
            raise ValueError("--policy-arg applies to a policy name, not to a saved policy folder")
        return load_policy(args.policy)
    kwargs = {}
    for pair in args.policy_arg:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--policy-arg wants key=value, got {pair!r}")
        try:
            kwargs[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.replace("-", "_")] = value
    return make_policy(args.policy, **kwargs)


def _calibrated(args: argparse.Namespace, model, policy):
    """``policy``, or, for a rule named with no settings (and ``--calibrate``), that rule with the
    setting calibrated on a validation slice of this model's policy-split table (built once, cached)."""
    from pathlib import Path

    if policy is None or policy.learns or not policy.deployable or args.policy_arg or not args.calibrate:
        return policy
    if Path(args.policy).is_dir():
        return policy
    from ee_gym.envs.prepare import policy_table
    from ee_gym.evaluation import calibrated_rule, validation_split
    from ee_gym.policy import make_policy
    from ee_gym.protocols import get_protocol

    split = get_protocol(args.protocol).policy_split
    table = policy_table(model, args.task, args.protocol, backbone=args.backbone, data_dir=args.data_dir)
    params = calibrated_rule(args.policy, validation_split(table)[1])
    print(
        f"ee-gym: {args.policy} calibrated on a validation slice of {split} for this model: {params} "
        "(--no-calibrate for the class default)",
        file=sys.stderr,
    )
    return make_policy(args.policy, **params)


def _read_texts(path: str) -> tuple[list[str], list[str] | None]:
    """One text per line, or two tab-separated columns per line for pairs; blank lines skipped."""
    from pathlib import Path

    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = ["\t" in line for line in lines]
    if any(pairs) and not all(pairs):
        raise ValueError(
            f"{path}: some lines have a tab and some do not (pairs need two columns on every line)"
        )
    if lines and all(pairs):
        split = [line.split("\t", 1) for line in lines]
        return [a for a, _ in split], [b for _, b in split]
    return lines, None


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from ee_gym.inference import predict, predict_split
    from ee_gym.multiexit import MultiExitModel
    from ee_gym.tasks import get_task

    if args.texts and args.split:
        raise ValueError("give --texts or --split, not both")
    model = MultiExitModel.from_pretrained(_model_dir(args))
    policy = _calibrated(args, model, _policy_from_args(args))
    max_length = args.max_length or task_default(args.task, "max_length")
    options = dict(policy=policy, batch_size=args.batch_size, max_length=max_length)
    if args.texts:
        text_a, text_b = _read_texts(args.texts)
        if args.limit is not None:
            text_a, text_b = text_a[: args.limit], None if text_b is None else text_b[: args.limit]
        out = predict(model, text_a, text_b, **options)
    else:
        split = args.split or "dev"
        out = predict_split(model, args.task, split, data_dir=args.data_dir, limit=args.limit, **options)
        from ee_gym.tasks import load_split

        examples = load_split(args.task, split, args.data_dir, args.limit)
        text_a, text_b = examples.text_a, examples.text_b
    names = model.config.labels
    if not names and len(get_task(args.task).labels) == model.num_labels:
        names = list(get_task(args.task).labels)
    names = list(names or range(model.num_labels))
    stream = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        for i, text in enumerate(text_a):
            record = {"text": text}
            if text_b is not None:
                record["text_b"] = text_b[i]
            prediction = int(out.predictions[i])
            record.update(
                prediction=prediction,
                label=str(names[prediction]),
                exit_layer=int(out.exit_layers[i]),
                probability=round(float(out.probabilities[i, prediction]), 6),
            )
            if out.labels is not None:
                record["gold"] = str(names[int(out.labels[i])])
            stream.write(json.dumps(record) + "\n")
    finally:
        if stream is not sys.stdout:
            stream.close()
    summary = sys.stdout if args.output else sys.stderr  # JSON lines own stdout when no --output
    print(
        f"{len(out)} inputs, policy {policy if policy is not None else 'full depth'}: mean exit layer "
        f"{out.mean_exit_layer:.2f} / {out.num_layers}, layer speed-up {out.speed_up:.2f}x, {out.seconds:.2f} s",
        file=summary,
    )
    scores = {
        k: v
        for k, v in out.metrics.items()
        if k not in ("mean_exit_layer", "speed_up", "saved_layers", "seconds")
    }
    if scores:
        print(", ".join(f"{k} {v:.4f}" for k, v in scores.items()), file=summary)
    if args.output:
        print(f"predictions -> {args.output}")
    return 0


def _add_protocol_argument(
    parser: argparse.ArgumentParser,
    text: str = "whose stage-1 model is the default --model: the one trained on its stage-1 split",
) -> None:
    from ee_gym.protocols import DEFAULT_PROTOCOL, protocol_choices

    parser.add_argument(
        "--protocol",
        default=DEFAULT_PROTOCOL,
        type=protocol_type,
        help=f"{text}: {protocol_choices()} (default: {DEFAULT_PROTOCOL})",
    )


def protocol_type(value: str) -> str:
    """argparse ``type=`` of a --protocol option: the canonical name, or a usage error naming the choices."""
    from ee_gym.protocols import check_protocol
    from ee_gym.validation import ConfigError

    try:
        return check_protocol(value)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_stage1_arguments(p: argparse.ArgumentParser) -> None:
    """``ee-gym stage1``'s options: every Stage1Config field, and --protocol."""
    from ee_gym.training import Stage1Config

    add_dataclass_arguments(p, Stage1Config)
    p.add_argument(
        "--protocol",
        default=None,
        type=protocol_type,
        help="train on this protocol's stage-1 split instead of --train-split; held-out: the model "
        "gym.make and the benchmarks use by default",
    )


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``ee-gym train``'s options: every PipelineConfig field, nested sections included, and the
    hidden flat flags of earlier releases."""
    from ee_gym.pipeline import LEGACY_FIELDS, PipelineConfig

    add_dataclass_arguments(p, PipelineConfig)
    for name in LEGACY_FIELDS:  # deprecated flat flags: hidden, passed on as PipelineConfig's legacy keywords
        legacy_type = _legacy_type(PipelineConfig, LEGACY_FIELDS[name][0])
        flag = "--" + name.replace("_", "-")
        if legacy_type is bool:
            p.add_argument(
                flag,
                dest=f"legacy.{name}",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        else:
            p.add_argument(
                flag,
                dest=f"legacy.{name}",
                type=legacy_type,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ee-gym`` parser. ``command`` names the one subcommand whose options are needed: the
    options of ``stage1`` and ``train`` come from config dataclasses whose modules import torch, so
    ``ee-gym --help`` (``command=""``) builds neither and answers at once; None builds every one."""
    parser = argparse.ArgumentParser(prog="ee-gym", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="list the tasks")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=_cmd_tasks)

    p = sub.add_parser("stage1", help="stage 1: fine-tune backbone and all exits")
    p.set_defaults(func=_cmd_stage1)
    if command in (None, "stage1"):
        _add_stage1_arguments(p)
    p = sub.add_parser(
        "train",
        help="the whole method: stage 1, then rounds of stage 2 + stage 3",
        description="Every PipelineConfig setting is an option; a stage's own are --stage1.*, --stage2.*, "
        "--stage3.* (the flat --stage1-epochs, --policy-batch-size, ... of earlier releases still work).",
    )
    p.set_defaults(func=_cmd_train)
    if command in (None, "train"):
        _add_train_arguments(p)

    for name, func, help_text in (
        ("cache", _cmd_cache, "build the per-layer cache of a trained model"),
        ("hardness", _cmd_hardness, "show the memorized-layer histogram of the train split"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--task", default="rte")
        p.add_argument("--backbone", default="minilm-l6", help="locates the default stage-1 model")
        p.add_argument("--model", default=None, help="a multi-exit model folder (default: stage 1's)")
        _add_protocol_argument(p)
        p.add_argument("--data-dir", default=None)
        p.set_defaults(func=func)
    cache_parser = sub.choices["cache"]
    cache_parser.add_argument("--split", nargs="+", default=["train", "dev"])
    cache_parser.add_argument("--output", default=None, help="cache folder (one split only)")
    cache_parser.add_argument("--max-length", type=int, default=None)
    cache_parser.add_argument("--limit", type=int, default=None)
    cache_parser.add_argument("--batch-size", type=int, default=64)
    cache_parser.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("predict", help="batched early-exit predictions for texts or a task split")
    p.add_argument("--task", default="rte", help="the split's task; locates the default model")
    p.add_argument("--backbone", default="minilm-l6", help="locates the default stage-1 model")
    p.add_argument("--model", default=None, help="a multi-exit model folder (default: stage 1's)")
    _add_protocol_argument(p)
    p.add_argument(
        "--policy", default=None, help="a saved policy folder or a policy name (default: full depth)"
    )
    p.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE", help="for a policy name")
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a rule named with no --policy-arg takes the fastest setting of its sweep within 1 point of "
        "full depth on a validation slice of the protocol's policy split (ee_gym.evaluation.calibrated_rule); "
        "--no-calibrate: the class default",
    )
    p.add_argument("--texts", default=None, metavar="FILE", help="one text per line, or text<TAB>text pairs")
    p.add_argument("--split", default=None, help="a split of --task (default: dev, unless --texts)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="(default: the task's default)")
    p.add_argument("--output", default=None, metavar="FILE", help="JSON lines (default: stdout)")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # only the subcommand asked for builds its options (``ee-gym --help`` imports no torch)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command == "cache" and args.output and len(args.split) > 1:
        parser.error("--output names one cache folder: give one --split with it")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, CorruptFileError, StaleCacheError) as error:
        print(f"ee-gym: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
