"""Bad input to stage 1, stage 3, the pipeline, run folders and the CLI: a clear, early error (issue 15).

Each test fails on the code before the fix. New names are imported inside the tests, so that on that
code each fails on its own check rather than on an import.
"""

from __future__ import annotations

import json
import threading

import pytest
from transformers import RobertaConfig

from ee_gym import pipeline, training
from ee_gym.cli import main
from ee_gym.joint import Stage3Config
from ee_gym.multiexit import MultiExitModel
from ee_gym.pipeline import PipelineConfig
from ee_gym.training import Stage1Config, default_stage1_dir, train_stage1
from tests.conftest import killed_after_first_checkpoint, new_tiny_model

TINY = dict(task="sst2", batch_size=8, learning_rate=5e-3, max_length=32, warmup_ratio=0.0, progress=False)


def _tiny_stage1(tokenizer, tiny_data, **settings):
    config = Stage1Config(**{**TINY, "data_dir": str(tiny_data), "epochs": 1, **settings})
    return train_stage1(config, model=new_tiny_model(tokenizer))


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("ee-gym: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    return err


# -- item 7 ------------------------------------------------------------------------------------
def test_settings_that_cannot_be_right_are_refused(tokenizer, tiny_data, tmp_path, monkeypatch, capsys):
    bad_stage1 = [
        {"epochs": 0}, {"epochs": -1}, {"epochs": 2.5}, {"batch_size": -4}, {"learning_rate": -1.0},
        {"learning_rate": float("nan")}, {"head_learning_rate": 0.0}, {"weight_decay": -0.1},
        {"warmup_ratio": 1.5}, {"max_grad_norm": 0.0}, {"head_dropout": 1.0}, {"eval_batch_size": 0},
        {"train_limit": 0}, {"dev_limit": 0}, {"max_length": 1}, {"pooling": "max"}, {"seed": "x"},
    ]  # fmt: skip
    for bad in bad_stage1:
        with pytest.raises(ValueError, match=next(iter(bad))):
            Stage1Config(**bad)
    bad_stage3 = [
        {"alpha": -1.0}, {"alpha": float("inf")}, {"replicas": 0}, {"batch_size": 0}, {"epochs": 0},
        {"reward": "foo"}, {"rollout": "foo"}, {"learning_rate": 0.0}, {"policy_learning_rate": -1.0},
    ]  # fmt: skip
    for bad in bad_stage3:
        with pytest.raises(ValueError, match=next(iter(bad))):
            Stage3Config(**bad)
    for bad in ({"rounds": 0}, {"policy_epochs": 0}, {"stage3_batch_size": 0}, {"alpha": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PipelineConfig(**bad)

    # the CLI: refused in one line, and no run folder (that later runs would reuse) is written
    for argv in (["--epochs", "0"], ["--batch-size", "-4"], ["--learning-rate", "-1"]):
        assert main(["stage1", "--task", "sst2", "--data-dir", str(tiny_data), *argv]) == 2
        assert argv[0][2:].replace("-", "_") in _one_error_line(capsys)
    assert not default_stage1_dir("sst2", "minilm-l6").exists()

    # max_length past the backbone's positions (64 in the tiny model): refused before tokenizing
    from ee_gym.backbones import max_input_length

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized before max_length was checked")

    with monkeypatch.context() as patch:
        patch.setattr(training, "tokenize_examples", no_tokenizing)
        with pytest.raises(ValueError, match="max_length must be <= 64"):
            _tiny_stage1(tokenizer, tiny_data, output_dir=str(tmp_path / "long"), max_length=100)
    assert max_input_length(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    folder = tmp_path / "model"
    new_tiny_model(tokenizer).save_pretrained(folder)
    argv = ["cache", "--task", "sst2", "--model", str(folder), "--data-dir", str(tiny_data)]
    assert main([*argv, "--max-length", "100000", "--split", "dev"]) == 2
    assert "max_length must be <= 64" in _one_error_line(capsys)


# -- item 9 ------------------------------------------------------------------------------------
def test_pipeline_options_are_validated_before_any_stage_runs(tokenizer, tiny_data, tmp_path, monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError("a stage started before every option was checked")

    monkeypatch.setattr(training, "train_stage1", work)
    monkeypatch.setattr(pipeline, "train_stage3", work)
    monkeypatch.setattr("ee_gym.envs.prepare.load_table", work)
    settings = dict(task="sst2", data_dir=str(tiny_data), output_dir=str(tmp_path / "run"), progress=False)
    for bad, match in (
        ({"reward": "foo"}, "reward 'foo'"),
        ({"rollout": "foo"}, "rollout 'foo'"),
        ({"replicas": 0}, "replicas"),
        ({"stage3_batch_size": 0}, "stage3_batch_size"),
        ({"agent": "nope"}, "agent 'nope'"),
        ({"rollout": "threshold"}, "separate_replicas"),  # reinforce's threshold rollout
        ({"max_length": 100}, "max_length must be <= 64"),  # the tiny model has 64 positions
    ):
        with pytest.raises(ValueError, match=match):
            pipeline.train_pipeline(PipelineConfig(**settings), model=new_tiny_model(tokenizer), **bad)
    assert not (tmp_path / "run").exists()


# -- item 10 -----------------------------------------------------------------------------------
def test_gym_make_uses_the_finished_stage1_run_whatever_its_settings(
    tokenizer, tiny_data, monkeypatch, capsys
):
    from ee_gym.envs.prepare import load_model

    # stage 1 of (sst2, random-bert) in its default folder, with other settings than the defaults
    finished = _tiny_stage1(tokenizer, tiny_data, epochs=2)
    assert finished.model_dir == default_stage1_dir("sst2", "random-bert") / "model"
    capsys.readouterr()
    # the run trained on "train": the paper protocol's stage-1 split (the default is held-out's)
    with monkeypatch.context() as patch:  # undone at the end of the block, EE_GYM_HOME stays set
        patch.setattr(training, "weighted_exit_loss", lambda *a: pytest.fail("stage 1 ran again"))
        model = load_model("sst2", backbone="random-bert", data_dir=str(tiny_data), protocol="paper")
    assert model.fingerprint() == finished.model.fingerprint()
    line = capsys.readouterr().out.strip()
    assert str(finished.model_dir) in line and "epochs=2" in line and "\n" not in line

    # an unfinished run with other settings: the error names the folder, the settings and the ways out
    killed_after_first_checkpoint(monkeypatch, training)
    with pytest.raises(KeyboardInterrupt):
        _tiny_stage1(tokenizer, tiny_data, task="rte", epochs=2)
    with pytest.raises(ValueError) as error:
        load_model("rte", backbone="random-bert", data_dir=str(tiny_data), progress=False, protocol="paper")
    message = str(error.value)
    run_dir = default_stage1_dir("rte", "random-bert")
    assert str(run_dir) in message and "epochs=2" in message
    assert "ee-gym stage1 --task rte --backbone random-bert" in message and "--epochs 2" in message
    assert "model=" in message and "delete" in message


# -- item 11 -----------------------------------------------------------------------------------
def test_cli_bad_input_is_one_error_line_not_a_traceback(tokenizer, tiny_data, tmp_path, monkeypatch, capsys):
    data = ["--task", "sst2", "--data-dir", str(tiny_data)]
    assert main(["stage1", *data, "--backbone", "no-such-backbone", "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert "no-such-backbone" in err and "minilm-l6" in err and "hub" in err

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert main(["stage1", *data, "--output-dir", str(a_file)]) == 2
    assert "output_dir" in _one_error_line(capsys)

    folder = tmp_path / "model"
    new_tiny_model(tokenizer).save_pretrained(folder)
    texts = tmp_path / "texts.txt"
    texts.write_text("a good film\n")
    argv = ["predict", "--model", str(folder), "--texts", str(texts), "--policy", "entropy"]
    assert main([*argv, "--policy-arg", "foo=1"]) == 2
    err = _one_error_line(capsys)
    assert "foo" in err and "threshold" in err  # the keyword it accepts

    # a truncated trainer_state.pt: the file and the fix
    run = tmp_path / "run"
    killed_after_first_checkpoint(monkeypatch, training)
    with pytest.raises(KeyboardInterrupt):
        _tiny_stage1(tokenizer, tiny_data, output_dir=str(run), epochs=2)
    state = run / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    flags = ["--backbone", "random-bert", "--output-dir", str(run), "--epochs", "2", "--batch-size", "8"]
    flags += ["--learning-rate", "5e-3", "--max-length", "32", "--warmup-ratio", "0", "--no-progress"]
    assert main(["stage1", *data, *flags]) == 2
    err = _one_error_line(capsys)
    assert str(state) in err and "delete" in err and str(run / "checkpoint") in err

    for option in ("--batch-size", "--train-limit", "--dev-limit"):
        assert main(["stage1", *data, option, "0", "--no-progress"]) == 2
        assert option[2:].replace("-", "_") in _one_error_line(capsys)


# -- item 13 -----------------------------------------------------------------------------------
def test_a_torn_record_or_file_in_a_run_folder_is_skipped_or_named(
    tokenizer, tiny_data, tmp_path, monkeypatch
):
    run = tmp_path / "stage1"
    first = _tiny_stage1(tokenizer, tiny_data, output_dir=str(run), epochs=2)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 3, "train_lo\n\n')  # torn last record
    with pytest.warns(RuntimeWarning, match="torn"):
        again = _tiny_stage1(tokenizer, tiny_data, output_dir=str(run), epochs=2)
    assert again.history == first.history
    config = run / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(Exception) as error:  # noqa: PT011 - CorruptFileError, new in the fix
        _tiny_stage1(tokenizer, tiny_data, output_dir=str(run), epochs=2)
    assert str(config) in str(error.value) and "delete" in str(error.value)

    # pipeline.jsonl: a torn last record (and a trailing blank line): that stage runs again, and the
    # log is rewritten whole, never appended after the torn line
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_stage3", die)
    settings = dict(
        task="sst2", data_dir=str(tiny_data), output_dir=str(tmp_path / "run"), max_length=32,
        train_limit=16, dev_limit=8, stage1_epochs=1, stage1_batch_size=8, policy_batch_size=8,
        replicas=2, progress=False,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_pipeline(PipelineConfig(**settings), model=new_tiny_model(tokenizer))
    log = tmp_path / "run" / "pipeline.jsonl"
    text = log.read_text()
    log.write_text(text[: text.rindex('"stage": "stage2-round1"') + 12] + "\n\n")
    with pytest.warns(RuntimeWarning, match="torn"), pytest.raises(KeyboardInterrupt):
        pipeline.train_pipeline(PipelineConfig(**settings), model=new_tiny_model(tokenizer))
    stages = [json.loads(line)["stage"] for line in log.read_text().splitlines()]
    assert stages == ["stage1", "memorized", "stage2-round1"]


# -- item 15 -----------------------------------------------------------------------------------
def test_two_stage1_runs_into_one_folder_wait_for_each_other(tokenizer, tiny_data, tmp_path):
    models = [new_tiny_model(tokenizer), new_tiny_model(tokenizer)]
    config = Stage1Config(
        **{**TINY, "data_dir": str(tiny_data), "epochs": 3, "output_dir": str(tmp_path / "run")}
    )
    start, results, errors = threading.Barrier(2), [None, None], []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = train_stage1(config, model=models[i]).model.fingerprint()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results[0] == results[1]
    assert MultiExitModel.from_pretrained(tmp_path / "run" / "model").fingerprint() == results[0]


# -- frictions ---------------------------------------------------------------------------------
def test_every_compare_option_has_a_description(monkeypatch):
    import argparse

    from benchmarks import compare

    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        compare.parse_args([])
    options = [a for a in parsers[0]._actions if not isinstance(a, argparse._HelpAction)]
    assert "--seeds" in [a.option_strings[0] for a in options]
    for action in options:
        assert action.help and not action.help.startswith("(default"), action.option_strings
