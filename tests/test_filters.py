"""The synthesis funnel's cheap filters: each rejects its planted bad rows and keeps real medical questions.

The keep-rate checks read the real medical dev split (`../shared/data`, public for model selection) and the
embedded config's public anchors, the same the embedded default runs with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ksg_ray.common.config import job_config
from ksg_ray.common.text_metrics import repeated_ngram
from ksg_ray.server.synth.config import SynthConfig
from ksg_ray.server.synth.filters import (
    AsksBackFilter,
    DegenerateTextFilter,
    LanguageFilter,
    OffQuestionFilter,
    PatternFilter,
    answer_filters,
    apply_filters,
    query_filters,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "medical" / "dev.jsonl").is_file(),
                                  reason="shared domain data not present")

PLANTED = {
    "language": "Il crudelitore è il cielo mafrono, la cosa più importante è bere acqua e riposare molto.",
    "loop": ("I have a pain in my chest and I have a pain in my chest and I have a pain in my chest and "
             "I do not know what to do."),
    "phones": "Can you tell me about the main features of the new phone and which laptop I should buy?",
    "travel": "What is the best way to travel in Italy in the summer with children?",
    "symbols": "Pain: 1/2/3 -- 4%%% ==> 5/6/7 ### 8:9:10 ***** ?!?!",
}


@pytest.fixture(scope="module")
def cfg() -> SynthConfig:
    return job_config(SynthConfig, ["--config", "configs/synthesize.yaml"], "test")


def _dev(domain: str) -> list[dict]:
    return [json.loads(line) for line in (SHARED / domain / "dev.jsonl").read_text().splitlines()]


def test_repeated_ngram_finds_loops_only():
    assert repeated_ngram("one two three four five six one two three four five six") == "one two three four five six"
    assert repeated_ngram("one two three four five six seven one two three four five") is None


def test_each_filter_rejects_its_planted_row(cfg):
    lang, degenerate, meta, invented, domain = query_filters(cfg)
    assert lang([PLANTED["language"]])[0].startswith("language: it")
    assert "repeated 6-gram" in degenerate([PLANTED["loop"]])[0]
    assert "non-alphabetic" in degenerate([PLANTED["symbols"]])[0]
    assert all(r.startswith("off-domain") for r in domain([PLANTED["phones"], PLANTED["travel"]]))
    echoes = meta(["You create one new question about heart health, similar in style to the examples.",
                   "Here is a new medical question: why do I cough?", "I have a question about my new medicine."])
    assert [r.split(":")[0] if r else None for r in echoes] == ["meta", "meta", None]
    named = invented(["Hi, I am 12 weeks pregnant and I have heard about a rare health condition known as "
                      '"Impregnancy Flu" and I am concerned about it.',
                      "Hello, I have been coughing for 3 days. I have heard about a rare skin condition called "
                      "SjuCklenowklippos.", "Dear doctor, my mother is 68 and she was diagnosed with a rare kidney "
                      "disease called aliments.", "My daughter has a rare form of epilepsy. Which tests show it?",
                      "I was diagnosed with a condition called plantar fasciitis. How long does it last?"])
    assert [r.split(":")[0] if r else None for r in named] == ["invented condition"] * 3 + [None, None]
    reasons = apply_filters(query_filters(cfg), [*PLANTED.values(), "Hi doctor, my son has had a fever for "
                                                 "three days and a cough. Should I take him to hospital?"])
    assert [r.split(":")[0] if r else None for r in reasons] == [
        "language", "degenerate", "off-domain", "off-domain", "degenerate", None]
    # answers: the same language and loop rules, no domain rule, and no talk about the rewriting task
    answers = [PLANTED["language"], PLANTED["loop"], "The improved answer is: rest.", "A (better) A (worst)",
               "A good answer would be: rest.", "A is better than B. This answer is an improvement.",
               "I've revised the answer to make it more concise and clear. Rest helps.",
               "I'm sorry, but as a medical assistant I'm unable to provide advice.",
               "I'm not a medical professional. Please see a doctor.", "As an AI, I cannot help.",
               "Dear Dr. Lee, I'm Dr. Emily Lee, a highly trained and dedicated healthcare professional.",
               "Hello, I'm a caring, trustworthy, and responsible healthcare professional. Rest.",
               "Hi, my name is Anna and I will help you.", "A new answer: I have had a rash on my skin.",
               "Dr. Elliot Black, we all have challenges. Sleep matters.",
               "I'm sorry for any confusion, but to answer the patient's question, rest.",
               "The correct answer to the question is: rest.", "A: A is a dedicated, caring doctor.",
               "Your answer is clear, but the phrasing of the question seems ambiguous.",
               "As a caring and compassionate doctor, I understand. Rest.", "Hey, I'm a special care animal doctor.",
               "Hello doctor, my 5 year old son has had a fever.", "Hi, I am 52 years old and have back pain.",
               "I am 27 and I have a lump.", "Good news! My 4-year-old daughter is doing wonderfully.",
               "Hi there, my baby is doing great.", "A 2 is better than B.", "Rest. A has a major flaw.",
               "A good edit would be: rest.", "A", 'Use "A" instead of "B".', "The answer was reworded incorrectly.",
               "A: This is an excellent explanation of the information provided.",
               'You can use this as a perfect example of how a "best" answer can be improved.',
               "You've got it correct, and I'll make sure to provide you with a corrected answer.",
               "Your symptoms include vomiting and coughing. The answer is: C.",
               "The correct answer is: a lump is often misunderstood.",
               "I'm so sorry. A possible improvement could be: \"It's so heartbreaking to see a mother suffer.\"",
               "A more appropriate response could be: In today's medical world, it's essential to help.",
               "As a caring, well-respected, and highly compassionate medical doctor, I'd like to share a truth.",
               "Hello! I'm a caring, honest, and helpful doctor. Rest.",
               "That's a great question.",
               "I'm glad to help with your concerns. My apologies for the misunderstanding earlier. Rest.",
               "Your question requires a more precise and accurate answer. The answer could be reworded to focus.",
               "I would suggest a rewritten answer that addresses the importance of support.",
               "The answer to this question is:",
               "A can be a delicate topic, and A can be B, and B can be C.",
               'The answer to the question should be "A medical emergency."',
               "A possible explanation for your patient's condition could be an infection.",
               "The patient is a 45-year-old male with the disease of a 40-year-old male.",
               "I'm sorry for any misunderstanding. It seems you've been asked to address a medical question.",
               "To make a final edit, I will rephrase the sentence to improve clarity and grammar.",
               "A. Re: Your question is not accurate. I suggest rewriting the answer with a professional tone.",
               "I've revised the question to make it more concise and informative. The answer still conveys it.",
               'To clarify, please refrain from using "specially". A more accurate way to phrase the question is:',
               "I'd be happy to help you improve that answer! A person's life is worth it.",
               "Alibacu can be managed. My friend, This response is already better than my previous one.",
               "As a caring and compassionate healthcare professional, my primary responsibility is your care.",
               "I'm glad to help. Pain can be hard to manage. How long have you had it? What else do you feel?",
               "I'd be happy to help.\nCan you tell me more? Was it a genetic disorder? Are there other relatives?",
               "Rest and drink water. A better diet helps too. I am not able to see the rash, so see your GP. "
               "I am 100% sure it is not serious at 25 years of age. Vitamin A is better absorbed than vitamin B. "
               "Type A is not improved by diet. Count it as a small debt that a doctor, a nurse and a friend forgave."]
    question = "I have had an itchy rash on my arm for a week and I am 25. What should I do about it?"
    assert [r is None for r in apply_filters(answer_filters(cfg), answers, question)] == [False] * 60 + [True]


def test_an_answer_that_mostly_asks_back_is_rejected_and_one_question_is_not():
    asks_back = AsksBackFilter(min_questions=2, min_share=0.3)
    answers = ["I'm glad to help. How long have you had the pain? Is it worse at night?",
               "Sorry to hear that. What is his age? Which medicines does he take? Ibuprofen helps the pain. Rest, "
               "ice and raise the leg. See a doctor if it swells. A sprain heals in two weeks. Keep walking gently.",
               "Thanks for your query. Did it start after the new tablets? It may be a side effect, so stop them and "
               "see your doctor. Drink water. Rest."]
    assert asks_back(answers) == ["asks back: 2 of its 3 sentences are questions", None, None]


@needs_shared
def test_filters_keep_real_medical_questions_and_answers(cfg):
    rows = _dev("medical")
    kept = [r is None for r in apply_filters(query_filters(cfg), [r["input"] for r in rows])]
    assert sum(kept) / len(rows) >= 0.95
    kept = [apply_filters(answer_filters(cfg), [r["output"]], r["input"])[0] is None for r in rows]
    assert sum(kept) / len(rows) >= 0.95


@needs_shared
def test_every_real_answer_is_on_its_question_and_most_answers_to_other_questions_are_not(cfg):
    rows = _dev("medical") + _dev("financial")
    off_question = answer_filters(cfg)[-1]
    assert isinstance(off_question, OffQuestionFilter)
    assert all(off_question([r["output"]], r["input"] or r["instruction"]) == [None] for r in rows)
    swapped = [off_question([rows[(i + 7) % len(rows)]["output"]], r["input"] or r["instruction"])[0]
               for i, r in enumerate(rows)]
    assert sum(reason is not None for reason in swapped) / len(rows) >= 0.75


def test_an_answer_to_another_question_is_rejected_and_the_question_is_required():
    question = "Hi, I am 52 years old and I have been having pain in my neck since 2020. I am taking no medicine."
    answers = ["Hello 52 years old, Hello 100% recovered. Please take note of that and follow the next-of-kin rules "
               "when you're in court.",  # from an embedded run (session 21)
               "Neck pain at your age is most often from wear of the discs and joints of the neck. Gentle stretching, "
               "heat and a pain reliever such as ibuprofen help; see a doctor if it spreads to your arms."]
    reasons = OffQuestionFilter(0.3)(answers, question)
    assert reasons[0].startswith("off question: cosine to the question") and reasons[1] is None
    with pytest.raises(ValueError, match="'off question' filter judges answers against their question"):
        apply_filters([OffQuestionFilter()], answers)


@needs_shared
def test_the_domain_filter_rejects_most_finance_questions(cfg):
    domain = query_filters(cfg)[-1]
    finance = [r["input"] for r in _dev("financial")]
    rejected = [r is not None for r in domain(finance)]
    assert sum(rejected) / len(finance) >= 0.75


def test_filters_are_configurable():
    cfg = job_config(SynthConfig, ["--config", "configs/synthesize.yaml", "filters.domain=false",
                                   "filters.language=false"], "test")
    assert [type(f) for f in query_filters(cfg)] == [DegenerateTextFilter, PatternFilter, PatternFilter]
    assert LanguageFilter("en")(["Hello, how are you today?"]) == [None]
