"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: stage 3 and a cache build.

argv: <model folder> <data folder> <output folder> <agent> [pipeline]. Each process writes
``rank<r>.json`` with the fingerprint of its final model and what its cache holds. With ``pipeline``
the whole method runs instead (``ee_gym.pipeline.train_pipeline``: stage 1, stage 2, stage 3).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from ee_gym.cache import build_cache
from ee_gym.joint import Stage3Config, train_stage3
from ee_gym.multiexit import MultiExitModel


def pipeline(model_dir: str, data_dir: str, out: str, agent: str) -> None:
    from ee_gym.pipeline import PipelineConfig, train_pipeline

    config = PipelineConfig(
        task="sst2",
        agent=agent,
        data_dir=data_dir,
        output_dir=f"{out}/pipeline",
        max_length=32,
        train_limit=32,
        dev_limit=16,
        stage1_epochs=1,
        stage1_batch_size=8,
        policy_batch_size=8,
        policy_timesteps=512,
        replicas=2,
        progress=False,
    )
    result = train_pipeline(config, model=MultiExitModel.from_pretrained(model_dir))
    with open(f"{out}/rank{os.environ.get('RANK', '0')}.json", "w") as stream:
        json.dump(
            {"model": result.model.fingerprint(), "stages": [s["stage"] for s in result.stages]}, stream
        )


def main(model_dir: str, data_dir: str, out: str, agent: str, mode: str = "stage3") -> None:
    torch.set_num_threads(1)
    if mode == "pipeline":
        return pipeline(model_dir, data_dir, out, agent)
    rank = int(os.environ.get("RANK", "0"))
    model = MultiExitModel.from_pretrained(model_dir)
    cache = build_cache(
        model, "sst2", "dev", f"{out}/cache", data_dir=data_dir, max_length=32, progress=False
    )
    config = Stage3Config(
        task="sst2",
        agent=agent,
        data_dir=data_dir,
        output_dir=f"{out}/stage3",
        batch_size=8,
        replicas=4,
        learning_rate=5e-3,
        max_length=32,
        train_limit=32,
        progress=False,
    )
    kwargs = {}
    if agent != "reinforce":
        import agents

        kwargs["policy"] = agents.make(agent)
    result = train_stage3(config, model=model, memorized=np.ones(32, dtype=np.int64), **kwargs)
    record = {
        "model": result.model.fingerprint(),
        "cache_rows": int(cache.num_inputs),
        "cache_logits_sum": float(np.asarray(cache.logits, dtype=np.float64).sum()),
        "history": result.history,
    }
    with open(f"{out}/rank{rank}.json", "w") as stream:
        json.dump(record, stream)


if __name__ == "__main__":
    main(*sys.argv[1:])
