"""Evaluation of MultiMood predictions: the published (paper) metrics and strict ones.

`multimood evaluate PREDICTIONS.jsonl --output METRICS.json [--report REPORT.md]` reads JSONL lines
carrying `prediction` and `reference` (the four-line answer text; the published files' `predict` /
`label` keys are accepted too) and writes two sections:

* `paper` reproduces the published evaluation script (`evaluation_smes/eval_final.py`): fields are
  found with line patterns (`Client emotion: (.*?)(?:\\n|$)`, ...; the published `Client's emotion:`
  spellings are accepted as well), stripped and lower-cased; a pair whose gold or predicted field
  was not found is dropped from that field's scores (`n_dropped`). Labels: accuracy and weighted
  precision/recall/F1 (scikit-learn, `zero_division=0`). Response: their "BLEU-2" (mean NLTK sentence
  BLEU, weights (0.99, 0.01), no smoothing, on `word_tokenize` of the lower-cased texts), ROUGE-1/2/L
  F-measure (rouge_score, stemmer on) averaged per pair, METEOR (NLTK) and BERTScore F1.
* `strict` parses with `parse_output` and counts what could not be parsed as wrong: parse rate,
  accuracy and macro-F1 (over the reference labels), corpus BLEU-1..4 (sacreBLEU), ROUGE, METEOR,
  BERTScore with an empty response for unparsed predictions, and Distinct-1/2.

NLTK data cannot always be downloaded: `prepare_nltk_data` builds WordNet 3.0 from Debian's
`wordnet-base` + `wordnet-sense-index`, and without `punkt_tab` the tokenizer falls back to the
Treebank tokenizer alone. The JSON's `provenance` says which tokenizer, WordNet and BERTScore model
were used, and `notes` says what differs from the published setup.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import nltk
import torch
from nltk.corpus import wordnet
from nltk.tokenize import word_tokenize
from nltk.translate.bleu_score import sentence_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from transformers import AutoConfig, AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

from ..cli import run_command
from ..data.record_files import iter_json_items
from ..model.records import MultimoodError, parse_output

LABEL_TASKS = ("client_emotion", "therapist_emotion", "strategy")
FIELDS = LABEL_TASKS + ("response",)
UNPARSED = "(unparsed)"

# The published patterns (`evaluation_smes/eval_final.py`) with our line prefixes added: case-sensitive,
# unanchored, the rest of the line after "<prefix>: ".
PAPER_PATTERNS = {
    "client_emotion": re.compile(r"(?:Client|Client's) emotion: (.*?)(?:\n|$)"),
    "therapist_emotion": re.compile(r"(?:Therapist|Therapist's) emotion: (.*?)(?:\n|$)"),
    "strategy": re.compile(r"(?:Strategy|Therapist's strategy): (.*?)(?:\n|$)"),
    "response": re.compile(r"(?:Response|Therapist's response): (.*?)(?:\n|$)"),
}
PAPER_BLEU_WEIGHTS = (0.99, 0.01)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

METRIC_SCRIPT = Path(__file__).with_name("multimood_metric.py")

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
# The database files NLTK's WordNetCorpusReader opens, besides `lexnames`.
WORDNET_FILES = (
    "cntlist.rev",
    "index.sense",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)
# WordNet 3.0's lexicographer files in file-number order (the `lexfiles` table of libwordnet);
# Debian does not ship the `lexnames` file NLTK reads them from.
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
_LEXNAME_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


# ----------------------------------------------------------------------------------------------
# NLTK resources
# ----------------------------------------------------------------------------------------------


def default_nltk_data_dir() -> Path:
    """`$MULTIMOOD_NLTK_DATA`, else `~/.cache/multimood/nltk_data` (XDG cache)."""
    if os.environ.get("MULTIMOOD_NLTK_DATA"):
        return Path(os.environ["MULTIMOOD_NLTK_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "multimood" / "nltk_data"


def lexnames_text() -> str:
    """The standard 45-line WordNet 3.0 `lexnames` file (`00\\tadj.all\\t3` ... `44\\tadj.ppl\\t3`)."""
    return "".join(f"{i:02d}\t{name}\t{_LEXNAME_POS[name.split('.')[0]]}\n" for i, name in enumerate(WORDNET_LEXNAMES))


def prepare_nltk_data(data_dir: str | Path | None = None, wordnet_dir: str | Path | None = None) -> Path | None:
    """Make `<data_dir>/corpora/wordnet` from Debian's WordNet 3.0 files (`wordnet_dir`, default
    /usr/share/wordnet); returns `data_dir`, or None when those files are missing.

    The files are copied, not linked, because NLTK refuses paths that leave its data roots; an
    existing complete copy is reused.
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_nltk_data_dir()
    source = Path(wordnet_dir) if wordnet_dir is not None else DEBIAN_WORDNET_DIR
    if not all((source / name).is_file() for name in WORDNET_FILES):
        return None
    target = data_dir / "corpora" / "wordnet"
    lexnames = lexnames_text()
    if (
        all(
            (target / n).is_file() and (target / n).stat().st_size == (source / n).stat().st_size
            for n in WORDNET_FILES
        )
        and (target / "lexnames").is_file()
        and (target / "lexnames").read_text() == lexnames
    ):
        return data_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for name in WORDNET_FILES:
            shutil.copyfile(source / name, staging / name)
        (staging / "lexnames").write_text(lexnames)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data_dir


def _debian_package_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


@dataclass
class TextResources:
    """The tokenizer, WordNet and BERTScore model the text metrics use, with their provenance."""

    tokenize: Callable[[str], list[str]]
    wordnet: Any | None
    bertscore: BertScorer | None
    provenance: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def resolve_tokenizer() -> tuple[Callable[[str], list[str]], dict[str, Any], list[str]]:
    """The published `word_tokenize` when `punkt_tab` is present, else the Treebank tokenizer alone."""
    try:
        punkt = nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        info = {
            "name": "nltk.word_tokenize(text, preserve_line=True)",
            "published": False,
            "punkt_tab": None,
            "description": "Treebank word tokenizer without punkt sentence splitting",
        }
        note = (
            "punkt_tab was not found, so texts are tokenized with the Treebank tokenizer alone "
            "(word_tokenize(preserve_line=True)): a period inside a response stays on its word, which can "
            "change BLEU-2 and METEOR slightly from the published tokenization (punkt + Treebank)."
        )
        return partial(word_tokenize, preserve_line=True), info, [note]
    info = {
        "name": "nltk.word_tokenize(text)",
        "published": True,
        "punkt_tab": str(punkt),
        "description": "punkt sentence splitting, then the Treebank word tokenizer (as published)",
    }
    return word_tokenize, info, []


def resolve_wordnet(nltk_data: str | Path | None = None) -> tuple[Any | None, dict[str, Any], list[str]]:
    """NLTK's WordNet: the installed NLTK data when present (as published), else Debian's copy."""
    data_dir = Path(nltk_data).expanduser() if nltk_data is not None else default_nltk_data_dir()
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        if prepare_nltk_data(data_dir) is None:
            info = {"source": None, "path": None, "version": None}
            note = (
                "WordNet was not found (no NLTK wordnet data and no Debian wordnet-base/wordnet-sense-index "
                f"under {DEBIAN_WORDNET_DIR}): METEOR is null."
            )
            return None, info, [note]
        if str(data_dir) not in nltk.data.path:
            nltk.data.path.append(str(data_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wordnet_version = wordnet.get_version()
    root = Path(str(wordnet.root)).resolve()
    notes = []
    if root.is_relative_to(data_dir.resolve()):
        package = _debian_package_version("wordnet-base")
        info = {
            "source": "debian",
            "path": str(root),
            "version": wordnet_version,
            "debian_package": f"wordnet-base {package}" if package else "wordnet-base",
        }
        notes.append(
            f"WordNet {wordnet_version} comes from Debian's wordnet-base/wordnet-sense-index (copied to {root}), "
            "not from NLTK's wordnet download; both are Princeton WordNet 3.0."
        )
    else:
        info = {"source": "nltk_data", "path": str(root), "version": wordnet_version}
    return wordnet, info, notes


class BertScorer:
    """BERTScore F1 from a local model, as `bert_score.score` computes it (no idf, no rescaling).

    Differences from calling `bert_score.score` on transformers >= 5, both restoring its intended
    behaviour: a GPT-2/RoBERTa tokenizer is loaded with `add_prefix_space=True` (bert_score passes it
    per call, which transformers 5 ignores), and a pair with an empty side scores 0 without reaching
    the model (what bert_score returns for it; its empty-text path fails on transformers 5).
    """

    def __init__(
        self, model_path: str | Path, num_layers: int | None = None, batch_size: int = 64, device: str | None = None
    ):
        # bert_score takes seconds to import (pandas, its model tables): only when BERTScore is asked for
        from bert_score.utils import get_model, model2layers  # noqa: PLC0415

        path = str(model_path)
        if num_layers is not None:
            layers_from = "argument"
        elif Path(path).name in model2layers:
            num_layers, layers_from = model2layers[Path(path).name], "bert_score default for this model name"
        else:
            num_layers, layers_from = AutoConfig.from_pretrained(path).num_hidden_layers, "last layer"
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False)
        add_prefix_space = isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer))
        if add_prefix_space:
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, add_prefix_space=True)
        self.tokenizer = tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = get_model(path, num_layers).to(self.device)
        self.batch_size = batch_size
        self.provenance = {
            "model": path,
            "num_layers": int(num_layers),
            "num_layers_from": layers_from,
            "add_prefix_space": add_prefix_space,
            "idf": False,
            "rescale_with_baseline": False,
            "bert_score": _package_version("bert-score"),
        }

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        from bert_score.utils import bert_cos_score_idf  # noqa: PLC0415 - slow import, see __init__

        scores = [0.0] * len(candidates)
        keep = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
        if keep:
            idf_dict = defaultdict(lambda: 1.0)
            idf_dict[self.tokenizer.sep_token_id] = 0
            idf_dict[self.tokenizer.cls_token_id] = 0
            preds = bert_cos_score_idf(
                self.model,
                [references[i] for i in keep],
                [candidates[i] for i in keep],
                self.tokenizer,
                idf_dict,
                verbose=False,
                device=self.device,
                batch_size=self.batch_size,
            ).cpu()
            for i, f1 in zip(keep, preds[..., 2].tolist()):
                scores[i] = float(f1)
        return scores


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def resolve_resources(
    nltk_data: str | Path | None = None,
    bertscore_model: str | Path | None = None,
    bertscore_num_layers: int | None = None,
    bertscore_batch_size: int = 64,
) -> TextResources:
    """Find the tokenizer, WordNet and BERTScore model, and record which ones were used."""
    data_dir = Path(nltk_data).expanduser() if nltk_data is not None else default_nltk_data_dir()
    if data_dir.is_dir() and str(data_dir) not in nltk.data.path:
        nltk.data.path.append(str(data_dir))  # a punkt_tab placed there is found too
    tokenize, tokenizer_info, notes = resolve_tokenizer()
    wordnet, wordnet_info, wordnet_notes = resolve_wordnet(data_dir)
    notes += wordnet_notes
    bertscore = None
    if bertscore_model is None:
        notes.append("BERTScore skipped: no local model given (--bertscore-model PATH; the paper used roberta-large).")
    elif not Path(bertscore_model).exists():
        notes.append(f"BERTScore skipped: model path {bertscore_model} does not exist.")
    elif _package_version("bert-score") is None:
        notes.append("BERTScore skipped: the bert-score package is not installed (pip install 'multimood[eval]').")
    else:
        bertscore = BertScorer(bertscore_model, bertscore_num_layers, bertscore_batch_size)
        if Path(bertscore_model).name != "roberta-large" or bertscore.provenance["num_layers"] != 17:
            notes.append(
                f"BERTScore uses {bertscore_model} (layer {bertscore.provenance['num_layers']}); the paper used "
                "roberta-large, layer 17, so its figures are not comparable."
            )
    provenance = {
        "tokenizer": tokenizer_info,
        "wordnet": wordnet_info,
        "bertscore": bertscore.provenance if bertscore else None,
        "libraries": {
            name: _package_version(name) for name in ("nltk", "rouge-score", "scikit-learn", "sacrebleu", "bert-score")
        },
    }
    return TextResources(tokenize, wordnet, bertscore, provenance, notes)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def parse_paper(text: str | None) -> dict[str, str | None]:
    """The published extraction: the rest of the matching line, stripped and lower-cased, or None."""
    text = text or ""
    result = {}
    for key, pattern in PAPER_PATTERNS.items():
        match = pattern.search(text)
        result[key] = match.group(1).strip().lower() if match else None
    return result


def normalize_label(value: str | None) -> str | None:
    """Case and spacing do not make a label wrong."""
    return " ".join(value.split()).lower() if value else None


def parse_strict(text: str | None) -> dict[str, str | None]:
    """`parse_output` fields, labels normalized; None where a field is missing or empty."""
    parsed = parse_output(text or "")
    return {key: normalize_label(parsed[key]) if key in LABEL_TASKS else parsed[key] for key in FIELDS}


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def distinct_n(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique n-grams over all n-grams of all texts; 0 when there are none."""
    ngrams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _rouge(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, list]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, hyp) for ref, hyp in zip(references, hypotheses)]
    return {name: [s[name] for s in scores] for name in ROUGE_TYPES}


def _meteor(ref_tokens, hyp_tokens, wordnet) -> float | None:
    """Mean NLTK METEOR, 0 for a pair with an empty side (as published); None without WordNet."""
    if wordnet is None:
        return None
    return _mean([meteor_score([r], h, wordnet=wordnet) if r and h else 0.0 for r, h in zip(ref_tokens, hyp_tokens)])


def paper_metrics(predictions: Sequence[str], references: Sequence[str], resources: TextResources) -> dict[str, Any]:
    """The published evaluation (see the module docstring), on our line prefixes."""
    gold = [parse_paper(t) for t in references]
    pred = [parse_paper(t) for t in predictions]
    out: dict[str, Any] = {}
    n_scored, n_dropped = {}, {}
    for task in LABEL_TASKS:
        pairs = [(g[task], p[task]) for g, p in zip(gold, pred) if g[task] is not None and p[task] is not None]
        n_scored[task], n_dropped[task] = len(pairs), len(gold) - len(pairs)
        if pairs:
            y_true, y_pred = [g for g, _ in pairs], [p for _, p in pairs]
            precision, recall, f1, _ = precision_recall_fscore_support(
                y_true, y_pred, average="weighted", zero_division=0
            )
            values = (accuracy_score(y_true, y_pred), precision, recall, f1)
        else:
            values = (None,) * 4
        for name, value in zip(("accuracy", "precision", "recall", "f1"), values):
            out[f"{task}_{name}"] = None if value is None else float(value)

    pairs = [
        (g["response"], p["response"])
        for g, p in zip(gold, pred)
        if g["response"] is not None and p["response"] is not None
    ]
    n_scored["response"], n_dropped["response"] = len(pairs), len(gold) - len(pairs)
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    ref_tokens = [resources.tokenize(r.lower()) for r in refs]
    hyp_tokens = [resources.tokenize(h.lower()) for h in hyps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on every pair without a matching bigram
        bleu = [
            sentence_bleu([r], h, weights=PAPER_BLEU_WEIGHTS) if r and h else 0.0
            for r, h in zip(ref_tokens, hyp_tokens)
        ]
    rouge = _rouge(refs, hyps)
    out["bleu2"] = _mean(bleu)
    out["rouge1"] = _mean([s.fmeasure for s in rouge["rouge1"]])
    out["rouge2"] = _mean([s.fmeasure for s in rouge["rouge2"]])
    out["rougeL"] = _mean([s.fmeasure for s in rouge["rougeL"]])
    out["rougeL_precision"] = _mean([s.precision for s in rouge["rougeL"]])
    out["rougeL_recall"] = _mean([s.recall for s in rouge["rougeL"]])
    out["meteor"] = _meteor(ref_tokens, hyp_tokens, resources.wordnet)
    out["bertscore_f1"] = _mean(resources.bertscore(hyps, refs)) if resources.bertscore and pairs else None
    complete = sum(all(p[key] is not None for key in FIELDS) for p in pred)
    out["parse_rate"] = complete / len(pred) if pred else None
    out["n"] = len(pred)
    out["n_scored"] = n_scored
    out["n_dropped"] = n_dropped
    return out


def strict_metrics(predictions: Sequence[str], references: Sequence[str], resources: TextResources) -> dict[str, Any]:
    """Unparseable predictions count as wrong (labels) or empty (response); unparseable references are excluded."""
    gold_all = [parse_strict(t) for t in references]
    pred_all = [parse_strict(t) for t in predictions]
    keep = [i for i, g in enumerate(gold_all) if all(g[key] is not None for key in FIELDS)]
    gold, pred = [gold_all[i] for i in keep], [pred_all[i] for i in keep]
    out: dict[str, Any] = {}
    for task in LABEL_TASKS:
        y_true = [g[task] for g in gold]
        y_pred = [p[task] if p[task] is not None else UNPARSED for p in pred]
        if y_true:
            out[f"{task}_accuracy"] = float(accuracy_score(y_true, y_pred))
            out[f"{task}_f1"] = float(
                f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)
            )
        else:
            out[f"{task}_accuracy"] = out[f"{task}_f1"] = None

    refs = [g["response"] for g in gold]
    hyps = [p["response"] or "" for p in pred]
    signature = None
    for order in (1, 2, 3, 4):
        if refs:
            bleu = BLEU(max_ngram_order=order)
            out[f"bleu{order}"] = bleu.corpus_score(hyps, [refs]).score / 100
            signature = str(bleu.get_signature())
        else:
            out[f"bleu{order}"] = None
    rouge = _rouge(refs, hyps)
    for name in ROUGE_TYPES:
        out[name] = _mean([s.fmeasure for s in rouge[name]])
    ref_tokens = [resources.tokenize(r.lower()) for r in refs]
    hyp_tokens = [resources.tokenize(h.lower()) for h in hyps]
    out["meteor"] = _meteor(ref_tokens, hyp_tokens, resources.wordnet)
    out["bertscore_f1"] = _mean(resources.bertscore(hyps, refs)) if resources.bertscore and refs else None
    out["distinct1"] = distinct_n(hyp_tokens, 1) if refs else None
    out["distinct2"] = distinct_n(hyp_tokens, 2) if refs else None
    out["parse_rate"] = _mean([float(all(p[key] is not None for key in FIELDS)) for p in pred])
    out["n"] = len(gold)
    out["n_reference_unparseable"] = len(gold_all) - len(gold)
    out["bleu_signature"] = signature
    return out


def compute_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    resources: TextResources | None = None,
    **resource_kwargs: Any,
) -> dict[str, Any]:
    """Both sections, the provenance of the tokenizer / WordNet / BERTScore model and notes.

    `resource_kwargs` go to `resolve_resources` (`nltk_data`, `bertscore_model`, ...) when no
    `resources` are given.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    resources = resources or resolve_resources(**resource_kwargs)
    paper = paper_metrics(predictions, references, resources)
    strict = strict_metrics(predictions, references, resources)
    notes = list(resources.notes)
    dropped = {task: n for task, n in paper["n_dropped"].items() if n}
    if dropped:
        notes.append(
            "paper: pairs whose gold or predicted field the published patterns could not find were dropped: "
            + ", ".join(f"{task} {n}" for task, n in dropped.items())
            + f" of {paper['n']}."
        )
    if strict["n_reference_unparseable"]:
        notes.append(
            f"strict: {strict['n_reference_unparseable']} reference(s) without all four fields were excluded."
        )
    notes.append(
        "strict: BLEU is sacreBLEU corpus BLEU (13a tokenization, case-sensitive, exp smoothing) on a 0-1 scale; "
        "macro-F1 averages over the reference labels; Distinct-n counts n-grams over all predictions."
    )
    return {"paper": paper, "strict": strict, "provenance": resources.provenance, "notes": notes}


# ----------------------------------------------------------------------------------------------
# Input, report, CLI
# ----------------------------------------------------------------------------------------------


def load_predictions(path: str | Path) -> tuple[list[str], list[str]]:
    """`(predictions, references)` from a JSONL file (`prediction`/`reference`, or `predict`/`label`).

    Lines that are not UTF-8 or not JSON objects with both strings raise `MultimoodError` naming the line.
    """
    predictions, references = [], []
    for location, row, error in iter_json_items(path):
        if error is not None:
            raise error
        if not isinstance(row, dict):
            raise MultimoodError(f"{path} {location}: expected a JSON object, got {type(row).__name__}")
        prediction = row.get("prediction", row.get("predict"))
        reference = row.get("reference", row.get("label"))
        for name, value in (("prediction", prediction), ("reference", reference)):
            if not isinstance(value, str):
                raise MultimoodError(f"{path} {location}: field {name!r} must be a string, got "
                                     f"{'null' if value is None else type(value).__name__} (`multimood predict` "
                                     "writes a 'reference' for records with all four targets)")
        predictions.append(prediction)
        references.append(reference)
    if not predictions:
        raise MultimoodError(f"{path}: no predictions (an empty file)")
    return predictions, references


def _label_order(y_true: list[str], y_pred: list[str]) -> list[str]:
    """Labels sorted, `(unparsed)` last."""
    labels = sorted((set(y_true) | set(y_pred)) - {UNPARSED})
    return labels + [UNPARSED] if UNPARSED in y_pred else labels


def _confusion_png(y_true: list[str], y_pred: list[str], title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib only for --report's images

    columns = _label_order(y_true, y_pred)
    rows = sorted(set(y_true))
    matrix = confusion_matrix(y_true, y_pred, labels=columns)[[columns.index(label) for label in rows]]
    fig = Figure(figsize=(4 + 0.45 * len(columns), 2.5 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    for row in range(len(rows)):
        for col in range(len(columns)):
            count = int(matrix[row, col])
            if count:
                color = "white" if count > matrix.max() / 2 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(
    metrics: dict[str, Any], predictions: Sequence[str], references: Sequence[str], path: str | Path
) -> list[Path]:
    """A Markdown report with the metrics, a confusion-matrix PNG per label task and the label
    distributions (strict parsing: normalized labels, unparsed predictions as `(unparsed)`).
    Returns the PNG paths (written beside the report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gold_all = [parse_strict(t) for t in references]
    pred_all = [parse_strict(t) for t in predictions]
    keep = [i for i, g in enumerate(gold_all) if all(g[key] is not None for key in FIELDS)]
    paper, strict = metrics["paper"], metrics["strict"]
    lines = [
        "# MultiMood evaluation",
        "",
        f"{paper['n']} prediction/reference pairs; {strict['n']} with a parseable reference.",
        "",
        "| metric | paper | strict |",
        "|---|---|---|",
    ]
    names = [f"{t}_{m}" for t in LABEL_TASKS for m in ("accuracy", "f1")]
    names += ["bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "meteor", "bertscore_f1"]
    names += ["distinct1", "distinct2", "parse_rate", "n"]
    for name in names:
        lines.append(f"| {name} | {_fmt(paper.get(name))} | {_fmt(strict.get(name))} |")
    lines += [
        "",
        "Paper F1 is weighted over the pairs both sides of which parse; strict F1 is macro over the reference "
        "labels with unparsed predictions counted wrong. Paper BLEU-2 is the published mean sentence BLEU with "
        "weights (0.99, 0.01); strict BLEU is sacreBLEU corpus BLEU.",
        "",
        "## Provenance",
        "",
        f"- tokenizer: {metrics['provenance']['tokenizer']['name']}",
        f"- WordNet: {json.dumps(metrics['provenance']['wordnet'])}",
        f"- BERTScore: {json.dumps(metrics['provenance']['bertscore'])}",
        "",
        "## Notes",
        "",
    ]
    lines += [f"- {note}" for note in metrics["notes"]]
    images = []
    for task in LABEL_TASKS:
        title = task.replace("_", " ")
        y_true = [gold_all[i][task] for i in keep]
        y_pred = [pred_all[i][task] or UNPARSED for i in keep]
        lines += ["", f"## {title.capitalize()}", ""]
        if y_true:
            image = path.with_name(f"{path.stem}_{task}_confusion.png")
            _confusion_png(y_true, y_pred, title, image)
            images.append(image)
            lines += [f"![{title} confusion matrix]({image.name})", ""]
        gold_counts, pred_counts = Counter(y_true), Counter(y_pred)
        lines += ["| label | reference | predicted |", "|---|---|---|"]
        for label in _label_order(y_true, y_pred):
            lines.append(f"| {label} | {gold_counts[label]} | {pred_counts[label]} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return images


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimood evaluate",
        description="Score MultiMood predictions: the published (paper) metrics and strict ones.",
    )
    parser.add_argument("predictions", help="JSONL with 'prediction' and 'reference' (the four-line answers)")
    parser.add_argument("--output", required=True, help="where to write the metrics JSON")
    parser.add_argument("--report", help="also write a Markdown report (confusion-matrix PNGs beside it)")
    parser.add_argument("--bertscore-model", help="local BERTScore model directory (the paper used roberta-large)")
    parser.add_argument(
        "--bertscore-num-layers",
        type=int,
        help="layer to use (default: bert_score's for the model name, else the last)",
    )
    parser.add_argument("--bertscore-batch-size", type=int, default=64)
    parser.add_argument(
        "--nltk-data",
        help="NLTK data dir to prepare/use (default: $MULTIMOOD_NLTK_DATA or ~/.cache/multimood/nltk_data)",
    )
    return parser


def evaluate_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("bertscore_num_layers", "bertscore_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MultimoodError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("output", "report"):
        target = getattr(args, name)
        if target and os.path.exists(target) and os.path.samefile(target, args.predictions):
            raise MultimoodError(f"--{name} {target} is the predictions file: choose another path")
    predictions, references = load_predictions(args.predictions)
    metrics = compute_metrics(
        predictions,
        references,
        nltk_data=args.nltk_data,
        bertscore_model=args.bertscore_model,
        bertscore_num_layers=args.bertscore_num_layers,
        bertscore_batch_size=args.bertscore_batch_size,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.report:
        write_report(metrics, predictions, references, args.report)
    for section in ("paper", "strict"):
        values = metrics[section]
        summary = ", ".join(
            f"{name}={_fmt(values[name])}"
            for name in (
                "client_emotion_accuracy",
                "therapist_emotion_accuracy",
                "strategy_accuracy",
                "bleu2",
                "rougeL",
                "meteor",
                "parse_rate",
            )
        )
        print(f"{section}: {summary}")
    for note in metrics["notes"]:
        print(f"note: {note}")
    print(f"wrote {output}" + (f" and {args.report}" if args.report else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`multimood evaluate` under the error contract (one line, exit 1; --debug for the traceback)."""
    return run_command("multimood evaluate", evaluate_command, argv)


__all__ = [
    "BertScorer",
    "METRIC_SCRIPT",
    "PAPER_PATTERNS",
    "TextResources",
    "compute_metrics",
    "default_nltk_data_dir",
    "evaluate_command",
    "distinct_n",
    "lexnames_text",
    "load_predictions",
    "main",
    "paper_metrics",
    "parse_paper",
    "parse_strict",
    "prepare_nltk_data",
    "resolve_resources",
    "strict_metrics",
    "write_report",
]

if __name__ == "__main__":
    sys.exit(main())
