"""Cross-fitted policy data (ee_gym.crossfit): folds, union splits, and tables from unseen inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import new_tiny_model

from ee_gym.crossfit import CrossFitTable, cross_fit_table, make_folds
from ee_gym.envs.prepare import load_table
from ee_gym.protocols import check_protocol, get_protocol
from ee_gym.tasks import check_split, load_split, split_slug
from ee_gym.training import Stage1Config
from ee_gym.validation import ConfigError


def test_folds_partition_the_rows_and_each_trains_on_the_rest():
    folds = make_folds(10, 3)
    assert [(f.start, f.stop) for f in folds] == [(0, 3), (3, 6), (6, 10)]
    assert [f.train_split for f in folds] == ["train[3:]", "train[:3]+train[6:]", "train[:6]"]
    with pytest.raises(ValueError, match="2 <= k"):
        make_folds(10, 1)


def test_a_union_split_loads_its_parts_in_order(tiny_data):
    whole = load_split("sst2", "train", tiny_data)
    union = load_split("sst2", "train[:10]+train[20:]", tiny_data)
    assert union.text_a == whole.text_a[:10] + whole.text_a[20:]
    assert union.labels.tolist() == whole.labels[:10].tolist() + whole.labels[20:].tolist()
    assert load_split("sst2", "train[:10]+train[20:]", tiny_data, limit=12).text_a == union.text_a[:12]
    assert split_slug("train[:10]+train[20:]") == "train-to10_plus_train-from20"
    assert check_split("train[:10]+train[20:]") == "train[:10]+train[20:]"
    with pytest.raises(ConfigError, match="union"):
        check_split("train[:10]+")


def test_cross_fit_protocol_names_its_folds():
    assert get_protocol("cross-fit").folds == 3 and get_protocol("cross-fit").policy_split == "train"
    assert get_protocol("cross-fit:5").folds == 5 and check_protocol("cross-fit:5") == "cross-fit:5"
    assert not get_protocol("held-out").cross_fit
    for bad in ("cross-fit:1", "cross-fit:x", "cross-fit:99"):
        with pytest.raises(ConfigError, match="whole number of folds"):
            get_protocol(bad)
    with pytest.raises(ConfigError, match="cross-fit:<k>"):
        check_protocol("crossfit")


def test_every_row_comes_from_a_fold_model_that_never_trained_on_it(tokenizer, tiny_data):
    base = Stage1Config(
        task="sst2", data_dir=str(tiny_data), epochs=1, batch_size=8, learning_rate=5e-3, max_length=32,
        warmup_ratio=0.0, progress=False, seed=3,
    )  # fmt: skip
    models = {}

    def table_for(model, split):
        models[split] = model
        return load_table(model, "sst2", split, data_dir=tiny_data, max_length=32, progress=False)

    fitted = cross_fit_table(base, 3, table_for=table_for, initial_model=lambda: new_tiny_model(tokenizer))
    assert isinstance(fitted, CrossFitTable)
    whole = load_split("sst2", "train", tiny_data)
    table = fitted.table
    assert table.num_inputs == len(whole) == 64 and table.labels.tolist() == whole.labels.tolist()
    assert len(set(fitted.fingerprints)) == 3  # three different fold models
    for fold in fitted.folds:
        rows = np.flatnonzero(fitted.fold_of == fold.index)
        assert rows.tolist() == list(range(fold.start, fold.stop))
        # by construction: the fold model's own run records a training split that excludes these rows
        model = models[fold.held_split]
        run = json.loads((Path(fitted.run_dirs[fold.index]) / "config.json").read_text())
        seen = set(load_split("sst2", run["train_split"], tiny_data).text_a)
        assert run["train_split"] == fold.train_split
        assert not seen & {whole.text_a[i] for i in rows}
        assert len(seen) + len(rows) == len(whole)
        # and the rows are that model's outputs on them
        own = load_table(model, "sst2", fold.held_split, data_dir=tiny_data, max_length=32, progress=False)
        np.testing.assert_array_equal(table.logits[rows], own.logits)
    # a second call reuses the finished fold runs (same fingerprints, nothing trained)
    again = cross_fit_table(
        base, 3, table_for=table_for, initial_model=lambda: new_tiny_model(tokenizer, seed=9)
    )
    assert again.fingerprints == fitted.fingerprints


def test_envs_and_policy_tables_play_the_cross_fitted_table(tokenizer, tiny_data, monkeypatch):
    from types import SimpleNamespace

    import gymnasium as gym

    from ee_gym import crossfit
    from ee_gym.envs import prepare

    trained, runs = [], {}

    def fake_stage1(config, model=None):  # stage 1 of the real backbone is too slow here; reused as a run is
        if config.train_split not in runs:
            trained.append(config.train_split)
            tiny = new_tiny_model(tokenizer, seed=len(trained)).eval()
            runs[config.train_split] = SimpleNamespace(
                model=tiny, model_dir=Path(f"/nowhere/{len(trained)}/model")
            )
        return runs[config.train_split]

    monkeypatch.setattr(prepare, "train_stage1", fake_stage1)
    monkeypatch.setattr(crossfit, "train_stage1", fake_stage1)
    train, dev = prepare.policy_tables(
        "rte", "cross-fit", data_dir=str(tiny_data), max_length=32, progress=False
    )
    assert trained == ["train", "train[21:]", "train[:21]+train[42:]", "train[:42]"]
    assert train.num_inputs == 64 and dev.num_inputs == 32 and len(train.cross_fit["folds"]) == 3
    env = gym.make(
        "ConsistentEE-RTE-v0", protocol="cross-fit", data_dir=str(tiny_data), max_length=32, progress=False
    )
    assert env.unwrapped.table is train  # the same cross-fitted table, from the process's table store
    with pytest.raises(ConfigError, match="live mode runs one model"):
        gym.make("ConsistentEE-RTE-v0", protocol="cross-fit", mode="live", data_dir=str(tiny_data))


def test_a_pipeline_under_cross_fit_takes_one_round():
    from ee_gym.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match="rounds=1"):
        PipelineConfig(task="rte", protocol="cross-fit", rounds=2)
    assert PipelineConfig(task="rte", protocol="cross-fit:4", rounds=1).protocol == "cross-fit:4"


def test_an_evaluation_split_carved_from_train_is_outside_every_training_split():
    held = get_protocol("held-out,eval=10%")
    assert (held.stage1_split, held.policy_split, held.evaluation) == (
        "train[:81%]",
        "train[81%:90%]",
        "train[90%:]",
    )
    assert held.name == "held-out,eval=10%" and check_protocol("held-out, eval = 10%") == "held-out,eval=10%"
    paper = get_protocol("paper,eval=12.5%")
    assert (paper.stage1_split, paper.policy_split, paper.evaluation) == ("train[:87.5%]",) * 2 + (
        "train[87.5%:]",
    )
    crossed = get_protocol("cross-fit:5,eval=20%")
    assert (
        crossed.folds == 5
        and crossed.policy_split == "train[:80%]"
        and get_protocol("held-out").evaluation is None
    )
    for bad in ("held-out,eval=0%", "held-out,eval=60%", "held-out,eval=10", "held-out,test=10%"):
        with pytest.raises(ConfigError, match="eval=<p>%"):
            get_protocol(bad)
    # folds of a slice name rows of the whole split and stop where the evaluation split begins
    folds = make_folds(9, 3, "train", offset=0, to_end=False)
    assert [f.train_split for f in folds] == ["train[3:9]", "train[:3]+train[6:9]", "train[:6]"]
    assert [f.held_split for f in make_folds(4, 2, "train", offset=6)] == ["train[6:8]", "train[8:10]"]


def test_cross_fit_with_an_evaluation_split_never_trains_on_it(tokenizer, tiny_data, monkeypatch):
    from types import SimpleNamespace

    from ee_gym import crossfit
    from ee_gym.envs import prepare

    trained = []

    def fake_stage1(config, model=None):
        trained.append(config.train_split)
        return SimpleNamespace(model=new_tiny_model(tokenizer, seed=len(trained)).eval(),
                               model_dir=Path(f"/nowhere/{len(trained)}/model"))  # fmt: skip

    monkeypatch.setattr(prepare, "train_stage1", fake_stage1)
    monkeypatch.setattr(crossfit, "train_stage1", fake_stage1)
    train, _ = prepare.policy_tables(
        "rte", "cross-fit,eval=25%", data_dir=str(tiny_data), max_length=32, progress=False
    )
    # 64 train rows: the evaluated model and the folds use rows 0..47; rows 48.. are the evaluation split
    assert trained == ["train[:75%]", "train[16:48]", "train[:16]+train[32:48]", "train[:32]"]
    assert train.num_inputs == 48
    whole = load_split("rte", "train", str(tiny_data))
    carved = set(load_split("rte", "train[75%:]", str(tiny_data)).text_a)
    assert len(carved) == 16 and not carved & {whole.text_a[i] for i in range(48)}
    for split in trained:
        assert not carved & set(load_split("rte", split, str(tiny_data)).text_a)


def test_a_slice_of_the_cross_fitted_split_keeps_the_fold_models_rows(tokenizer, tiny_data, monkeypatch):
    from types import SimpleNamespace

    from ee_gym import crossfit
    from ee_gym.envs import prepare

    runs = {}

    def fake_stage1(config, model=None):  # one tiny model per split, reused as a finished run is
        if config.train_split not in runs:
            tiny = new_tiny_model(tokenizer, seed=len(runs) + 1).eval()
            runs[config.train_split] = SimpleNamespace(
                model=tiny, model_dir=Path(f"/nowhere/{len(runs)}/model")
            )
        return runs[config.train_split]

    monkeypatch.setattr(prepare, "train_stage1", fake_stage1)
    monkeypatch.setattr(crossfit, "train_stage1", fake_stage1)
    options = dict(data_dir=str(tiny_data), max_length=32, progress=False)
    model = prepare.load_model("rte", protocol="cross-fit", data_dir=str(tiny_data), progress=False)
    part = prepare.policy_table(model, "rte", "cross-fit", split="train[10:30]", **options)
    # rows 10..29 lie in folds 0 and 1 (rows 0..20, 21..41): fold model 2 is never trained
    assert sorted(runs) == ["train", "train[21:]", "train[:21]+train[42:]"]
    assert [f["index"] for f in part.cross_fit["folds"]] == [0, 1] and part.cross_fit["rows"] == 20
    assert part.cross_fit["k"] == 3
    full = prepare.policy_table(model, "rte", "cross-fit", **options)
    # each row is the fold model's, not the evaluated model's
    assert part.split == "train[10:30]" and part.num_inputs == 20
    # the same fold model on the same rows, batched with other neighbours (padding to another length):
    # equal up to the float summation order of CPU kernels, which depends on the batch's shape
    np.testing.assert_allclose(part.logits, full.logits[10:30], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(part.labels, full.labels[10:30])
    plain = prepare.load_table(model, "rte", "train[10:30]", **options)
    assert np.abs(part.logits - plain.logits).max() > 1e-3  # another model's rows are far further apart
    with pytest.raises(ConfigError, match="one slice of it"):
        prepare.policy_table(model, "rte", "cross-fit,eval=25%", split="train[40:]", **options)


def test_a_policy_split_that_sees_scored_or_stage1_inputs_is_refused(tiny_data):
    from ee_gym.protocols import check_policy_split

    data = str(tiny_data)  # 64 train rows, dev apart
    carved = get_protocol("paper,eval=25%")  # stage 1 and policies: rows 0..47; scored on rows 48..63
    check_policy_split(carved, "rte", "train[:16]", data)
    check_policy_split(carved, "rte", "train[:8]+train[40:48]", data)
    with pytest.raises(ConfigError, match="shares 4 inputs with 'train\\[75%:\\]'"):
        check_policy_split(carved, "rte", "train[:8]+train[44:52]", data)
    with pytest.raises(ConfigError, match="shares 32 inputs with 'dev'"):
        check_policy_split(get_protocol("paper"), "rte", "validation", data)
    held = get_protocol("held-out")  # stage 1 on rows 0..56, policies on 57..63
    check_policy_split(held, "rte", "train[60:]", data)
    with pytest.raises(ConfigError, match="stage 1 never sees the policy split.*'paper'"):
        check_policy_split(held, "rte", "train[50:]", data)
    with pytest.raises(ConfigError, match="one slice of it"):
        check_policy_split(get_protocol("cross-fit"), "rte", "train[:10]+train[20:30]", data)
