"""`multimood evaluate`: the paper metrics against the reference libraries, strict metrics on
hand-computed cases, the CLI end to end, NLTK data provenance and the offline `evaluate` module."""

from __future__ import annotations

import json
import re
import socket
from functools import partial
from pathlib import Path

import nltk
import pytest
import torch
from nltk.tokenize import word_tokenize
from nltk.translate.bleu_score import sentence_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from transformers import BertConfig, BertModel, BertTokenizer, RobertaConfig, RobertaModel, RobertaTokenizer

from multimood.evaluation import metrics as evaluation
from multimood.evaluation.metrics import (
    METRIC_SCRIPT,
    WORDNET_FILES,
    compute_metrics,
    distinct_n,
    lexnames_text,
    prepare_nltk_data,
    resolve_resources,
)

LABEL_TASKS = ("client_emotion", "therapist_emotion", "strategy")
REQUIRED_KEYS = [f"{t}_{m}" for t in LABEL_TASKS for m in ("accuracy", "f1")] + [
    "bleu2", "rouge1", "rouge2", "rougeL", "meteor", "bertscore_f1", "parse_rate", "n",
]  # fmt: skip
HAS_DEBIAN_WORDNET = all((evaluation.DEBIAN_WORDNET_DIR / name).is_file() for name in WORDNET_FILES)


def answer(client: str, therapist: str, strategy: str, response: str) -> str:
    return f"Client emotion: {client}\nTherapist emotion: {therapist}\nStrategy: {strategy}\nResponse: {response}"


REF = answer("sadness", "neutral", "open question", "How are you feeling today?")
# (prediction, reference): what each line exercises is said beside it.
PAIRS = [
    (REF, REF),  # all correct
    (answer("sadness", "neutral", "open question", "I hear you. That sounds really hard."),
     answer("sadness", "neutral", "open question", "That sounds hard. I am here for you.")),  # sentences
    (answer("anger", "neutral", "open question", "Why are you angry?"), REF),  # wrong client emotion
    (answer("sadness", "joy", "approval", "Good job on that."),
     answer("sadness", "neutral", "restatement", "So you did that.")),  # wrong emotion and strategy
    ("I think the client is sad and I would ask how they feel.", REF),  # unparseable prediction
    (answer("joy", "joy", "approval", "Great to hear."), "Client emotion: joy\nResponse: Great news."),  # partial gold
    (answer("joy", "joy", "approval", "Great."), "no labels here"),  # unparseable gold
    ("Client emotion:   SADNESS  \nTherapist emotion: Neutral\nStrategy:  Open Question \nResponse:   How ARE you?  ",
     REF),  # case and spacing
    ("Client emotion:sadness\nTherapist emotion:neutral\nStrategy:open question\nResponse:How are you?",
     REF),  # no space after the colon: the published patterns miss it
    ("Client's emotion: fear\nTherapist's emotion: neutral\nTherapist's strategy: approval\n"
     "Therapist's response: You did well.",
     answer("fear", "neutral", "approval", "You did very well.")),  # published spellings
    ("**Client emotion:** joy\n**Therapist emotion:** joy\n**Strategy:** approval\n**Response:** Nice.",
     answer("joy", "joy", "approval", "Nice one.")),  # markdown
    (answer("sadness", "neutral", "open question", ""), REF),  # empty response
    (answer("fear", "neutral", "others", "First line.\nSecond line here."),
     answer("fear", "neutral", "others", "First line. Second line.")),  # multi-line response
    (answer("fear", "neutral", "others", "Take your time.") + "<|im_end|>",
     answer("fear", "neutral", "others", "Take your time.")),  # trailing special token
    (answer("hopeful", "neutral", "others", "Keep going."), answer("joy", "neutral", "others", "Keep going.")),
    (answer("anger", "anger", "interpretation", "That made you mad.").replace("\n", "\r\n"),
     answer("anger", "neutral", "interpretation", "That made you angry.")),  # CRLF
    ("Client emotion: disgust\nClient emotion: anger\nTherapist emotion: neutral\nStrategy: others\nResponse: I see.",
     answer("disgust", "neutral", "others", "I see.")),  # repeated field
    (answer("sadness", "neutral", "restatement", "THAT SOUNDS HARD."),
     answer("sadness", "neutral", "restatement", "That sounds hard.")),  # case of the response
    ("Sure! Here is my answer:\n" + answer("fear", "fear", "advisement", "Well... I don't know, what do you think?"),
     answer("fear", "neutral", "advisement", "Well, what do you think?")),  # preamble, punctuation
    (answer("joy", "joy", "self-disclosure", "I bought a new auto too."),
     answer("joy", "joy", "self-disclosure", "I bought a new car too.")),  # WordNet synonym
]  # fmt: skip


def published_fields(text: str) -> dict[str, str | None]:
    """The published extraction (eval_final.py) with our prefixes: rest of the line, stripped, lower-cased."""
    patterns = {
        "client_emotion": r"(?:Client|Client's) emotion: (.*?)(?:\n|$)",
        "therapist_emotion": r"(?:Therapist|Therapist's) emotion: (.*?)(?:\n|$)",
        "strategy": r"(?:Strategy|Therapist's strategy): (.*?)(?:\n|$)",
        "response": r"(?:Response|Therapist's response): (.*?)(?:\n|$)",
    }
    found = {key: re.search(pattern, text) for key, pattern in patterns.items()}
    return {key: m.group(1).strip().lower() if m else None for key, m in found.items()}


@pytest.fixture(scope="session")
def nltk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nltk_data")


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory, nltk_dir):
    """`multimood evaluate` on PAIRS: (metrics JSON, report path, output dir)."""
    out = tmp_path_factory.mktemp("evaluate")
    predictions = out / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"prediction": p, "reference": r}) + "\n" for p, r in PAIRS))
    argv = [str(predictions), "--output", str(out / "metrics.json"), "--report", str(out / "report.md")]
    assert evaluation.main(argv + ["--nltk-data", str(nltk_dir)]) == 0
    return json.loads((out / "metrics.json").read_text()), out / "report.md", out


@pytest.fixture(scope="session")
def resources(cli_run, nltk_dir):
    return resolve_resources(nltk_data=nltk_dir)


@pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts")
def test_paper_metrics_match_reference_libraries(cli_run):
    paper = cli_run[0]["paper"]
    gold = [published_fields(r) for _, r in PAIRS]
    pred = [published_fields(p) for p, _ in PAIRS]
    expected = {}
    for task in LABEL_TASKS:
        pairs = [(g[task], p[task]) for g, p in zip(gold, pred) if g[task] is not None and p[task] is not None]
        y_true, y_pred = zip(*pairs)
        expected[f"{task}_accuracy"] = accuracy_score(y_true, y_pred)
        prf = precision_recall_fscore_support(y_true, y_pred, average="weighted", zero_division=0)[:3]
        for name, value in zip(("precision", "recall", "f1"), prf):
            expected[f"{task}_{name}"] = value
    pairs = [
        (g["response"], p["response"])
        for g, p in zip(gold, pred)
        if g["response"] is not None and p["response"] is not None
    ]
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        tokenize = word_tokenize
    except LookupError:
        tokenize = partial(word_tokenize, preserve_line=True)
    tokens = [(tokenize(r.lower()), tokenize(h.lower())) for r, h in pairs]
    bleu = [sentence_bleu([r], h, weights=(0.99, 0.01)) if r and h else 0 for r, h in tokens]
    expected["bleu2"] = sum(bleu) / len(bleu)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h) for r, h in pairs]
    for name in ("rouge1", "rouge2", "rougeL"):
        expected[name] = sum(s[name].fmeasure for s in scores) / len(scores)
    expected["rougeL_precision"] = sum(s["rougeL"].precision for s in scores) / len(scores)
    expected["rougeL_recall"] = sum(s["rougeL"].recall for s in scores) / len(scores)
    if paper["meteor"] is not None:
        meteor = [meteor_score([r], h) if r and h else 0 for r, h in tokens]
        expected["meteor"] = sum(meteor) / len(meteor)
    expected["parse_rate"] = sum(all(v is not None for v in p.values()) for p in pred) / len(pred)

    for key, value in expected.items():
        assert paper[key] == pytest.approx(value, abs=1e-9), key
    assert paper["n"] == len(PAIRS) == 20
    # dropped: the free-text and no-space predictions, the markdown one, and the gold lines
    assert paper["n_dropped"] == {"client_emotion": 4, "therapist_emotion": 5, "strategy": 5, "response": 4}
    assert paper["parse_rate"] == pytest.approx(17 / 20)
    assert paper["bertscore_f1"] is None


def test_strict_section_on_the_fixed_file(cli_run):
    strict = cli_run[0]["strict"]
    assert strict["n"] == 18 and strict["n_reference_unparseable"] == 2
    assert strict["parse_rate"] == pytest.approx(16 / 18)  # free text; the empty response
    for key in REQUIRED_KEYS + ["bleu1", "bleu3", "bleu4", "distinct1", "distinct2"]:
        assert key in strict, key
    assert strict["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


def test_strict_metrics_hand_computed(resources):
    refs = [answer("a", "x", "s", "one two three")] * 2 + [answer("b", "x", "s", "one two three")] * 2 + ["junk"]
    preds = [
        answer("A", "x", "s", "one two three"),
        "unparseable",
        answer("b", "x", "s", "one two"),
        answer("a", "x", "s", "one two three"),
        answer("a", "x", "s", "one"),
    ]
    strict = evaluation.strict_metrics(preds, refs, resources)
    assert strict["n"] == 4 and strict["n_reference_unparseable"] == 1
    assert strict["parse_rate"] == 0.75
    assert strict["client_emotion_accuracy"] == 0.5
    # a: P 1/2, R 1/2 -> F 1/2; b: P 1, R 1/2 -> F 2/3; the unparsed prediction adds no class
    assert strict["client_emotion_f1"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-12)
    assert strict["therapist_emotion_accuracy"] == 0.75 and strict["therapist_emotion_f1"] == pytest.approx(6 / 7)
    # rougeL F per pair: 1, 0 (empty), 0.8, 1
    assert strict["rougeL"] == pytest.approx((1 + 0 + 0.8 + 1) / 4, abs=1e-12)
    # 8 unigrams, 3 distinct; 5 bigrams, 2 distinct
    assert strict["distinct1"] == pytest.approx(3 / 8) and strict["distinct2"] == pytest.approx(2 / 5)

    text = answer("a", "x", "s", "one two three four five")
    perfect = evaluation.strict_metrics([text], [text], resources)
    assert [perfect[f"bleu{n}"] for n in (1, 2, 3, 4)] == [pytest.approx(1.0)] * 4
    assert perfect["client_emotion_f1"] == 1.0 and perfect["parse_rate"] == 1.0


def test_distinct_n():
    texts = [["a", "b", "a"], ["a", "b"], []]
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)
    assert distinct_n([[]], 2) == 0.0


def test_cli_writes_json_and_report(cli_run):
    metrics, report, out = cli_run
    for section in ("paper", "strict"):
        for key in REQUIRED_KEYS:
            assert key in metrics[section], (section, key)
    text = report.read_text()
    for task in LABEL_TASKS:
        png = out / f"report_{task}_confusion.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in text
    assert "| sadness |" in text and "| (unparsed) | 0 | 1 |" in text


def test_provenance_is_recorded(cli_run, nltk_dir):
    metrics = cli_run[0]
    tokenizer, wordnet = metrics["provenance"]["tokenizer"], metrics["provenance"]["wordnet"]
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        assert tokenizer["published"] is True and tokenizer["punkt_tab"]
    except LookupError:
        assert tokenizer == {
            "name": "nltk.word_tokenize(text, preserve_line=True)",
            "published": False,
            "punkt_tab": None,
            "description": "Treebank word tokenizer without punkt sentence splitting",
        }
        assert any("punkt_tab was not found" in note for note in metrics["notes"])
    if wordnet["source"] is None:
        assert metrics["paper"]["meteor"] is None and metrics["strict"]["meteor"] is None
    else:
        assert wordnet["version"] == "3.0" and metrics["paper"]["meteor"] is not None
    if wordnet["source"] == "debian":
        assert Path(wordnet["path"]) == (nltk_dir / "corpora" / "wordnet").resolve()
        assert wordnet["debian_package"].startswith("wordnet-base")
    assert metrics["provenance"]["bertscore"] is None
    assert any("BERTScore skipped" in note for note in metrics["notes"])


def test_published_tokenizer_when_punkt_tab_is_present(tmp_path, monkeypatch):
    """A punkt_tab model in the NLTK data dir switches to the published `word_tokenize` (an empty,
    untrained model stands in for the real one, which cannot be downloaded here)."""
    model = tmp_path / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (model / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    tokenize, info, notes = evaluation.resolve_tokenizer()
    try:
        assert info["published"] is True and Path(info["punkt_tab"]) == model and notes == []
        assert tokenize("I am sad. You are ok.") == ["I", "am", "sad", ".", "You", "are", "ok", "."]
    finally:
        nltk.tokenize._get_punkt_tokenizer.cache_clear()  # forget the stand-in model


def test_prepare_nltk_data_copies_debian_layout(tmp_path):
    source = tmp_path / "debian"
    source.mkdir()
    for name in WORDNET_FILES[:-1]:
        (source / name).write_text(name)
    assert prepare_nltk_data(tmp_path / "data", wordnet_dir=source) is None  # verb.exc missing
    (source / WORDNET_FILES[-1]).write_text("x")
    assert prepare_nltk_data(tmp_path / "data", wordnet_dir=source) == tmp_path / "data"
    target = tmp_path / "data" / "corpora" / "wordnet"
    assert sorted(p.name for p in target.iterdir()) == sorted(WORDNET_FILES + ("lexnames",))
    assert not any(p.is_symlink() for p in target.iterdir())
    lexnames = (target / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45
    assert lexnames[0].split() == ["00", "adj.all", "3"] and lexnames[3].split() == ["03", "noun.Tops", "1"]
    assert lexnames[29].split() == ["29", "verb.body", "2"] and lexnames[-1].split() == ["44", "adj.ppl", "3"]
    assert (target / "lexnames").read_text() == lexnames_text()
    mtime = (target / "data.noun").stat().st_mtime_ns
    assert prepare_nltk_data(tmp_path / "data", wordnet_dir=source) == tmp_path / "data"  # reused
    assert (target / "data.noun").stat().st_mtime_ns == mtime


@pytest.mark.skipif(not HAS_DEBIAN_WORDNET, reason="Debian wordnet-base / wordnet-sense-index not installed")
def test_debian_wordnet_serves_meteor(resources):
    wordnet = resources.wordnet
    assert wordnet.get_version() == "3.0"
    assert wordnet.synset("dog.n.01").lexname() == "noun.animal"
    assert wordnet.lemma_from_key("dog%1:05:00::").name() == "dog"  # index.sense
    synonym = meteor_score([["a", "new", "car"]], ["a", "new", "auto"], wordnet=wordnet)
    unrelated = meteor_score([["a", "new", "car"]], ["a", "new", "zebra"], wordnet=wordnet)
    assert synonym > unrelated


def test_no_wordnet_gives_null_meteor_with_a_note(tmp_path, monkeypatch):
    real_find = nltk.data.find

    def find(resource, *args, **kwargs):
        if resource.startswith("corpora/wordnet"):
            raise LookupError(resource)
        return real_find(resource, *args, **kwargs)

    monkeypatch.setattr(nltk.data, "find", find)
    monkeypatch.setattr(evaluation, "DEBIAN_WORDNET_DIR", tmp_path / "absent")
    resources = resolve_resources(nltk_data=tmp_path / "nltk")
    assert resources.wordnet is None and resources.provenance["wordnet"]["source"] is None
    metrics = compute_metrics([REF], [REF], resources=resources)
    assert metrics["paper"]["meteor"] is None and metrics["strict"]["meteor"] is None
    assert metrics["paper"]["rougeL"] == 1.0
    assert any("METEOR is null" in note for note in metrics["notes"])


def test_evaluate_load_offline(resources, nltk_dir, monkeypatch, tmp_path):
    evaluate = pytest.importorskip("evaluate")

    def no_network(*args, **kwargs):
        raise OSError("network access during evaluate.load")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(METRIC_SCRIPT.as_posix(), config_name="strict", cache_dir=str(tmp_path))
    result = metric.compute(predictions=[REF, "free text"], references=[REF, REF], nltk_data=str(nltk_dir))
    assert result["client_emotion_accuracy"] == 0.5 and result["parse_rate"] == 0.5 and result["n"] == 2
    both = evaluate.load(METRIC_SCRIPT.as_posix(), cache_dir=str(tmp_path))
    both.add_batch(predictions=[REF], references=[REF])
    result = both.compute(nltk_data=str(nltk_dir))
    assert {"paper", "strict", "provenance", "notes"} <= set(result)
    assert result["paper"]["bleu2"] == pytest.approx(1.0)


def _tiny_bert(path: Path) -> None:
    path.mkdir()
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] how are you feeling today ? i am here for that sounds hard .".split()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=512).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(path)


def test_bertscore_with_a_local_model(tmp_path, resources):
    bert_score = pytest.importorskip("bert_score")
    model = tmp_path / "tiny-bert"
    _tiny_bert(model)
    scorer = evaluation.BertScorer(model, batch_size=4)
    assert scorer.provenance["num_layers"] == 2 and scorer.provenance["num_layers_from"] == "last layer"
    candidates = ["how are you today ?", "that sounds hard .", "", "i am here"]
    references = ["how are you feeling today ?", "i am here for you", "that sounds hard", "i am here for you ."]
    expected = bert_score.score(
        [c for c in candidates if c],
        [r for c, r in zip(candidates, references) if c],
        model_type=str(model),
        num_layers=2,
    )[2].tolist()
    expected.insert(2, 0.0)  # bert_score scores an empty candidate 0
    assert scorer(candidates, references) == pytest.approx(expected, abs=1e-6)


def test_bertscore_roberta_tokenizer_adds_the_prefix_space(tmp_path):
    """bert_score encodes RoBERTa/GPT-2 text with a leading space; transformers 5 only honours that
    when the tokenizer is loaded with it."""
    pytest.importorskip("bert_score")

    path = tmp_path / "tiny-roberta"
    path.mkdir()
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "Ġ"] + list("abcdefghijklmnopqrstuvwxyz")
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    RobertaModel(config).save_pretrained(path)
    scorer = evaluation.BertScorer(path)
    assert scorer.tokenizer.convert_ids_to_tokens(scorer.tokenizer.encode("hi"))[:3] == ["<s>", "Ġ", "h"]
    assert scorer(["hi there"], ["hi there"]) == [pytest.approx(1.0, abs=1e-5)]
