"""Stage 3 and cache building under torchrun with 2 CPU processes (what ``accelerate launch`` starts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ee_gym.cache import build_cache, open_cache
from ee_gym.multiexit import MultiExitModel
from tests.conftest import new_tiny_model

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(tmp_path, tiny_data, *job_args: str) -> list[dict]:
    """Run tests/distributed_job.py on 2 CPU processes; each process's record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "EE_GYM_HOME": str(tmp_path / "home")}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "tests/distributed_job.py"]
    command += [str(tmp_path / "start"), str(tiny_data), str(tmp_path / "out"), *job_args]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("agent", ["reinforce", "entropy"])
def test_two_processes_train_stage3_in_step_and_build_one_cache(agent, tokenizer, tiny_data, tmp_path):
    model = new_tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "start")
    ranks = _torchrun(tmp_path, tiny_data, agent)
    # averaged gradients keep the two copies of the model identical, and the main process saved it
    assert ranks[0]["model"] == ranks[1]["model"]
    saved = MultiExitModel.from_pretrained(tmp_path / "out" / "stage3" / "model")
    assert saved.fingerprint() == ranks[0]["model"] != model.fingerprint()
    figures = [{k: v for k, v in r["history"][0].items() if k != "seconds"} for r in ranks]
    assert figures[0] == figures[1]  # epoch figures summed over both processes
    assert 1 <= figures[0]["mean_exit_layer"] <= 4
    # each process wrote its share of one cache, equal to the one a single process builds
    two = open_cache(tmp_path / "out" / "cache")
    one = build_cache(
        model.eval(), "sst2", "dev", tmp_path / "one", data_dir=tiny_data, max_length=32, progress=False
    )
    assert two.num_inputs == one.num_inputs == ranks[0]["cache_rows"]
    np.testing.assert_allclose(np.asarray(two.logits), np.asarray(one.logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(two.memorized), np.asarray(one.memorized))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed beside this Python")
def test_the_whole_pipeline_runs_under_torchrun_and_writes_each_record_once(tokenizer, tiny_data, tmp_path):
    new_tiny_model(tokenizer).save_pretrained(tmp_path / "start")
    ranks = _torchrun(tmp_path, tiny_data, "ppo", "pipeline")
    stages = ["stage1", "memorized", "stage2-round1", "stage3-round1"]
    assert ranks[0] == ranks[1] and ranks[0]["stages"] == stages
    lines = (tmp_path / "out" / "pipeline" / "pipeline.jsonl").read_text().splitlines()
    assert [json.loads(line)["stage"] for line in lines] == stages  # the main process alone wrote it
    final = MultiExitModel.from_pretrained(tmp_path / "out" / "pipeline" / "round1" / "stage3" / "model")
    assert final.fingerprint() == ranks[0]["model"]
