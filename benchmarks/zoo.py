"""What a user gets from rl-zoo3 on an ee-gym id: ee-gym's shipped hyperparameter file against the
zoo's own ``default:`` fallback, both scored on the env's dev table.

    python -m benchmarks.zoo --env ConsistentEE-RTE-v0 --algo ppo --gym-packages ee_gym
    python -m benchmarks.zoo --env ConsistentEE-RTE-v0 --algo ppo --fallback-timesteps 100000
    python -m benchmarks.zoo --env ConsistentEE-RTE-v0 --algo dqn --timesteps 512 --fallback-timesteps 512  # smoke
    python -m benchmarks.zoo --env ConsistentEE-mytask-v0 --algo a2c --gym-packages mypackage \\
        --env-kwargs "model:'path/to/model'"

Two runs of ``python -m rl_zoo3.train`` (subprocesses, the same ``--seed``, each in its own log folder
under ``--output-dir``, each timed in wall seconds):

* ``shipped``: ``--conf-file ee_gym/zoo/<algo>.yml`` (``python -m ee_gym.zoo <algo>``): the id's entry,
  or the file's ``default`` for your own tasks (``env_kwargs: obs_mode: state+layer``);
* ``fallback``: no ``--conf-file``. The zoo then reads its own ``hyperparams/<algo>.yml``, which has no
  entry for an ee-gym id, and takes its ``default:`` entry (``rl_zoo3/exp_manager.py``,
  ``read_hyperparameters``: ``elif "default" in hyperparams_dict: print("Using 'default'
  hyperparameters")``): ``n_timesteps: 1e6``, ``policy: MlpPolicy``, one env, the algorithm's own SB3
  defaults and the env's default observation mode. Nothing is needed to reach it; ``--fallback-timesteps
  N`` caps it with the zoo's ``-n N`` (the output says so).

Each saved model (``logs/<algo>/<env>_<n>/<env>.zip``) is loaded with SB3's ``<Algo>.load``, put in the
suite's SB3 policy of that algorithm (``agents.sb3``: ``act`` is ``model.predict``) with the observation
mode it trained on, and scored by the suite's evaluation (``agents.evaluate.evaluate``) on the env's dev
table: the task metric (points), the layer speed-up (L / mean exit layer), the mean exit layer, the
timesteps trained, the wall seconds; the full model's dev metric beside them. Written to
``--output-dir`` (default ``ee-gym-results/zoo/<env>-<algo>``): ``results.md`` and ``results.json``
(the exact commands, versions, machine, threads; ``paired``, ``protocol`` and ``curves`` of the results
contract of :mod:`benchmarks.paired`, each run one point, ``mde_auc`` None and ``mde_metric`` instead).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: where results go when --output-dir is not given (relative to the working folder)
USER_RESULTS = Path("ee-gym-results") / "zoo"
RUNS = ("shipped", "fallback")


@dataclass
class ZooArgs:
    """Arguments of the benchmark (every field is a ``--flag``)."""

    env: str = "ConsistentEE-RTE-v0"  # an ee-gym classification id (your own: its package in gym_packages)
    algo: str = "ppo"  # a zoo algorithm ee-gym ships a file for (ee_gym.zoo.ZOO_ALGOS)
    gym_packages: list[str] = field(default_factory=lambda: ["ee_gym"])  # imported by the zoo and here
    env_kwargs: list[str] = field(default_factory=list)  # the zoo's KEY:VALUE (a Python value), both runs
    seed: int = 0
    output_dir: str | None = None  # None: ee-gym-results/zoo/<env>-<algo>
    timesteps: int | None = None  # cap of the shipped run (the zoo's -n); None: the file's n_timesteps
    fallback_timesteps: int | None = None  # cap of the fallback (-n); None: the zoo's default (1e6)
    device: str = "cpu"  # the zoo's --device: small MLP policies train fastest on the CPU
    threads: int = 1  # the zoo's --num-threads, and torch's threads while scoring


HELP = {
    "env": "the env id: ConsistentEE-<Task>-v0 (a task of your own: register it in a package and pass "
    "that package with --gym-packages)",
    "algo": "the zoo algorithm: ppo, a2c, dqn or qrdqn (the ones ee-gym ships a file for)",
    "gym_packages": "packages the zoo imports before making the env (--gym-packages of rl_zoo3.train)",
    "env_kwargs": "env keywords for both runs, in the zoo's KEY:VALUE form (VALUE a Python expression, "
    "e.g. model:'path/to/model')",
    "seed": "the seed of both runs",
    "output_dir": "where results.md, results.json and the runs' logs go",
    "timesteps": "cap the shipped run's training steps (the zoo's -n); default: the file's n_timesteps",
    "fallback_timesteps": "cap the fallback's training steps (the zoo's -n); default: the zoo's own (1e6)",
    "device": "the zoo's --device",
    "threads": "torch threads of training (the zoo's --num-threads) and of scoring",
}


class ZooError(SystemExit):
    """A one-line error naming the fix, raised before any training."""

    def __init__(self, message: str):
        super().__init__(f"benchmarks.zoo: error: {message}")


def parse_args(argv: list[str] | None = None) -> ZooArgs:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.split("\n\n")[0])
    defaults = ZooArgs()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, nargs="+", default=value, help=HELP[name])
        else:
            kind = {"seed": int, "timesteps": int, "fallback_timesteps": int, "threads": int}.get(name, str)
            parser.add_argument(flag, type=kind, default=value, help=f"{HELP[name]} (default: {value})")
    return ZooArgs(**vars(parser.parse_args(argv)))


def parse_env_kwargs(items: list[str]) -> dict[str, Any]:
    """KEY:VALUE items read as the zoo reads them (``rl_zoo3.utils.StoreDict``: VALUE is eval'ed), so
    that this process makes the env the zoo made."""
    found = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise ZooError(f"--env-kwargs {item!r} is not KEY:VALUE: write e.g. model:'path/to/model'")
        try:
            found[key] = eval(value)  # the zoo's own reading of the same text (a user's command line)
        except Exception as err:
            raise ZooError(
                f"--env-kwargs {item!r}: {value!r} is not a Python value ({err}); quote strings: {key}:'...'"
            ) from None
    return found


def check_args(args: ZooArgs) -> dict[str, Any]:
    """Every check that can fail before training, each a :class:`ZooError` naming the fix. Returns
    the user's env keywords (parsed)."""
    from ee_gym.zoo import ZOO_ALGOS

    if importlib.util.find_spec("rl_zoo3") is None:
        raise ZooError("rl-zoo3 is not installed: pip install -e '.[zoo]' (or pip install 'rl-zoo3>=2.9')")
    if args.algo not in ZOO_ALGOS:
        raise ZooError(f"unknown --algo {args.algo!r}: ee-gym ships rl-zoo3 files for {', '.join(ZOO_ALGOS)}")
    if args.algo == "qrdqn" and importlib.util.find_spec("sb3_contrib") is None:
        raise ZooError("--algo qrdqn needs sb3-contrib: pip install sb3-contrib (or ee-gym[contrib])")
    for name in ("timesteps", "fallback_timesteps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ZooError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for package in args.gym_packages:  # what the zoo imports: the ids they register must be found here too
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise ZooError(
                f"--gym-packages {package!r} cannot be imported ({err}): install it or fix the name"
            ) from None
    from ee_gym.envs import registered_ids

    classification = registered_ids("classification")
    if args.env not in classification:
        what = "a generation env (token-level exits)" if args.env in registered_ids("generation") else None
        raise ZooError(
            f"--env {args.env!r} is {what or 'not an ee-gym id'}: this benchmark scores the classification "
            f"ids ({', '.join(i for i in classification if 'zootiny' not in i)}); a task of your own: "
            "register it (ee_gym.tasks.task_from_files) in a package and pass it with --gym-packages"
        )
    return parse_env_kwargs(args.env_kwargs)


def zoo_hyperparameters(algo: str) -> Path:
    """The zoo's own hyperparameter file, what ``rl_zoo3.train`` reads without ``--conf-file``
    (found without importing the zoo)."""
    origin = importlib.util.find_spec("rl_zoo3").origin
    return Path(origin).parent / "hyperparams" / f"{algo}.yml"


def entry_of(path: Path, env: str) -> tuple[str, dict[str, Any]]:
    """(entry name, hyperparameters) the zoo takes from ``path`` for ``env`` (its own rule: the id's
    entry, else ``default``; ee-gym ids are not Atari)."""
    import yaml

    entries = yaml.safe_load(path.read_text())  # as the zoo reads it
    name = env if env in entries else "default"
    return name, dict(entries[name])


def env_kwargs_used(entry: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The env keywords the zoo trains with: ``--env-kwargs`` replace the entry's ``env_kwargs`` as a
    whole when both are there (exp_manager.read_hyperparameters), so the shipped run is given both merged."""
    return {**entry.get("env_kwargs", {}), **given}


def zoo_command(args: ZooArgs, log_folder: Path, conf_file: Path | None, kwargs: list[str],
                cap: int | None) -> list[str]:  # fmt: skip
    command = [
        sys.executable, "-m", "rl_zoo3.train", "--algo", args.algo, "--env", args.env,
        "--gym-packages", *args.gym_packages, "--seed", str(args.seed), "-f", str(log_folder),
        # dev scores both runs; the zoo's periodic 5-episode evaluations would only add time
        "--eval-freq", "-1", "--device", args.device, "--num-threads", str(args.threads),
    ]  # fmt: skip
    if conf_file is not None:
        command += ["--conf-file", str(conf_file)]
    if kwargs:
        command += ["--env-kwargs", *kwargs]
    if cap is not None:
        command += ["-n", str(cap)]
    return command


def latest_model(log_folder: Path, algo: str, env: str) -> Path:
    """``logs/<algo>/<env>_<n>/<env>.zip`` of the highest ``n`` (the run just made, on a rerun too)."""
    found = []
    for path in (log_folder / algo).glob(f"{env}_*/{env}.zip"):
        with contextlib.suppress(ValueError):
            found.append((int(path.parent.name.rsplit("_", 1)[1]), path))
    if not found:
        raise RuntimeError(f"rl_zoo3.train finished but saved no {env}.zip under {log_folder / algo}")
    return max(found)[1]


def train(name: str, command: list[str], folder: Path) -> tuple[float, str]:
    """Run one zoo training; (wall seconds, its stdout). The output goes to ``folder/train.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {shlex.join(command)}", flush=True)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    log = folder / "train.log"
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(
            f"benchmarks.zoo: error: the {name} run failed (exit {done.returncode}; {log}):\n{tail}"
        )
    return seconds, done.stdout


def score(args: ZooArgs, model_path: Path, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """The saved model on the env's dev table: (its numbers, the table, the per-input result)."""
    import gymnasium as gym

    from agents.evaluate import evaluate
    from agents.sb3 import A2CPolicy, DQNPolicy, PPOPolicy

    suite = {"ppo": PPOPolicy, "a2c": A2CPolicy, "dqn": DQNPolicy}
    if args.algo == "qrdqn":
        from agents.sb3 import QRDQNPolicy

        suite["qrdqn"] = QRDQNPolicy
    if any(model_path.parent.glob("**/vecnormalize.pkl")):  # neither file normalises; a user's might
        raise SystemExit(f"benchmarks.zoo: error: {model_path.parent} normalised observations (vecnormalize.pkl), "
                         "which this benchmark does not replay: drop normalize from the hyperparameters")  # fmt: skip
    # the env the zoo made, on dev: its obs_mode is the one the model reads (the env's default when
    # the hyperparameters name none)
    env = gym.make(args.env, disable_env_checker=True, **{**kwargs, "split": "dev"}).unwrapped
    policy = suite[args.algo](obs_mode=env.encoder.mode)
    policy.model = policy.algorithm.load(model_path, device="cpu")
    if policy.model.observation_space != env.observation_space:
        raise SystemExit(f"benchmarks.zoo: error: {model_path} reads {policy.model.observation_space}, the dev "
                         f"env serves {env.observation_space}: pass the env keywords it trained with")  # fmt: skip
    result = evaluate(policy, env.table)
    numbers = {
        "obs_mode": env.encoder.mode,
        "metric": 100 * result.score,
        "metrics": {k: 100 * v for k, v in result.metrics.items()},
        "speedup": result.speedup,
        "mean_exit_layer": result.mean_exit_layer,
        "exit_histogram": result.exit_histogram,
        "timesteps": int(policy.model.num_timesteps),
    }
    return numbers, env.table, result


def paired_verdicts(table: Any, results: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Shipped against fallback, and each against the full model: the paired bootstrap of the metric
    difference over the dev inputs (one training seed each, so the interval holds the inputs only)."""
    from benchmarks import paired
    from ee_gym.evaluation import evaluate
    from ee_gym.policy import make_policy

    full = paired.Outcome.from_eval(evaluate(make_policy("static", layer=table.num_layers), table))
    setup = paired.Setup.for_task(table.task, table.num_layers, table.labels, full)
    curves = {name: paired.Curve(name, (paired.Outcome.from_eval(r, seed),)) for name, r in results.items()}
    reference = paired.Curve("full model", (full,))
    pairs = [
        (curves["shipped"], curves["fallback"]),
        (curves["shipped"], reference),
        (curves["fallback"], reference),
    ]
    return [paired.metric_difference(setup, a, b) for a, b in pairs]


def verdict_lines(records: list[dict[str, Any]]) -> list[str]:
    from benchmarks.paired import verdict

    return [
        f"- {r['policy']} {verdict(r)} {r['reference']}: {r['delta']:+.1f} (95% {r['low']:+.1f} to {r['high']:+.1f}) "
        f"at {r['policy']}'s {r['statistic'].split('@')[1]}"
        for r in records
    ]


def contract_fields(record: dict[str, Any], protocol: str) -> dict[str, Any]:
    """The results contract's keys (benchmarks.paired) for two single-run policies: ``protocol``,
    ``curves`` (each run and the full model one ``[layer speed-up, metric]`` point, what the paired
    verdicts read), ``mde_auc`` None (no curve to integrate) and ``mde_metric``, the half-width of the
    shipped-against-fallback interval: the smallest metric difference this setup resolves."""
    first = record["paired"][0]
    curves = {name: [[run["speedup"], run["metric"]]] for name, run in record["runs"].items()}
    return {
        "protocol": protocol,
        "curves": {**curves, "full model": [[1.0, record["full_model_metric"]]]},
        "mde_auc": None,
        "mde_metric": (first["high"] - first["low"]) / 2,
    }


def machine(threads: int, device: str) -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"machine": platform.machine(), "processor": platform.processor(), "cores": os.cpu_count(),
            "threads": threads, "device": device, "load_1min": round(load, 2)}  # fmt: skip


def short(path: str) -> str:
    """``ee_gym/zoo/ppo.yml``, ``rl_zoo3/hyperparams/ppo.yml``: the file, where it lives."""
    return "/".join(Path(path).parts[-3:])


def markdown(record: dict[str, Any]) -> str:
    metric, runs, layers = record["metric"], record["runs"], record["num_layers"]
    lines = [
        f"| run | hyperparameters | timesteps | wall s | dev {metric} | layer speed-up | mean exit layer |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in RUNS:
        run = runs[name]
        cap = f" (capped: -n {run['timesteps_cap']})" if run["timesteps_cap"] else ""
        lines.append(
            f"| {name} | `{short(run['file'])}`: `{run['entry']}`{cap} | {run['timesteps']:,} | {run['wall_s']:.0f} | "
            f"{run['metric']:.1f} | {run['speedup']:.2f}x | {run['mean_exit_layer']:.2f} |"
        )
    lines.append(
        f"| full model | (no early exit) | | | {record['full_model_metric']:.1f} | 1.00x | {layers} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = check_args(args)  # every bad input ends here, before any training
    from benchmarks.compare import versions
    from ee_gym.files import write_text_atomic
    from ee_gym.protocols import DEFAULT_PROTOCOL
    from ee_gym.zoo import conf_file

    began = time.perf_counter()
    out = Path(args.output_dir or USER_RESULTS / f"{args.env}-{args.algo}")
    out.mkdir(parents=True, exist_ok=True)
    shipped_file, zoo_file = conf_file(args.algo), zoo_hyperparameters(args.algo)
    plans = {}
    for name, path, cap in (("shipped", shipped_file, args.timesteps),
                            ("fallback", zoo_file, args.fallback_timesteps)):  # fmt: skip
        entry_name, entry = entry_of(path, args.env)
        kwargs = env_kwargs_used(entry, given)
        # the user's items as typed; the shipped file's own keywords added (the zoo would drop them)
        items = list(args.env_kwargs)
        if items and name == "shipped":
            items += [f"{k}:{v!r}" for k, v in entry.get("env_kwargs", {}).items() if k not in given]
        command = zoo_command(args, out / name / "logs", path if name == "shipped" else None, items, cap)
        plans[name] = dict(
            entry_name=entry_name, entry=entry, kwargs=kwargs, command=command, cap=cap, path=path
        )

    import torch

    torch.set_num_threads(args.threads)  # this process only scores; the zoo gets --num-threads
    runs, results = {}, {}
    for name, plan in plans.items():
        seconds, stdout = train(name, plan["command"], out / name)
        if plan["entry_name"] == "default" and "Using 'default' hyperparameters" not in stdout:
            print(f"benchmarks.zoo: warning: the {name} run did not say it used 'default'", file=sys.stderr)
        model_path = latest_model(out / name / "logs", args.algo, args.env)
        numbers, table, results[name] = score(args, model_path, plan["kwargs"])
        runs[name] = {
            "file": str(plan["path"]),
            "entry": plan["entry_name"],
            "hyperparameters": plan["entry"],
            "n_timesteps": int(plan["cap"] or plan["entry"]["n_timesteps"]),  # asked for; timesteps: done
            "timesteps_cap": plan["cap"],
            "wall_s": round(seconds, 1),
            **numbers,
            "model": str(model_path),
            "command": shlex.join(plan["command"]),
        }
    from ee_gym.evaluation import full_depth_metrics

    full = full_depth_metrics(table)
    metric = next(iter(full))  # the task's primary metric, as evaluate's
    command = "python -m benchmarks.zoo " + shlex.join(argv if argv is not None else sys.argv[1:])
    record = {
        "env": args.env,
        "algo": args.algo,
        "task": table.task,
        "metric": metric,
        "num_layers": table.num_layers,
        "dev_inputs": table.num_inputs,
        "full_model_metric": 100 * full[metric],
        "runs": runs,
        "paired": paired_verdicts(table, results, args.seed),
        "command": command,
        "commands": {name: run["command"] for name, run in runs.items()},
        "args": asdict(args),
        "versions": versions(("rl_zoo3", "ee-gym")),
        "machine": machine(args.threads, args.device),
        "seconds": round(time.perf_counter() - began, 1),
    }
    # the protocol's stage-1 model is the env's (a model= keyword names its own)
    protocol = f"model {given['model']}" if "model" in given else given.get("protocol", DEFAULT_PROTOCOL)
    record.update(contract_fields(record, protocol))
    capped = [f"the {n} run was capped at {r['timesteps_cap']:,} timesteps (the zoo's `-n`)"
              for n, r in runs.items() if r["timesteps_cap"]]  # fmt: skip
    text = [
        f"# rl-zoo3 on {args.env} ({args.algo}): ee-gym's file against the zoo's default",
        "",
        f"Dev table of {table.task} ({table.num_inputs} inputs, L = {table.num_layers}); metric in points, "
        "layer speed-up L / mean exit layer; seed "
        f"{args.seed}, {args.threads} thread(s), `--device {args.device}`. `shipped`: `--conf-file` "
        f"{shipped_file.name} (`python -m ee_gym.zoo {args.algo}`); `fallback`: no `--conf-file`, so the zoo "
        f"takes `{runs['fallback']['entry']}` of its own `hyperparams/{args.algo}.yml`."
        + (f" Note: {'; '.join(capped)}." if capped else ""),
        "",
        markdown(record),
        "",
        f"Paired differences of the {metric} (points; a bootstrap over the {table.num_inputs} dev inputs, one "
        "training seed per run, so the training seed's own spread is not in the interval):",
        "",
        *verdict_lines(record["paired"]),
        "",
        "## Reproduce",
        "",
        f"```bash\n{command}\n```",
        "",
        "The zoo's commands:",
        "",
        *[f"```bash\n{run['command']}\n```\n" for run in runs.values()],
        f"{record['seconds']:.0f} s on {platform.machine()}; versions and every number in `results.json`.",
        "",
    ]
    write_text_atomic(out / "results.json", json.dumps(record, indent=2, default=str))
    write_text_atomic(out / "results.md", "\n".join(text))
    print("\n" + markdown(record))
    print("\n".join(["", *verdict_lines(record["paired"])]))
    for line in capped:
        print(f"note: {line}")
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
