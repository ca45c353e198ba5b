"""MultiMood metrics as an `evaluate` module: `evaluate.load(multimood.evaluation.metrics.METRIC_SCRIPT.as_posix())`.

Loads offline from this local file (evaluate copies it into its modules cache and imports the
installed `multimood` package). `config_name="paper"` or `"strict"` returns that section as a flat
dict (handy for `Trainer` logging); the default returns both sections with `provenance` and `notes`,
as `multimood evaluate` writes them.
"""

import datasets
import evaluate

from multimood.evaluation.metrics import compute_metrics

_DESCRIPTION = """\
Scores MultiMood's four-line answers (client emotion, therapist emotion, therapist strategy,
therapist response). `paper`: the published evaluation (fields found with line patterns,
lower-cased; unparseable pairs dropped; accuracy and weighted F1; mean sentence BLEU with weights
(0.99, 0.01); ROUGE-1/2/L; METEOR; BERTScore). `strict`: unparseable predictions count as wrong;
macro-F1; sacreBLEU corpus BLEU-1..4; ROUGE; METEOR; BERTScore; Distinct-1/2; parse rate.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated four-line answers.
    references (`list[str]`): reference four-line answers.
    bertscore_model (`str`, *optional*): local BERTScore model directory; BERTScore is null without it.
    bertscore_num_layers (`int`, *optional*): BERTScore layer (default: bert_score's for the model name,
        else the last).
    nltk_data (`str`, *optional*): NLTK data dir where WordNet is prepared from Debian's files.
Returns:
    `dict`: `paper` and `strict` sections, `provenance` (tokenizer, WordNet, BERTScore model) and `notes`;
    with `config_name="paper"` / `"strict"`, that section alone.
Example:
    >>> import evaluate
    >>> from multimood.evaluation.metrics import METRIC_SCRIPT
    >>> metric = evaluate.load(METRIC_SCRIPT.as_posix(), config_name="strict")
    >>> answer = "Client emotion: sadness\\nTherapist emotion: neutral\\nStrategy: others\\nResponse: Go on."
    >>> metric.compute(predictions=[answer], references=[answer])["client_emotion_accuracy"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultimoodMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/quangtuan-0504/Multimood"],
        )

    def _compute(self, predictions, references, bertscore_model=None, bertscore_num_layers=None, nltk_data=None):
        results = compute_metrics(
            predictions,
            references,
            nltk_data=nltk_data,
            bertscore_model=bertscore_model,
            bertscore_num_layers=bertscore_num_layers,
        )
        if self.config_name in ("paper", "strict"):
            return results[self.config_name]
        return results
