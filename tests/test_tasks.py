"""Tests for ee_gym.paths and ee_gym.tasks.

Unit tests write tiny files into tmp_path and never touch the network (the hub loader is tested
against a stand-in for ``datasets.load_dataset``). Tests marked ``integration`` read the real data
folder named by ``$EE_GYM_DATA`` and are skipped when it is unset.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from ee_gym import paths, tasks
from ee_gym.tasks import (
    Examples,
    TaskSpec,
    UnknownTaskError,
    compute_metrics,
    get_task,
    load_split,
    primary_metric,
    register_task,
    task_from_files,
    task_from_hub,
    task_names,
)

REAL_DATA = os.environ.get("EE_GYM_DATA")  # read before the autouse fixture clears it


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """No data folder from the environment, and a private copy of the task registry."""
    monkeypatch.delenv("EE_GYM_DATA", raising=False)
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def rows(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


# ----------------------------------------------------------------------------- paths


def test_home_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("EE_GYM_HOME", raising=False)
    assert paths.home() == Path("~/.cache/ee_gym").expanduser()
    monkeypatch.setenv("EE_GYM_HOME", str(tmp_path / "h"))
    assert paths.home() == tmp_path / "h"
    assert not (tmp_path / "h").exists()


def test_data_dir_sources(monkeypatch, tmp_path):
    assert paths.data_dir() is None
    monkeypatch.setenv("EE_GYM_DATA", "")
    assert paths.data_dir() is None
    monkeypatch.setenv("EE_GYM_DATA", str(tmp_path))
    assert paths.data_dir() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert paths.data_dir(other) == other  # the argument wins over the environment


@pytest.mark.parametrize("via_env", [False, True])
def test_data_dir_missing_folder(monkeypatch, tmp_path, via_env):
    missing = tmp_path / "nope"
    if via_env:
        monkeypatch.setenv("EE_GYM_DATA", str(missing))
    with pytest.raises(FileNotFoundError) as info:
        paths.data_dir(None if via_env else missing)
    message = str(info.value)
    for part in (str(missing), "EE_GYM_DATA", "data_dir=", "glue/<TASK>/train.tsv", "Hugging Face hub"):
        assert part in message


# ----------------------------------------------------------------------------- built-in readers

# One tiny local copy per built-in task: the files, and what each split must load as.
GLUE_FILES = {
    "rte": (
        "RTE",
        {
            "train.tsv": rows(
                "index\tsentence1\tsentence2\tlabel",
                '0\tHe said "yes.\tHe agreed.  \tentailment',
                "1\tA cat.\tA dog.\tnot_entailment",
            ),
            "dev.tsv": rows("index\tsentence1\tsentence2\tlabel", "0\tx\ty\tnot_entailment"),
        },
        {
            "train": (['He said "yes.', "A cat."], ["He agreed.", "A dog."], [0, 1]),
            "dev": (["x"], ["y"], [1]),
        },
    ),
    "mrpc": (
        "MRPC",
        {
            "train.tsv": "\ufeff"
            + rows(
                "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                '1\t11\t12\tHe called it " the witness " .\tThe " witness " .',
                "0\t13\t14\tOne .\tTwo .",
            ),
            "dev.tsv": "\ufeff" + rows("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1\t2\ta\tb"),
        },
        {
            "train": (['He called it " the witness " .', "One ."], ['The " witness " .', "Two ."], [1, 0]),
            "dev": (["a"], ["b"], [0]),
        },
    ),
    "sst2": (
        "SST-2",
        {
            "train.tsv": rows("sentence\tlabel", "hide new secretions \t0", 'a " quoted gem \t1'),
            "dev.tsv": rows("sentence\tlabel", "fine \t1"),
        },
        {"train": (["hide new secretions", 'a " quoted gem'], None, [0, 1]), "dev": (["fine"], None, [1])},
    ),
    "cola": (
        "CoLA",
        {
            "train.tsv": rows("gj04\t1\t\tOur friends won't buy this.", 'gj04\t0\t*\tBill "rolled" the.'),
            "dev.tsv": "gj04\t1\t\tThe sailors rode.",  # no final newline, as in the real dev.tsv
        },
        {
            "train": (["Our friends won't buy this.", 'Bill "rolled" the.'], None, [1, 0]),
            "dev": (["The sailors rode."], None, [1]),
        },
    ),
    "qnli": (
        "QNLI",
        {
            "train.tsv": rows(
                "index\tquestion\tsentence\tlabel",
                "0\tWho?\tHim.\tentailment",
                "1\tWhen?\tNever.\tnot_entailment",
            ),
            "dev.tsv": rows("index\tquestion\tsentence\tlabel", "0\tWhy?\tBecause.\tnot_entailment"),
        },
        {"train": (["Who?", "When?"], ["Him.", "Never."], [0, 1]), "dev": (["Why?"], ["Because."], [1])},
    ),
    "qqp": (
        "QQP",
        {
            "train.tsv": rows(
                "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                "0\t1\t2\tHow do I cook?\tHow to cook?\t1",
                "1\t3\t4\tWhat is X?\tWhere is Y?\t0",
            ),
            "dev.tsv": rows("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "5\t6\t7\tq?\tr?\t0"),
        },
        {
            "train": (["How do I cook?", "What is X?"], ["How to cook?", "Where is Y?"], [1, 0]),
            "dev": (["q?"], ["r?"], [0]),
        },
    ),
    "mnli": (
        "MNLI",
        {
            # Columns in the real order (abridged): the reader finds them by name.
            "train.tsv": rows(
                "index\tgenre\tsentence1_parse\tsentence1\tsentence2\tlabel1\tgold_label",
                "0\tfiction\t(x)\tP one.\tH one.\tneutral\tneutral",
                "1\tfiction\t(x)\tP two.\tH two.\tcontradiction\tcontradiction",
                "2\tfiction\t(x)\tP three.\tH three.\tentailment\tentailment",
            ),
            "dev_matched.tsv": rows(
                "index\tgenre\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label",
                "0\tg\tPm.\tHm.\tx\ty\tentailment",
            ),
            "dev_mismatched.tsv": rows(
                "index\tgenre\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label",
                "0\tg\tPx.\tHx.\tx\ty\tneutral",
            ),
        },
        {
            "train": (["P one.", "P two.", "P three."], ["H one.", "H two.", "H three."], [1, 2, 0]),
            "dev": (["Pm."], ["Hm."], [0]),
            "dev_mismatched": (["Px."], ["Hx."], [1]),
        },
    ),
}


def make_glue(root: Path, *names: str) -> Path:
    for name in names:
        folder, files, _ = GLUE_FILES[name]
        for file, text in files.items():
            write(root / "glue" / folder / file, text)
    return root


@pytest.mark.parametrize("name", sorted(GLUE_FILES))
def test_builtin_readers(tmp_path, name):
    make_glue(tmp_path, name)
    for split, (text_a, text_b, labels) in GLUE_FILES[name][2].items():
        examples = load_split(name, split, data_dir=tmp_path)
        assert examples.text_a == text_a
        assert examples.text_b == text_b
        assert examples.labels.dtype == np.int64
        assert examples.labels.tolist() == labels


def test_builtin_reader_via_env_and_limit(tmp_path, monkeypatch):
    make_glue(tmp_path, "rte")
    monkeypatch.setenv("EE_GYM_DATA", str(tmp_path))
    assert len(load_split("RTE")) == 2
    assert load_split("rte", limit=1).text_a == ['He said "yes.']
    assert len(load_split("rte", limit=0)) == 0
    assert load_split("rte", "validation").labels.tolist() == [1]  # alias of "dev"


def test_builtin_specs():
    assert task_names() == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
    expected = {
        "rte": ("RTE", ("entailment", "not_entailment"), "accuracy"),
        "mrpc": ("MRPC", ("not_equivalent", "equivalent"), "f1"),
        "sst2": ("SST2", ("negative", "positive"), "accuracy"),
        "cola": ("CoLA", ("unacceptable", "acceptable"), "matthews"),
        "qnli": ("QNLI", ("entailment", "not_entailment"), "accuracy"),
        "qqp": ("QQP", ("not_duplicate", "duplicate"), "f1"),
        "mnli": ("MNLI", ("entailment", "neutral", "contradiction"), "accuracy"),
        "stsb": ("STSB", ("score",), "correlation"),
    }
    for name, (env_name, labels, metric) in expected.items():
        spec = get_task(name)
        assert (spec.name, spec.env_name, spec.labels, spec.metric) == (name, env_name, labels, metric)
        assert spec.num_labels == len(labels)
        assert spec.hub == ("nyu-mll/glue", name)
        assert primary_metric(name) == metric
    assert get_task("mnli").split_files["dev"] == "dev_matched.tsv"
    assert get_task("mnli").hub_splits["dev"] == "validation_matched"
    assert get_task("sst2").glue_dir == "SST-2"
    hash(get_task("rte"))  # specs are usable as dict keys


@pytest.mark.parametrize("alias", ["SST-2", "sst2", "sst_2", "Sst2", " sst-2 "])
def test_get_task_tolerant_names(alias):
    assert get_task(alias) is get_task("sst2")
    assert get_task(get_task("sst2")) is get_task("sst2")


def test_unknown_task():
    with pytest.raises(UnknownTaskError) as info:
        get_task("imdb")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "'imdb'" in message and "rte" in message and "sst2" in message
    assert "register_task" in message and "task_from_files" in message
    with pytest.raises(UnknownTaskError):
        load_split("imdb")


def test_register_task():
    spec = TaskSpec("Toy", ["no", "yes"], "accuracy", "text", hub=("someone/toy", None))
    assert spec.name == "toy" and spec.labels == ("no", "yes") and spec.text_columns == ("text",)
    assert spec.env_name == "Toy"
    assert register_task(spec) is spec
    assert register_task(spec) is spec  # the same spec again is fine
    assert "toy" in task_names() and get_task("TOY") is spec
    other = TaskSpec("toy", ("a", "b", "c"), "f1", ("text",))
    with pytest.raises(ValueError, match="overwrite=True"):
        register_task(other)
    assert register_task(other, overwrite=True) is get_task("toy")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric": "auc"},
        {"labels": ("one",)},
        {"labels": ("a", "a")},
        {"text_columns": ("a", "b", "c")},
        {"name": "--"},
    ],
)
def test_taskspec_validation(kwargs):
    base = {"name": "t", "labels": ("a", "b"), "metric": "accuracy", "text_columns": ("x",)}
    with pytest.raises(ValueError):
        TaskSpec(**{**base, **kwargs})


# ----------------------------------------------------------------------------- load_split errors


@pytest.mark.parametrize("via_env", [False, True])
def test_missing_data_folder(tmp_path, monkeypatch, via_env):
    missing = tmp_path / "no_such_folder"
    if via_env:
        monkeypatch.setenv("EE_GYM_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_folder") as info:
        load_split("rte", data_dir=None if via_env else missing)
    assert "Hugging Face hub" in str(info.value)


def test_missing_task_folder(tmp_path):
    make_glue(tmp_path, "rte")
    with pytest.raises(FileNotFoundError) as info:
        load_split("sst2", "train", data_dir=tmp_path)
    message = str(info.value)
    expected = str(tmp_path / "glue" / "SST-2" / "train.tsv")
    for part in (expected, "no glue/SST-2/ folder", "EE_GYM_DATA", "data_dir=", "Hugging Face hub"):
        assert part in message


def test_missing_file(tmp_path):
    write(tmp_path / "glue" / "MNLI" / "train.tsv", GLUE_FILES["mnli"][1]["train.tsv"])
    assert len(load_split("mnli", "train", data_dir=tmp_path)) == 3
    with pytest.raises(FileNotFoundError) as info:
        load_split("mnli", "dev", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "glue" / "MNLI" / "dev_matched.tsv") in message
    assert "EE_GYM_DATA" in message and "Hugging Face hub" in message
    assert "no glue/MNLI/ folder" not in message


def test_unknown_split(tmp_path):
    make_glue(tmp_path, "rte")
    with pytest.raises(ValueError, match="valid splits: train, dev"):
        load_split("rte", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="dev_mismatched"):
        load_split("mnli", "test", data_dir=tmp_path)


def test_bad_label(tmp_path):
    write(
        tmp_path / "glue" / "RTE" / "train.tsv", rows("index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe")
    )
    with pytest.raises(ValueError, match=r"train\.tsv, line 2: label 'maybe'"):
        load_split("rte", data_dir=tmp_path)
    write(tmp_path / "glue" / "SST-2" / "train.tsv", rows("sentence\tlabel", "ok\t1", "bad\t2"))
    with pytest.raises(ValueError, match=r"train\.tsv, line 3: label '2'"):
        load_split("sst2", data_dir=tmp_path)


def test_malformed_rows(tmp_path):
    write(tmp_path / "glue" / "SST-2" / "train.tsv", rows("sentence\tlabel", "a\tb\t1"))
    with pytest.raises(ValueError, match="line 2: expected 2 fields, found 3"):
        load_split("sst2", data_dir=tmp_path)
    write(tmp_path / "glue" / "RTE" / "train.tsv", rows("index\tsentence1\tlabel", "0\ta\tentailment"))
    with pytest.raises(ValueError, match="sentence2"):
        load_split("rte", data_dir=tmp_path)


# ----------------------------------------------------------------------------- hub (offline stand-in)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with a stand-in that serves GLUE-shaped splits and logs calls."""
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the stand-in hub is reachable
    calls = []
    glue_label_names = {name: list(get_task(name).labels) for name in ("rte", "mnli")}

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "nyu-mll/glue" and name == "rte":
            data = {
                "sentence1": ['He said "yes.', "A cat."],
                "sentence2": ["He agreed.  ", "A dog."],
                "label": [0, 1],
            }
        elif path == "nyu-mll/glue" and name == "mnli":
            data = {
                "premise": ["P."],
                "hypothesis": ["H."],
                "label": [2 if split == "validation_matched" else -1],
            }
        elif path == "someone/reviews":
            data = {"review": ["great", "awful", "meh"], "stars": ["pos", "neg", "pos"]}
            return datasets.Dataset.from_dict(data)
        else:
            raise AssertionError(f"unexpected hub call {path} {name} {split}")
        text = [c for c in data if c != "label"]
        features = datasets.Features(
            {
                **{c: datasets.Value("string") for c in text},
                "label": datasets.ClassLabel(names=glue_label_names[name]),
            }
        )
        return datasets.Dataset.from_dict(data, features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_matches_local(tmp_path, fake_hub):
    make_glue(tmp_path, "rte")
    local = load_split("rte", "train", data_dir=tmp_path)
    hub = load_split("rte", "train")
    assert fake_hub == [("nyu-mll/glue", "rte", "train")]
    assert (hub.text_a, hub.text_b, hub.labels.tolist()) == (
        local.text_a,
        local.text_b,
        local.labels.tolist(),
    )


def test_hub_split_names(fake_hub):
    assert load_split("mnli", "dev").labels.tolist() == [2]
    assert fake_hub[-1] == ("nyu-mll/glue", "mnli", "validation_matched")
    with pytest.raises(ValueError, match="label -1"):  # an unlabelled split
        load_split("mnli", "dev_mismatched")


def test_task_from_hub(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("EE_GYM_DATA", str(tmp_path))  # hub tasks ignore the data folder
    spec = task_from_hub(
        "reviews", "someone/reviews", text_columns="review", label_column="stars", labels=["neg", "pos"]
    )
    assert get_task("reviews") is spec
    assert spec.hub == ("someone/reviews", None) and spec.hub_splits == {
        "train": "train",
        "dev": "validation",
    }
    examples = load_split("reviews", "train")
    assert examples.text_b is None and examples.labels.tolist() == [1, 0, 1]
    assert fake_hub[-1] == ("someone/reviews", None, "train")


# ----------------------------------------------------------------------------- task_from_files


def test_task_from_files_csv(tmp_path):
    train = write(
        tmp_path / "train.csv", rows("text,label", '"Hello, world",pos', '"He said ""no""",neg', "ok,pos")
    )
    dev = write(tmp_path / "dev.csv", rows("text,label", "fine,neg"))
    spec = task_from_files("Sentiment", train=train, dev=dev, text_columns="text", label_column="label")
    assert spec.labels == ("neg", "pos") and spec.metric == "accuracy"
    assert spec.env_name == "Sentiment" and get_task("sentiment") is spec
    examples = load_split("sentiment", "train")
    assert examples.text_a == ["Hello, world", 'He said "no"', "ok"]
    assert examples.text_b is None and examples.labels.tolist() == [1, 0, 1]
    assert load_split(spec, "dev").labels.tolist() == [0]


def test_task_from_files_tsv_pairs(tmp_path):
    train = write(
        tmp_path / "t.tsv", rows("id\tpremise\thypothesis\tverdict", '1\tA "q.\tB. \tyes', "2\tC.\tD.\tno")
    )
    spec = task_from_files(
        "my_pairs",
        train=train,
        text_columns=["premise", "hypothesis"],
        label_column="verdict",
        labels=["yes", "no"],
    )
    assert spec.env_name == "MyPairs" and spec.text_columns == ("premise", "hypothesis")
    examples = load_split("my-pairs")
    assert (examples.text_a, examples.text_b, examples.labels.tolist()) == (
        ['A "q.', "C."],
        ["B.", "D."],
        [0, 1],
    )
    with pytest.raises(ValueError, match="valid splits: train"):
        load_split("my_pairs", "dev")


def test_task_from_files_jsonl_int_labels(tmp_path):
    lines = ['{"s": "one", "y": 10}', '{"s": "two", "y": 2}', "", '{"s": "three", "y": 3}']
    train = write(tmp_path / "train.jsonl", rows(*lines))
    spec = task_from_files("stars", train=train, text_columns="s", label_column="y", metric="f1")
    assert spec.labels == ("2", "3", "10")  # numeric order, not string order
    assert load_split("stars").labels.tolist() == [2, 0, 1]
    scores = compute_metrics("stars", [2, 0, 0], [2, 0, 1])
    assert list(scores) == ["f1", "accuracy"]  # three labels: macro F1
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_task_from_files_json_array(tmp_path):
    train = write(
        tmp_path / "train.json", '[{"a": "x", "b": "y", "l": true}, {"a": "z", "b": "w", "l": false}]'
    )
    spec = task_from_files("flags", train=train, text_columns=("a", "b"), label_column="l")
    assert spec.labels == ("False", "True")
    assert load_split("flags").labels.tolist() == [1, 0]


def test_task_from_files_errors(tmp_path):
    train = write(tmp_path / "train.csv", rows("text,label", "a,pos", "b,neg", "c,meh"))
    with pytest.raises(ValueError, match=r"train\.csv, line 4: label 'meh'"):
        task_from_files("t1", train=train, text_columns="text", label_column="label", labels=["neg", "pos"])
    with pytest.raises(ValueError, match="no column"):
        task_from_files("t2", train=train, text_columns="sentence", label_column="label")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        task_from_files("t3", train=tmp_path / "missing.csv", text_columns="text", label_column="label")
    with pytest.raises(ValueError, match="built-in"):
        task_from_files("SST-2", train=train, text_columns="text", label_column="label")
    odd = write(tmp_path / "train.txt", "text|label\na|b\n")
    with pytest.raises(ValueError, match="delimiter="):
        task_from_files("t4", train=odd, text_columns="text", label_column="label")
    spec = task_from_files(
        "t4", train=odd, text_columns="text", label_column="label", delimiter="|", labels=["b", "c"]
    )
    assert load_split(spec).labels.tolist() == [0]
    assert "t1" not in task_names()


def test_task_from_files_replaces_itself(tmp_path):
    first = write(tmp_path / "a.csv", rows("t,l", "x,0", "y,1"))
    second = write(tmp_path / "b.csv", rows("t,l", "x,0", "y,1", "z,1"))
    task_from_files("mine", train=first, text_columns="t", label_column="l")
    task_from_files("mine", train=second, text_columns="t", label_column="l")
    assert len(load_split("mine")) == 3


def test_task_from_files_ignores_data_dir(tmp_path, monkeypatch):
    train = write(tmp_path / "train.tsv", rows("text\tlabel", "a\t0", "b\t1"))
    task_from_files("own", train=train, text_columns="text", label_column="label")
    monkeypatch.setenv("EE_GYM_DATA", str(tmp_path / "does_not_exist"))
    assert len(load_split("own", data_dir=tmp_path / "also_missing")) == 2


# ----------------------------------------------------------------------------- Examples


def test_examples_select_and_head():
    examples = Examples(["a", "b", "c", "d"], ["A", "B", "C", "D"], [0, 1, 1, 0])
    assert len(examples) == 4 and examples.labels.dtype == np.int64
    picked = examples.select([2, 0])
    assert (picked.text_a, picked.text_b, picked.labels.tolist()) == (["c", "a"], ["C", "A"], [1, 0])
    masked = examples.select(examples.labels == 1)
    assert masked.text_a == ["b", "c"]
    assert examples.select(np.array([], dtype=np.int64)).text_a == []
    assert examples.select([]).text_b == []
    assert examples.head(2).text_a == ["a", "b"]
    assert examples.head(10).text_a == examples.text_a
    assert examples.head(None).text_a == examples.text_a
    assert examples.head(None) is not examples
    assert "n=4" in repr(examples)
    single = Examples(["x"], None, np.array([1]))
    assert single.select([0]).text_b is None
    with pytest.raises(ValueError):
        examples.head(-1)
    with pytest.raises(IndexError):
        examples.select([7])
    with pytest.raises(TypeError):
        examples.select([0.5])
    with pytest.raises(ValueError, match="differ in length"):
        Examples(["a"], ["A", "B"], [0])


# ----------------------------------------------------------------------------- metrics


def test_metrics_matthews_by_hand():
    labels = [1, 1, 1, 0, 0, 0]
    preds = [1, 1, 0, 0, 0, 1]  # TP=2 TN=2 FP=1 FN=1
    scores = compute_metrics("cola", preds, labels)
    assert list(scores) == ["matthews", "accuracy"]
    assert scores["matthews"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert compute_metrics("cola", [1, 1, 1], [1, 0, 1])["matthews"] == 0.0  # constant predictions


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_metrics_f1_by_hand(task):
    labels = np.array([1, 1, 1, 1, 0, 0])
    preds = np.array([1, 1, 0, 0, 1, 0])  # TP=2 FP=1 FN=2: P=2/3, R=1/2
    scores = compute_metrics(task, preds, labels)
    assert list(scores) == ["f1", "accuracy"]
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["accuracy"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in scores.values())


def test_metrics_accuracy_and_errors():
    assert compute_metrics("rte", [0, 1, 1, 1], [0, 1, 0, 1]) == {"accuracy": 0.75}
    assert compute_metrics("mnli", [0, 1, 2], [0, 1, 1]) == pytest.approx({"accuracy": 2 / 3})
    with pytest.raises(ValueError, match="equally long"):
        compute_metrics("rte", [0, 1], [0])
    with pytest.raises(ValueError, match="label ids"):
        compute_metrics("rte", [0, 2], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("rte", [], [])


# ----------------------------------------------------------------------------- the real data (integration)

# Rows per split, as the data folder's README.md gives them, except MRPC train: the shared file
# holds 3,667 data rows (3,668 lines with its header) where the README says 3,668.
README_ROWS = {
    ("rte", "train"): 2490,
    ("rte", "dev"): 277,
    ("mrpc", "train"): 3667,
    ("mrpc", "dev"): 408,
    ("sst2", "train"): 67349,
    ("sst2", "dev"): 872,
    ("cola", "train"): 8551,
    ("cola", "dev"): 1043,
}


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA:
        pytest.skip(
            "EE_GYM_DATA is not set: point it at the offline data folder (the one holding glue/RTE/...)"
        )
    return Path(REAL_DATA)


@pytest.mark.integration
@pytest.mark.parametrize(("task", "split"), list(README_ROWS))
def test_real_row_counts(real_data, task, split):
    assert len(load_split(task, split, data_dir=real_data)) == README_ROWS[task, split]


@pytest.mark.integration
@pytest.mark.parametrize(("task", "split"), list(README_ROWS))
def test_real_rows_match_raw_lines(real_data, task, split):
    """Every data line of the file becomes one example: no rows merged by quotes, none dropped."""
    spec = get_task(task)
    path = real_data / "glue" / spec.glue_dir / spec.split_files[split]
    lines = path.read_bytes().splitlines()
    header = 1 if spec.local_format.header else 0
    assert len(load_split(task, split, data_dir=real_data)) == len([line for line in lines if line]) - header


# Majority label and its share range for each task (train and dev).
BALANCE = {
    "rte": (None, 0.45, 0.55),
    "mrpc": (1, 0.64, 0.71),
    "sst2": (1, 0.50, 0.58),
    "cola": (1, 0.67, 0.72),
}


@pytest.mark.integration
@pytest.mark.parametrize("task", ["rte", "mrpc", "sst2", "cola"])
@pytest.mark.parametrize("split", ["train", "dev"])
def test_real_label_balance_and_texts(real_data, task, split):
    examples = load_split(task, split, data_dir=real_data)
    spec = get_task(task)
    counts = np.bincount(examples.labels, minlength=spec.num_labels)
    assert len(counts) == spec.num_labels and (counts > 0).all()
    majority, low, high = BALANCE[task]
    share = counts.max() / counts.sum() if majority is None else counts[majority] / counts.sum()
    assert low <= share <= high, f"{task} {split}: label counts {counts.tolist()}"
    assert (examples.text_b is not None) == spec.is_pair
    for column in (examples.text_a, examples.text_b or []):
        assert all(
            text and text == text.rstrip() and "\t" not in text and "\n" not in text for text in column
        )
    primary = spec.metric
    assert compute_metrics(task, examples.labels, examples.labels)[primary] == pytest.approx(1.0)


@pytest.mark.integration
def test_real_first_rows(real_data):
    rte = load_split("rte", data_dir=real_data, limit=1)
    assert rte.text_a == ["No Weapons of Mass Destruction Found in Iraq Yet."]
    assert rte.text_b == ["Weapons of Mass Destruction Found in Iraq."] and rte.labels.tolist() == [1]
    mrpc = load_split("mrpc", data_dir=real_data, limit=1)
    assert mrpc.text_a[0].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert mrpc.labels.tolist() == [1]
    assert load_split("sst2", data_dir=real_data, limit=1).text_a == [
        "hide new secretions from the parental units"
    ]
    cola = load_split("cola", "dev", data_dir=real_data, limit=1)
    assert cola.text_a == ["The sailors rode the breeze clear of the rocks."] and cola.labels.tolist() == [1]


# ----------------------------------------------------------------------------- split slices


def _sst2_rows(root: Path, n: int) -> list[str]:
    """A local SST-2 train split of ``n`` rows named "s0", "s1", ...; returns those texts."""
    texts = [f"s{i}" for i in range(n)]
    write(
        root / "glue" / "SST-2" / "train.tsv",
        rows("sentence\tlabel", *(f"{t}\t{i % 2}" for i, t in enumerate(texts))),
    )
    write(root / "glue" / "SST-2" / "dev.tsv", rows("sentence\tlabel", "d0\t1", "d1\t0", "d2\t1"))
    return texts


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train[:2]", slice(0, 2)),
        ("train[2:]", slice(2, None)),
        ("train[2:5]", slice(2, 5)),
        ("train[:100]", slice(0, None)),  # row counts past the end are clipped, as in Python
        ("train[5:2]", slice(0, 0)),
        ("train[:]", slice(0, None)),
        ("train[:50%]", slice(0, 3)),  # 3.5 rounds down
        ("train[50%:]", slice(3, None)),
        ("train[10%:90%]", slice(0, 6)),  # 0.7 -> 0, 6.3 -> 6
        ("train[12.5%:]", slice(0, None)),  # 0.875 -> 0
        ("train[:100%]", slice(0, None)),
        (" Train [ :2 ] ", slice(0, 2)),
    ],
)
def test_split_slices(tmp_path, split, expected):
    texts = _sst2_rows(tmp_path, 7)
    assert load_split("sst2", split, data_dir=tmp_path).text_a == texts[expected]


@pytest.mark.parametrize("n", [1, 7, 10, 2490, 2491])
@pytest.mark.parametrize("percent", ["0", "1", "33", "50", "90", "99", "12.5", "100"])
def test_percent_slices_partition_the_split(tmp_path, n, percent):
    texts = _sst2_rows(tmp_path, n)
    head = load_split("sst2", f"train[:{percent}%]", data_dir=tmp_path).text_a
    tail = load_split("sst2", f"train[{percent}%:]", data_dir=tmp_path).text_a
    assert head + tail == texts
    assert len(head) == math.floor(float(percent) * n / 100)


def test_split_slice_comes_before_limit_and_takes_aliases(tmp_path):
    texts = _sst2_rows(tmp_path, 7)
    assert load_split("sst2", "train[2:]", data_dir=tmp_path, limit=2).text_a == texts[2:4]
    assert load_split("sst2", "train[:50%]", data_dir=tmp_path, limit=10).text_a == texts[:3]
    assert load_split("sst2", "validation[1:]", data_dir=tmp_path).text_a == ["d1", "d2"]
    assert load_split("sst2", "dev[:34%]", data_dir=tmp_path).text_a == ["d0"]  # 1.02 -> 1


@pytest.mark.parametrize(
    "split", ["train[50]", "train[:150%]", "train[a:]", "train[:90%", "train]", "train[-5:]", "train[:90%%]"]
)
def test_malformed_split_slices_are_refused_with_an_example(tmp_path, split):
    _sst2_rows(tmp_path, 7)
    with pytest.raises(ValueError, match=r"e\.g\. 'train\[:90%\]'"):
        load_split("sst2", split, data_dir=tmp_path)


def test_unknown_split_with_a_slice(tmp_path):
    _sst2_rows(tmp_path, 7)
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        load_split("sst2", "test[:50%]", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("split", "parsed", "slug"),
    [
        ("train", ("train", None, None), "train"),
        ("dev", ("dev", None, None), "dev"),
        ("train[:90%]", ("train", None, "90%"), "train-to90pct"),
        ("train[90%:]", ("train", "90%", None), "train-from90pct"),
        ("train[:2000]", ("train", None, "2000"), "train-to2000"),
        ("train[2000:]", ("train", "2000", None), "train-from2000"),
        ("train[10:20]", ("train", "10", "20"), "train-10to20"),
        ("train[:12.5%]", ("train", None, "12.5%"), "train-to12.5pct"),
        ("train[:]", ("train", None, None), "train-all"),
    ],
)
def test_parse_split_and_split_slug(split, parsed, slug):
    assert tasks.parse_split(split) == parsed
    assert tasks.split_slug(split) == slug
