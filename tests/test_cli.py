"""The ee-gym command: subcommands, options from dataclasses, clear errors."""

from __future__ import annotations

import pytest

from ee_gym.cli import build_parser, main


def test_tasks_lists_builtin_tasks(capsys, tiny_data):
    assert main(["tasks", "--data-dir", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    for name in ("rte", "mrpc", "sst2", "cola", "qnli", "qqp", "mnli"):
        assert f"  {name}" in out
    assert str(tiny_data) in out


def test_stage1_options_come_from_the_config_dataclass():
    args = build_parser().parse_args(["stage1", "--task", "mrpc", "--epochs", "2", "--no-progress"])
    assert (args.task, args.epochs, args.progress, args.learning_rate) == ("mrpc", 2, False, None)


def test_unknown_task_is_a_clear_error(capsys):
    assert main(["stage1", "--task", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Unknown task 'nope'" in err and "rte" in err


def test_missing_data_folder_names_both_fixes(capsys, tmp_path):
    assert main(["stage1", "--task", "rte", "--data-dir", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "EE_GYM_DATA" in err and "hub" in err


def test_cache_without_a_trained_model_says_how_to_train_one(capsys):
    assert main(["cache", "--task", "rte"]) == 2
    assert "ee-gym stage1" in capsys.readouterr().err


def test_output_folder_takes_one_split():
    with pytest.raises(SystemExit):
        main(["cache", "--task", "rte", "--output", "x", "--split", "train", "dev"])


def test_top_level_help_imports_no_torch():
    """`ee-gym --help` answers at once: only the subcommand asked for builds its options."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom ee_gym.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "stage1" in out and out.strip().endswith("False")
