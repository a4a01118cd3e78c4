"""SERVER SIDE — small text filters that work when the professional model is small.

A 135M "professional" judge passes nearly anything, so the funnel also runs cheap, checkable rules, each a
small class with one reason string (the DataTrove / NeMo Curator pattern), composed in a list:

- `LanguageFilter`: the domain's language, by py3langid (a maintained detector that ships its model, offline);
- `DegenerateTextFilter`: the heuristic quality rules of data-curation pipelines (word counts, the share of
  non-alphabetic characters, a repeated word n-gram: a generation loop);
- `AsksBackFilter`: an answer that mostly asks the patient questions instead of answering;
- `DomainFilter`: MiniLM similarity to the domain's public anchors minus the similarity to public off-domain
  anchors (calibrated on public data, README "Filters");
- `OffQuestionFilter`: an answer about something other than its question (MiniLM similarity to the question);
- `PatternFilter`: a regular expression with its reason: talk about the task, refusals, personas, the patient's
  voice in an answer, and a question about a rare condition it names (`INVENTED_CONDITION`).

Each filter maps a list of texts to a list of reasons (None = kept), so a batch pays one model call; a filter
that judges an answer against its question (`needs_question`) also takes the question.
Every input is public config text or synthetic text: no filter reads the client's records.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ksg_ray.common.text_metrics import repeated_ngram, words

if TYPE_CHECKING:
    from ksg_ray.server.synth.config import SynthConfig

__all__ = ["INVENTED_CONDITION", "META", "PATIENT_VOICE", "PERSONA", "QUERY_META", "REFUSAL", "AsksBackFilter",
           "DegenerateTextFilter", "DomainFilter", "LanguageFilter", "OffQuestionFilter", "PatternFilter", "TextFilter",
           "answer_filters", "apply_filters", "query_filters"]

class TextFilter(Protocol):
    """A filter: one reason string per rejected text, None for a kept one."""

    name: str

    def __call__(self, texts: Sequence[str]) -> list[str | None]: ...


def apply_filters(filters: Sequence[TextFilter], texts: Sequence[str], question: str | None = None) -> list[str | None]:
    """The first reason each text is rejected for (filters run in order, each on the texts still kept); `question`:
    the one the texts answer, for the filters that need it.

    Raises:
        ValueError: a filter needs the question and none was given.
    """
    reasons: list[str | None] = [None] * len(texts)
    for f in filters:
        todo = [i for i, r in enumerate(reasons) if r is None]
        if not todo:
            break
        kept = [texts[i] for i in todo]
        if getattr(f, "needs_question", False):
            if question is None:
                raise ValueError(f"the {f.name!r} filter judges answers against their question: pass `question`")
            got = f(kept, question)
        else:
            got = f(kept)
        for i, reason in zip(todo, got, strict=True):
            reasons[i] = reason
    return reasons


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageFilter:
    """Rejects text that py3langid places in another language with at least `min_confidence`.

    Low-confidence calls are kept: short or noisy English (all capitals, typos) often scores low for every
    language, and real client text is like that; a fluent other language scores high.
    """

    name = "language"

    def __init__(self, language: str = "en", min_confidence: float = 0.5) -> None:
        self.language, self.min_confidence = language, min_confidence

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        out: list[str | None] = []
        for text in texts:
            lang, p = _identifier().classify(text)
            wrong = lang != self.language and p >= self.min_confidence
            out.append(f"language: {lang} (p={p:.2f}), not {self.language}" if wrong else None)
        return out


class DegenerateTextFilter:
    """Heuristic quality rules: too few or too many words, mostly non-alphabetic, or a repeated n-gram (a loop)."""

    name = "degenerate"

    def __init__(self, min_words: int = 3, max_words: int = 1000, max_non_alpha: float = 0.25,
                 repeat_ngram: int = 6) -> None:
        self.min_words, self.max_words = min_words, max_words
        self.max_non_alpha, self.repeat_ngram = max_non_alpha, repeat_ngram

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        return [self._reason(t) for t in texts]

    def _reason(self, text: str) -> str | None:
        n_words = len(words(text))
        if n_words < self.min_words:
            return f"degenerate: {n_words} words < {self.min_words}"
        if n_words > self.max_words:
            return f"degenerate: {n_words} words > {self.max_words}"
        chars = [c for c in text if not c.isspace()]
        non_alpha = sum(not c.isalpha() for c in chars) / max(len(chars), 1)
        if non_alpha > self.max_non_alpha:
            return f"degenerate: {non_alpha:.0%} non-alphabetic characters > {self.max_non_alpha:.0%}"
        if self.repeat_ngram and (gram := repeated_ngram(text, self.repeat_ngram)):
            return f"degenerate: repeated {self.repeat_ngram}-gram '{gram}'"
        return None


class AsksBackFilter:
    """Rejects an answer that asks the asker questions more than it answers: at least `min_questions` of its
    sentences end in '?' and they are at least `min_share` of its sentences.

    A small professional often answers "I'm glad to help. How long have you had the pain? What's your current
    medical condition?": distilled, that teaches the target to deflect. Doctors do ask back, but seldom only that:
    8 of the 41 rows of a fresh embedded run did this (README Status); 2 of the 130 medical and financial dev
    answers do.
    """

    name = "asks back"

    def __init__(self, min_questions: int = 2, min_share: float = 0.3) -> None:
        self.min_questions, self.min_share = min_questions, min_share

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        return [self._reason(t) for t in texts]

    def _reason(self, text: str) -> str | None:
        sentences = [s for s in _SENTENCE_END.split(text.strip()) if any(c.isalnum() for c in s)]
        questions = sum(s.rstrip().endswith("?") for s in sentences)
        if questions >= self.min_questions and questions >= self.min_share * len(sentences):
            return f"asks back: {questions} of its {len(sentences)} sentences are questions"
        return None


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class PatternFilter:
    """Rejects text that matches a regular expression, with the match in its reason: the answers that talk about
    the rewriting task (`META`) or decline to answer (`REFUSAL`)."""

    def __init__(self, name: str, pattern: str, why: str) -> None:
        self.name, self.pattern, self.why = name, re.compile(pattern, re.IGNORECASE), why

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        return [f"{self.name}: {self.why} ('{m.group(0)}')" if (m := self.pattern.search(t)) else None for t in texts]


# A small rewriter echoes the refinement prompt ("The improved answer is:", "Answer A (better)") or talks about the
# task it was given ("to answer the patient's question", "The correct answer to the question is:", "Your answer is
# clear, but the phrasing of the question...", an answer labelled "A: ...", "A 2 is better than B", "A has a major
# flaw", "A good edit would be:", reviews: "This is an excellent explanation of...", "A very informative answer",
# grading: "You've got it correct, and I'll make sure to provide you with a corrected answer. The answer is: C.",
# "A possible improvement could be: ...", "A more appropriate response could be: ...", "My apologies for the
# misunderstanding earlier": none of the 5,187 real answers apologises for a misunderstanding or confusion; "The
# answer could be reworded to ...", "I would suggest a rewritten answer", "Your question requires a more precise
# and accurate answer", a whole rewrite "The answer to this question is:", placeholders "A can be B": none match;
# "The answer to the question should be ...", the asker taken for a colleague: "your patient's condition", a case
# note instead of an answer: "The patient is a 45-year-old male with ...", "This patient has ...", "I'm
# sorry for any misunderstanding. It seems you've been asked to address a medical question", "I will rephrase the
# sentence", "I suggest rewriting the answer", "I've revised the question to make it more concise", a correction
# of the asker's wording: "please refrain from using ...", "A more accurate way to phrase the question", "I'd be
# happy to help you improve that answer!": 0 of the 130 medical and financial dev answers; "final edit" alone is
# left, since a forum answer may well announce one; a rewrite that ends "This response is already better than my
# previous one": 0 of the 5,187 real answers).
META = PatternFilter("meta", r"\b(?:answer [ab]\b|(?:improved|revised|previous|past|above|better|original) (?:answer|"
                     r"version|response|question)|(?:revised|improved|rewrote|rewritten) the "
                     r"(?:answer|response|question)|(?:a )?good (?:answer|edit) would|a new (?:answer|question)\b|"
                     r"review of (?:that|the) answer|"
                     r"this answer is|you(?:'re| are) a helpful, careful|the (?:patient|user)'s (?:question|query)|"
                     r"(?:correct|right|best|final) answer (?:to (?:the|this|your) question|would be|is:)|"
                     r"your answer is|phrasing of the question|answer was (?:reworded|rewritten|revised)|"
                     r"way to (?:phrase|word|ask) (?:the|your|this) question|refrain from using|"
                     r"improve (?:that|this|the|your|my) (?:answer|response))|"
                     r"\((?:better|worse|worst)\)|"
                     r"^\s*(?-i:[AB])(?::|\s*$)|(?-i:\b[AB]\b)[^.\n]{0,20}\b(?:better|worse|improved|preferred) "
                     r"(?:than|over|by) (?-i:[AB])\b|(?:^|[.!?]\s+)(?-i:[AB]) (?:is|was|has) (?:still )?(?:not )?"
                     r"(?:improved|an? (?:major |minor )?flaw)|\"(?-i:A)\" instead of \"(?-i:B)\"|"
                     r"^\W*(?:a: )?this is an? (?:\w+ ){0,2}(?:explanation|answer|response)\b|\ban? (?:very |more )?"
                     r"(?:informative|effective|excellent) (?:answer|response)\b|\banswer can be improved|"
                     r"\ba possible improvement\b|\bcorrected answer\b|\byou(?:'ve| have) got it (?:correct|right)\b|"
                     r"\ba more appropriate (?:answer|response)\b|\b(?:answer|response) (?:could|would|might) be:|"
                     r"\b(?:apolog(?:y|ies|ise|ize)|sorry) for (?:the|any) (?:misunderstanding|confusion)\b|"
                     r"\b(?:this|my) (?:response|rewrite|version) is (?:already |now |much |even )?"
                     r"(?:better|improved)\b|"
                     r"\bthan (?:my|the) (?:previous|original|last|earlier) (?:one|answer|response|version)\b|"
                     r"\byou(?:'ve| have) been asked to\b|\b(?:rephras|rewrit)\w* the (?:sentence|answer|response)\b|"
                     r"\bthe answer is:?\s*(?-i:[A-E])(?=\s*(?:[.)]|$))|\brewritten (?:answer|response)\b|"
                     r"\b(?:answer|response) (?:could|should|can|would|might) be (?:reworded|rewritten|revised|"
                     r"rephrased|improved)|\b(?:requires|needs|deserves) a more (?:\w+ ){0,3}answer\b|"
                     r"\bthe answer to (?:this|your|the) question is:?\s*$|(?-i:\b[AB]\b) can be (?-i:\b[BC]\b)|"
                     r"\banswer to (?:this|your|the) question (?:should|would|could) be\b|\byour patient(?:'s|s)?\b|"
                     r"^\W*(?:the|this) patient (?:is|has|was)\b",
                     "talks about the task")
# Asked for "a new question like these two seeds" (queries.mode seed_prompt), a small generator often repeats the
# request ("You create one new question about heart health, similar in style to the examples", "Here is a new
# medical question:"): 66 of the 145 rows of the medical study's RewardDS run; 0 of the 130 dev questions match.
QUERY_META = PatternFilter("meta", r"\b(?:(?:a|one|another) new (?:\w+ )?question|new (?:medical|financial|health) "
                           r"question|here(?:'s| is) (?:a|one|another) (?:\w+ ){0,2}question|(?:provide|create|write|"
                           r"generate|add) (?:a|one|another|\w+ new) (?:\w+ ){0,2}question|similar in style to the "
                           r"examples|reply with the question only)", "repeats the request for a question")
# Asked to continue a patient's message, the DP generator often makes up a rare disease and asks about it ("I have
# heard about a rare skin condition called SjuCklenowklippos", "my mother was diagnosed with a rare kidney disease
# called aliments"), and the professional then describes it as if it were real: 4 of the 64 query samples of a
# session-32 embedded run; 0 of the 5,187 real medical and financial questions match.
INVENTED_CONDITION = PatternFilter("invented condition", r"\brare\b[^.?!]{0,60}\b(?:called|known as|named)\b|"
                                   r"\b(?:called|known as|named)\b[^.?!]{0,30}\brare\b|"
                                   r"\bheard (?:about|of) (?:a |an |the )?(?:\w+ ){0,3}rare\b",
                                   "names a rare condition (a small generator invents them)")
# Distilled into the target, refusals ("as an AI ...", "I'm unable to provide ...") teach it to refuse the domain.
REFUSAL = PatternFilter("refusal", r"\b(?:as an? (?:ai|language model|medical assistant)|i(?:'m| am) (?:an ai|not "
                        r"(?:a|an) (?:doctor|medical|healthcare|financial)|(?:not |un)able to (?:provide|give|offer|"
                        r"assist)|not equipped to)|i (?:can ?not|can't|don't) (?:provide|give|offer) (?:medical|"
                        r"financial|professional|specific))", "declines to answer")
# A small professional told to be "a helpful, careful medical doctor" introduces that persona ("I'm Dr. Emily Lee, a
# highly trained and dedicated healthcare professional", "Dr. Elliot Black, we all have challenges") or writes as
# the patient ("Dear Dr."), or speaks "as a medical doctor" (39 of the medical study's 237 rows), also at length
# ("As a caring, well-respected, and highly compassionate medical doctor, ..."; that long a run only where a
# sentence starts: mid-sentence it matched a finance answer's "as a small debt that a doctor"), or "I'm a caring,
# honest, and helpful doctor", or "As a caring and compassionate healthcare professional" (0 of the 5,187 real
# answers). Real answers do none of it (0 of the 112 medical dev answers match, none names a Dr.).
PERSONA = PatternFilter("persona", r"(?-i:\bDr\.? [A-Z][a-z]+ [A-Z][a-z]+\b)|"
                        r"\b(?:i(?:'m| am) (?:dr\.?|doctor) [a-z]|my name is|dear (?:dr\b|doctor)|"
                        r"as an? (?:[\w-]+,? (?:and )?){0,3}(?:doctor|physician)\b|"
                        r"(?:^|[.!?]\s+)as an? (?:[\w-]+,? (?:and )?){4,5}(?:doctor|physician)\b|"
                        r"i(?:'m| am) an? (?:[\w-]+,? (?:and )?){0,4}(?:doctor|physician)\b|"
                        r"i(?:'m| am) (?:a|an) (?:[\w-]+,? (?:and )?){0,4}(?:healthcare|medical|health) "
                        r"(?:professional|provider|expert)|as an? (?:[\w-]+,? (?:and )?){0,3}"
                        r"(?:healthcare|medical|health) (?:professional|provider|expert)\b|"
                        r"highly (?:trained|skilled|qualified) (?:and|doctor|healthcare|medical|professional))",
                        "talks about itself, not the question")
# A small professional also writes as the patient: it greets the doctor ("Hello doctor, my 5 year old son has had
# ..."), gives its own age, or tells of its own family ("My 4-year-old daughter is doing wonderfully"): 9 of the
# medical study's 271 rows; 0 of the 130 medical and financial dev answers match.
PATIENT_VOICE = PatternFilter("patient voice", r"^\W*(?:hi|hello|hey|dear)\W+(?:dr\b|doctor)|"
                              r"\bi(?:'m| am) (?:a |an )?\d+(?:[ -]?(?:years?|yrs?|y/?o)\b|,? and (?:i|my)\b)|"
                              r"\bmy (?:\d+[ -]?(?:years?|yrs?|months?|weeks?)[ -]old )?(?:son|daughter|husband|wife|"
                              r"mother|mom|father|dad|baby|child|kid)(?:'s)? (?:is|has|had|was|got)\b",
                              "writes as the patient")


class DomainFilter:
    """Keeps text closer to the domain's public anchors than to public off-domain anchors, by `min_margin`.

    The score is max cosine (MiniLM) to an in-domain anchor minus max cosine to an off-domain anchor. Plain
    similarity to a few seed questions does not separate domains (real medical questions are long and noisy);
    the contrast does. Calibrated on public data (README "Filters"): at margin 0 it kept every medical dev
    question and rejected 89% of FiQA finance questions and planted phone, travel, law and code questions.
    """

    name = "domain"

    def __init__(self, anchors: Sequence[str], off_domain: Sequence[str], min_margin: float = 0.0,
                 domain: str = "the domain") -> None:
        if not anchors or not off_domain:
            raise ValueError("the domain filter needs public in-domain anchors (domain.seed_questions, "
                             "domain.topics) and off-domain anchors (domain.off_topics)")
        from ksg_ray.common.text_metrics import embed_texts

        self._embed = embed_texts
        self.anchors, self.off = embed_texts(list(anchors)), embed_texts(list(off_domain))
        self.min_margin, self.domain = min_margin, domain

    def margins(self, texts: Sequence[str]) -> np.ndarray:
        e = self._embed(list(texts))
        return (e @ self.anchors.T).max(1) - (e @ self.off.T).max(1)

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        if not texts:
            return []
        return [None if m >= self.min_margin else f"off-domain: margin {m:.3f} < {self.min_margin} ({self.domain})"
                for m in self.margins(texts)]


class OffQuestionFilter:
    """Rejects an answer about something other than its question: MiniLM cosine(question, answer) < `min_cosine`.

    A small professional sometimes answers what it was not asked, fluently and in the domain: a patient's neck
    pain answered with "follow the next-of-kin rules when you're in court", months of stress with a faith
    journey. Real answers stay near their questions: on the medical and financial dev splits (130 pairs) the
    lowest cosine is 0.31, while a question paired with another dev answer is below 0.3 in 85% of cases.
    """

    name = "off question"
    needs_question = True

    def __init__(self, min_cosine: float = 0.3) -> None:
        from ksg_ray.common.text_metrics import embed_texts

        self._embed = embed_texts
        self.min_cosine = min_cosine

    def __call__(self, texts: Sequence[str], question: str) -> list[str | None]:
        if not texts:
            return []
        e = self._embed([question, *texts])
        return [None if c >= self.min_cosine else f"off question: cosine to the question {c:.3f} < {self.min_cosine}"
                for c in e[1:] @ e[0]]


def query_filters(cfg: SynthConfig) -> list[TextFilter]:
    """The query funnel's filters, in order (cheapest first), as the config asks."""
    f, d = cfg.filters, cfg.domain
    out: list[TextFilter] = []
    if f.language:
        out.append(LanguageFilter(d.language, f.min_language_confidence))
    if f.degenerate:
        out += [DegenerateTextFilter(cfg.queries.min_words, f.max_query_words, f.max_non_alpha, f.repeat_ngram),
                QUERY_META, INVENTED_CONDITION]
    if f.domain and d.off_topics:
        out.append(DomainFilter([*d.seed_questions, *d.topics, d.description], d.off_topics, f.min_domain_margin,
                                d.name))
    return out


def answer_filters(cfg: SynthConfig) -> list[TextFilter]:
    """The answer candidates' filters: talk about the task, refusals, persona talk, the patient's voice, language,
    degenerate text, questions instead of an answer, and an answer to another question (an answer need not
    restate the domain)."""
    f = cfg.filters
    out: list[TextFilter] = [META, REFUSAL, PERSONA, PATIENT_VOICE] if f.degenerate else []
    if f.language:
        out.append(LanguageFilter(cfg.domain.language, f.min_language_confidence))
    if f.degenerate:
        out.append(DegenerateTextFilter(f.min_answer_words, 100_000, f.max_non_alpha, f.repeat_ngram))
    if f.asks_back:
        out.append(AsksBackFilter(f.asks_back_min_questions, f.asks_back_min_share))
    if f.off_question:
        out.append(OffQuestionFilter(f.min_question_cosine))
    return out
