"""Generation as a library (``ee_gym.generation.method``) and the decoder's split into layer adapter,
heads, view and decoding loop, on the tiny random Llama of ``tests/conftest.py``: heads, a policy
table, CALM rules, a trained policy (the default learner and one written here) and their evaluation,
each called without the benchmark script."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ee_gym.generation import PolicyExit, StaticExit, method
from ee_gym.generation.data import load_xsum
from ee_gym.generation.method import (
    ORACLE,
    ComparisonConfig,
    HeadSetup,
    PolicySetup,
    calm_rules,
    compare_exit_policies,
    describe_heads,
    evaluate_policies,
    policy_name,
    policy_table,
    table_speedup,
    train_heads_for,
    train_token_policy,
)
from ee_gym.generation.timing import TimingSettings
from tests.conftest import DECODER_LAYERS, tiny_llama_decoder, write_tiny_xsum


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_xsum(tmp_path_factory.mktemp("xsum-method"), rows=12)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A tiny decoder with regression heads on rows 4-7, and the token table of rows 8-11."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    decoder = tiny_llama_decoder()
    folder = tmp_path_factory.mktemp("heads") / "tiny"
    report = train_heads_for(
        decoder, HeadSetup(method="regression", rows="4:8"), data_dir=data_dir, max_new_tokens=6,
        save_to=folder, progress=False, log=lambda _: None,
    )  # fmt: skip
    table = policy_table(decoder, "8:12", data_dir=data_dir, max_new_tokens=6, progress=False)
    return decoder, report, table


def test_heads_are_trained_saved_and_described(trained):
    decoder, report, _ = trained
    assert report.folder.is_dir() and report.settings["head_method"] == "regression"
    assert report.settings["head_rows"] == "4:8" and report.settings["head_positions"] > 0
    assert report.settings["head_training"] is None  # the closed form has no gradient phase
    reloaded = tiny_llama_decoder().load_heads(report.folder)
    described = describe_heads(reloaded, report.folder)
    assert described.settings["heads"] == f"loaded from {report.folder}"
    assert (described.settings["head_method"], described.settings["head_rows"]) == ("regression", "4:8")
    assert reloaded.fingerprint() == decoder.fingerprint()


def test_head_setup_takes_the_gradient_defaults_of_its_method():
    assert HeadSetup(method="gradient").training().learning_rate == 3e-3
    finetune = HeadSetup(method="regression+gradient").training(seed=5)
    assert (finetune.epochs, finetune.learning_rate, finetune.seed) == (4, 1e-4, 5)
    assert HeadSetup(epochs=2, learning_rate=0.5).training().epochs == 2
    with pytest.raises(ValueError, match="unknown head method"):
        HeadSetup(method="closed-form")


def test_calm_rules_reach_their_speedup_on_the_table(trained):
    _, _, table = trained
    rules = calm_rules(table, [1.5], min_layers=[1, 2])
    assert len(rules) == 4 and sum(name.endswith(", min layer 2)") for name in rules) == 2
    for rule in rules.values():
        assert table_speedup(rule, table) >= 1.5 - 1e-9
        assert rule.table_exit_layers(table).min() >= rule.min_layer


@pytest.mark.parametrize("obs_mode", ["state+layer", "state+confidence"])
def test_a_trained_policy_decodes_and_never_exits_below_its_min_layer(trained, data_dir, obs_mode):
    """The library's policy entry point: REINFORCE (made by name) with min layer 2 and an eager exit
    prior, trained on the table, then decoding articles beside full depth and a static exit."""
    decoder, _, table = trained
    setup = PolicySetup(min_layer=2, epochs=1, exit_prior=0.9, num_envs=8)
    policy = train_token_policy(decoder, table, 0.05, obs_mode, setup, progress=False)
    assert policy.name == policy_name("consistentee", 0.05, 2) == "consistentee (alpha=0.05, min layer 2)"
    assert isinstance(policy.exit, PolicyExit) and policy.exit.min_layer == 2
    assert policy.table["exit_histogram"][0] == 0 and policy.table_speedup > 1.0
    assert len(policy.history) == 1  # one epoch
    articles = load_xsum("0:3", data_dir)
    policies = {"full depth": None, "static (layer 2)": StaticExit(2), policy.name: policy.exit}
    runs = evaluate_policies(
        decoder, articles, policies, {policy.name: policy.table_speedup}, max_new_tokens=5,
        batch_size=2, timing=TimingSettings(articles=1, rounds=1, threads=(1,), batch_sizes=(1,)), progress=False,
    )  # fmt: skip
    by_name = {run["name"]: run for run in runs}
    assert list(by_name) == list(policies)
    assert by_name["full depth"]["speedup"] == pytest.approx(1.0)
    assert by_name["full depth"]["table_speedup"] is None
    assert by_name[policy.name]["table_speedup"] == policy.table_speedup
    learned = by_name[policy.name]
    assert learned["exit_histogram"][0] == 0 and sum(learned["exit_histogram"]) > 0
    assert {"rouge", "speedup", "summaries", "mean_exit_layer"} <= set(learned)
    json.dumps(runs)  # a results file takes them as they are


class ThirdLayerLearner:
    """An exit policy written here, outside ``agents``: it exits at layer 3 and counts its training."""

    name = "third-layer"
    obs_mode = "state+layer"
    deployable = True

    def __init__(self):
        self.bound, self.epochs = 0, None

    def bind(self, env) -> None:
        self.bound += 1
        self.num_layers = env.num_layers

    def learn(self, env, budget=None):  # the protocol's one signature: learn(problem, budget)
        self.epochs = budget.epochs
        return self

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        layers = np.asarray(obs)[:, -self.num_layers :].argmax(1) + 1
        return ((layers >= 3) | (layers == self.num_layers)).astype(np.int64)


def test_a_policy_from_the_caller_runs_through_the_library(trained, data_dir):
    decoder, _, table = trained
    learner = ThirdLayerLearner()
    setup = PolicySetup(min_layer=1, epochs=3, num_envs=4)
    policy = train_token_policy(decoder, table, 0.1, "state+layer", setup, policy=learner, name="mine")
    assert policy.policy is learner and learner.epochs == 3 and learner.bound >= 2  # env, then decoder
    assert policy.table["mean_exit_layer"] == pytest.approx(3.0) and policy.history == []
    runs = evaluate_policies(decoder, load_xsum("0:2", data_dir), {"mine": policy.exit}, max_new_tokens=4,
                             batch_size=2, timing=None, progress=False)  # fmt: skip
    assert runs[0]["mean_exit_layer"] == pytest.approx(3.0)


def test_compare_exit_policies_without_the_script(tmp_path, data_dir, monkeypatch):
    config = ComparisonConfig(
        decoder="unused", data_dir=str(data_dir), eval_rows="0:2", policy_rows="8:10", max_new_tokens=4,
        batch_size=2, static_layers=(2,), speedups=(), alphas=(0.05,), confidence_alphas=(), probe_alphas=(),
        policy=PolicySetup(min_layer=2, epochs=1, num_envs=4), timing=None, policy_every=(1, 2),
        policy_seeds=(3, 4), head=HeadSetup(method="regression", rows="4:6"), save_heads=str(tmp_path / "heads"),
    )  # fmt: skip
    decoder = tiny_llama_decoder()  # the tiny model, not a hub name
    monkeypatch.setattr(method, "make_decoder", lambda name, heads=None, setup=None: decoder)
    found = compare_exit_policies(config, progress=False, log=lambda _: None)
    names = [run["name"] for run in found.runs]
    policies = [f"consistentee (alpha=0.05, min layer 2{every}, seed {seed})" for every in ("", ", every 2")
                for seed in (3, 4)]  # fmt: skip
    assert names == ["full depth", ORACLE, "static (layer 2)", *policies]
    for run in found.runs[-2:]:  # every 2 from layer 2 on 4 layers: exits at 2 or at the last layer
        assert run["exit_histogram"][0] == run["exit_histogram"][2] == 0
    assert method.setting_name(policies[1]) == "consistentee (alpha=0.05, min layer 2)"
    assert found.settings["policy_every"] == [1, 2] and found.settings["policy_seeds"] == [3, 4]
    assert set(found.seconds) == {
        "load",
        "heads: training",
        "policy table",
        "policies",
        "evaluation",
        "total",
    }
    assert found.settings["policy_min_layer"] == 2 and found.settings["articles"] == 2
    assert found.settings["exit_prior"] == f"1/{DECODER_LAYERS}" and (tmp_path / "heads").is_dir()
    assert list(found.policy_history) == names[3:]


def test_scores_come_before_the_timing_and_only_the_named_policies_are_timed(tmp_path, data_dir, monkeypatch):
    """The scores reach ``scored`` before the timing starts; ``TimingSettings.policies`` limits what is
    timed; the policy table is read back from its cache the second time."""
    from ee_gym.generation.timing import TimingSettings

    timing = TimingSettings(articles=1, rounds=1, threads=(1,), batch_sizes=(1,), policies=("static",))
    config = ComparisonConfig(
        decoder="unused", data_dir=str(data_dir), eval_rows="0:2", policy_rows="8:10", max_new_tokens=4,
        batch_size=2, static_layers=(2,), speedups=(), alphas=(0.05,), confidence_alphas=(), probe_alphas=(),
        policy=PolicySetup(min_layer=2, epochs=1, num_envs=4), timing=timing, oracle=False,
        verify_draft_tokens=(), head=HeadSetup(method="regression", rows="4:6"), save_heads=str(tmp_path / "heads"),
    )  # fmt: skip
    decoder = tiny_llama_decoder()
    monkeypatch.setattr(method, "make_decoder", lambda name, heads=None, setup=None: decoder)
    seen = []
    found = compare_exit_policies(config, progress=False, log=lambda _: None, scored=seen.append)
    assert [r["name"] for r in seen[0]] == [r["name"] for r in found.runs]
    assert all(not r["timing"] for r in seen[0])  # before the timing
    timed = {r["name"] for r in found.runs if r["timing"]}
    assert timed == {"full depth", "static (layer 2)"}  # the consistentee row is not timed
    # the second comparison with the same heads reads the policy table back instead of decoding
    monkeypatch.setattr(method, "collect_split", lambda *a, **k: pytest.fail("decoded the table again"))
    config = dataclasses.replace(config, heads=str(tmp_path / "heads"), save_heads=None)
    again = compare_exit_policies(config, progress=False, log=lambda _: None)
    assert [r["rouge"] for r in again.runs] == [r["rouge"] for r in found.runs]


def test_a_comparison_refuses_bad_intervals_and_seeds_before_any_work():
    with pytest.raises(ValueError, match="policy_every"):
        ComparisonConfig(policy_every=(0,))
    with pytest.raises(ValueError, match="seeds are distinct"):
        ComparisonConfig(policy_seeds=(1, 1))
    with pytest.raises(ValueError, match="every are 1 or more"):
        PolicySetup(every=0)


def test_the_benchmark_flags_default_to_the_library_settings():
    """The script spells out its defaults (it parses before torch is imported): they are the library's."""
    from benchmarks import generation as bench

    assert bench.config_from_args(bench.parse_args([])) == ComparisonConfig()
    assert bench.ORACLE == ORACLE


def test_the_library_leaves_agents_unimported():
    code = "import sys, ee_gym.generation.method; print('agents' in sys.modules, 'benchmarks' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_decoder_modules_split_and_its_old_names_stay():
    from ee_gym.generation import decoder, heads, layers, view

    for name in decoder.__all__:  # every name importable from decoder.py before the split
        assert hasattr(decoder, name), name
    assert decoder.LayerView is view.LayerView and decoder.AdapterHead is heads.AdapterHead
    assert decoder.resolve_decoder is layers.resolve_decoder
    model = tiny_llama_decoder()
    # The layer adapter is no submodule: the state dict (and every cache's fingerprint) is the model's
    # and the heads', and copies keep the adapter on their own model.
    assert {key.split(".")[0] for key in model.state_dict()} == {"model", "heads"}
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.layer_adapter.model is twin.model and twin.fingerprint() == model.fingerprint()
