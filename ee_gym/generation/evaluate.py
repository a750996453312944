"""Score early-exit generation: ROUGE against references, exit layers, and decoding speed.

For each exit policy (``None`` = full depth) over the same articles:

* ROUGE-1/2/L F-measure (x100, ``rouge-score`` with its Porter stemmer, as the XSum literature
  reports) of the greedy summaries, cut at the data's ``###`` stop marker;
* the mean exit layer over the tokens an exit decided (every generated token but the first, which
  the prompt's full-depth pass produces), the layer speed-up L / mean and the saved layers 1 - mean/L;
* wall-clock decoding speed (:mod:`ee_gym.generation.timing`): tokens per second against full depth
  in alternating rounds, at the thread counts and batch sizes of a :class:`TimingSettings`, prompt
  pass timed apart, with each rule's decision cost against a layer's measured in the same run.

Every policy decodes from one shared prefill per batch of articles (``DecodeState.clone``): the
prompt runs once, whatever the number of policies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ee_gym.generation.data import Article, clean_summary, format_prompt
from ee_gym.generation.decoder import ExitFn, MultiExitDecoder
from ee_gym.generation.timing import TimingSettings, time_policies

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_per_article(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """ROUGE-1/2/L F-measure x 100 of each prediction against its reference: [N] per kind. Paired
    intervals between two policies resample these (the same articles for both)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs the rouge-score package: pip install 'ee-gym[generation]'") from None
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = {kind: np.zeros(len(predictions)) for kind in ROUGE_TYPES}
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for kind in ROUGE_TYPES:
            out[kind][i] = 100.0 * scores[kind].fmeasure
    return out


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x 100 of ``predictions`` against ``references``."""
    return rouge_means(rouge_per_article(predictions, references))


def rouge_means(per_article: dict[str, np.ndarray]) -> dict[str, float]:
    """The means of :func:`rouge_per_article`'s scores (0 for no article)."""
    return {kind: float(values.mean()) if len(values) else 0.0 for kind, values in per_article.items()}


@dataclass
class GenerationRun:
    """One exit policy's results over the evaluated articles."""

    name: str
    rouge: dict[str, float]
    mean_exit_layer: float
    speedup: float
    saved_layers: float
    num_layers: int
    decided_tokens: int  # tokens whose exit a policy decided
    exit_histogram: list[int]  # decided tokens exiting at layer 1..L
    # ROUGE-L x 100 of each article, in article order (for paired intervals)
    rouge_l_per_article: list[float] = field(default_factory=list)
    # wall clock (ee_gym.generation.timing), at batch 1 on the first thread count timed; None when untimed
    tokens_per_second: float | None = None  # median over rounds, prompt pass excluded
    wall_speedup: float | None = None  # against full depth in the same rounds
    decision_us: float | None = None  # per layer the rule is asked at (from its min layer)
    decision_fraction: float | None = None  # over one decoder layer's time, same run
    probe_us: float | None = None  # per layer where it read a signal (one in k for a rule probing every k)
    reads: str | None = None  # what a decision reads (ee_gym.generation.costs.READS)
    timing_tokens: int = 0
    timing: list[dict] = field(default_factory=list)  # every thread count and batch size timed
    summaries: list[str] = field(default_factory=list, repr=False)

    def to_dict(self, with_summaries: bool = False) -> dict:
        record = asdict(self)
        if not with_summaries:
            record.pop("summaries")
        return record


def _encode(decoder: MultiExitDecoder, articles: Sequence[Article]) -> list[str]:
    if decoder.tokenizer is None:
        raise ValueError("generation from text needs the decoder's tokenizer")
    return [format_prompt(decoder.tokenizer, a.article) for a in articles]


def _batches(decoder: MultiExitDecoder, prompts: list[str], batch_size: int) -> list[np.ndarray]:
    """Indices of prompts in length-sorted batches (little padding)."""
    lengths = [len(decoder.tokenizer(p)["input_ids"]) for p in prompts]
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_with_policies(
    decoder: MultiExitDecoder,
    articles: Sequence[Article],
    exit_fns: Mapping[str, ExitFn | None],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, tuple[list[str], list[np.ndarray]]]:
    """Per policy: (summaries, exit layers of each article's generated tokens), in article order."""
    prompts = _encode(decoder, articles)
    texts = {name: [""] * len(prompts) for name in exit_fns}
    layers: dict[str, list[np.ndarray]] = {
        name: [np.zeros(0, dtype=np.int64)] * len(prompts) for name in exit_fns
    }
    batches = _batches(decoder, prompts, batch_size)
    bar = tqdm(total=len(batches) * len(exit_fns), desc="generation", unit="run", disable=not progress)
    for rows in batches:
        batch = decoder.tokenizer(
            [prompts[i] for i in rows], return_tensors="pt", padding=True, padding_side="left"
        )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        first, state = decoder.prefill(ids, mask)
        for name, exit_fn in exit_fns.items():
            out = decoder.generate(
                ids, mask, max_new_tokens=max_new_tokens, exit_fn=exit_fn, prefilled=(first, state.clone())
            )
            for j, i in enumerate(rows.tolist()):
                used = out.exit_layers[j] > 0
                texts[name][i] = clean_summary(
                    decoder.tokenizer.decode(out.tokens[j][used], skip_special_tokens=True)
                )
                layers[name][i] = out.exit_layers[j][used].cpu().numpy()
            bar.update(1)
            bar.set_postfix(policy=name)
    bar.close()
    return {name: (texts[name], layers[name]) for name in exit_fns}


def evaluate_generation(
    decoder: MultiExitDecoder,
    articles: Sequence[Article],
    exit_fns: Mapping[str, ExitFn | None],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    timing: TimingSettings | None = None,
    progress: bool = True,
    timed: dict | None = None,
    scored: Callable[[list[GenerationRun]], None] | None = None,
) -> list[GenerationRun]:
    """Score every policy of ``exit_fns`` (name -> exit_fn, ``None`` = full depth, named ``full
    depth`` to be timed against) on ``articles``, and time them unless ``timing`` is None
    (:func:`time_policies`; the policies ``timing.times`` names; pass a dict as ``timed`` to receive
    its whole record, prompt passes included). ``scored`` gets the runs before the timing starts, so
    that a caller can keep the scores of a run whose timing is cut short."""
    generated = generate_with_policies(decoder, articles, exit_fns, max_new_tokens, batch_size, progress)
    references = [a.reference for a in articles]
    if scored is not None:
        scored(_runs(generated, references, decoder.num_layers, []))
    cells: list[dict] = []
    if timing is not None:
        # references that look ahead (the oracle) decode every token twice: their speed means nothing
        deployable = {
            name: fn
            for name, fn in exit_fns.items()
            if getattr(fn, "deployable", True) and timing.times(name)
        }
        record = time_policies(
            decoder, _encode(decoder, articles), deployable, timing, max_new_tokens, progress
        )
        cells = record["cells"]
        if timed is not None:
            timed.update(record)
    return _runs(generated, references, decoder.num_layers, cells)


def _runs(generated: dict, references: list[str], num_layers: int, cells: list[dict]) -> list[GenerationRun]:
    """One record per policy from its texts and exit layers, with its timing cells (if any)."""
    first = (cells[0]["threads"], cells[0]["batch_size"]) if cells else None
    runs = []
    for name, (texts, layers) in generated.items():
        decided = np.concatenate([row[1:] for row in layers]) if layers else np.zeros(0, dtype=np.int64)
        mean = float(decided.mean()) if decided.size else float(num_layers)
        mine = [c for c in cells if c["policy"] == name]
        main = next((c for c in mine if (c["threads"], c["batch_size"]) == first), {})
        per_article = rouge_per_article(texts, references)
        runs.append(
            GenerationRun(
                name=name,
                rouge=rouge_means(per_article),
                rouge_l_per_article=per_article["rougeL"].round(4).tolist(),
                mean_exit_layer=mean,
                speedup=num_layers / mean,
                saved_layers=1.0 - mean / num_layers,
                num_layers=num_layers,
                decided_tokens=int(decided.size),
                exit_histogram=np.bincount(decided, minlength=num_layers + 1)[1:].tolist(),
                tokens_per_second=main.get("tokens_per_second"),
                wall_speedup=main.get("wall_speedup"),
                decision_us=main.get("decision_us"),
                decision_fraction=main.get("decision_fraction"),
                probe_us=main.get("probe_us"),
                reads=main.get("reads"),
                timing_tokens=main.get("tokens", 0),
                timing=mine,
                summaries=texts,
            )
        )
    return runs
