"""SERVER SIDE — every prompt the synthesis pipeline sends, and the parsers of what comes back.

Prompts are chat message lists (the engines render them with the model's own template). Each builder takes
only public text and synthetic text: seeds from the config, queries and answers the models wrote.
"""

from __future__ import annotations

import random
import re

from ksg_ray.engines import CONTINUE_KEY
from ksg_ray.server.synth.config import DomainSection

__all__ = ["answer_messages", "critique_messages", "first_sentences", "join_prefix", "judge_messages", "parse_query",
           "query_messages", "rewrite_messages", "sample_query_messages"]

# Role markers and template tokens: a "query" holding them copied the prompt's markup (KnowledgeSG drops these).
_MARKUP = re.compile(r"<\|im_(start|end)\|>|<\|endoftext\|>|\b(system|assistant)\s*:|example question \d",
                     re.IGNORECASE)
_LEAD = re.compile(r"^\s*(?:new question|question|q)\s*\d*\s*[:.)-]\s*", re.IGNORECASE)
# "Here is a new medical question: ..." — a lead-in that announces the question rather than asking it.
_INTRO = re.compile(r"^[^.?!\n]{0,80}\bquestion\b[^.?!\n]{0,20}:\s*", re.IGNORECASE)


def sample_query_messages(system_prompt: str, user_prefix: str = "") -> list[dict]:
    """KnowledgeSG-style query synthesis: the prompt stops where a user's question starts (after a public
    opening such as "Hi doctor, my son has", if given), and the DP generator (trained with a loss on questions
    too) writes the question itself, ending it with its end-of-turn token."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": user_prefix, CONTINUE_KEY: True}]


def join_prefix(prefix: str, continuation: str) -> str:
    """The whole user message: the public opening and what the generator wrote after it."""
    if not prefix:
        return continuation
    glue = "" if not continuation or continuation[0] in ",.;:!?'" or prefix[-1].isspace() else " "
    return f"{prefix}{glue}{continuation}"


def query_messages(domain: DomainSection, prompt_index: int, seeds_per_prompt: int,
                   seed: int) -> list[dict[str, str]]:
    """The DP generator's instruction to write one new question (RewardDS step 4).

    Seeds are drawn from the public `domain.seed_questions` by a generator seeded with (seed, prompt_index), so
    prompt i is the same in every run and every resume.
    """
    system = (f"You create one new question about {domain.description}, similar in style to the examples, "
              "useful for training an assistant. Reply with the question only.")
    pool = domain.seed_questions
    picked = random.Random(f"{seed}:{prompt_index}").sample(pool, min(seeds_per_prompt, len(pool))) if pool else []
    if picked:
        examples = "\n".join(f"Example question {k + 1}: {q}" for k, q in enumerate(picked))
        user = f"{examples}\n\nWrite one new {domain.name} question."
    else:
        user = f"Write one new, realistic question a person might ask an expert in {domain.description}."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def first_sentences(text: str, k: int | None) -> str:
    """The first `k` sentences of `text` (all of it for None): a small generator's patient message drifts off
    the subject after a sentence or two ("... and I am running for mayor")."""
    if k is None:
        return text
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(parts[:k])


def parse_query(text: str, min_words: int, require_question: bool = True) -> tuple[str | None, str | None]:
    """(clean query, None) or (None, reason it is rejected).

    Small generators wrap the question in chatter ('Here's a new medical question: How ...? I hope ...'): with
    `require_question`, the query is the sentence that ends at the first '?', without a lead-in that ends in
    ':' and without quotes. Otherwise the first paragraph is kept (a patient's description of a problem is a
    question too, '?' or not), minus a "Question:" label or lead-in, and cut after its last '?' if it has one.
    """
    if _MARKUP.search(text):
        return None, "copies prompt markup"
    query = text.strip().split("\n\n")[0].strip()
    if require_question:
        end = query.find("?")
        if end < 0:
            return None, "not a question (no '?')"
        head = query[:end + 1]
        start = max(head.rfind(". ", 0, end), head.rfind("! ", 0, end), head.rfind(": ", 0, end),
                    head.rfind("\n", 0, end))
        query = head[start + 1:] if start >= 0 else head
    else:
        query = _INTRO.sub("", query, count=1)
        if "?" in query:
            query = query[:query.rfind("?") + 1]
    query = _LEAD.sub("", query.strip()).strip().strip('"\u201c\u201d').strip()
    if not query:
        return None, "empty"
    if len(re.findall(r"\w+", query)) < min_words:
        return None, "too short"
    return query, None


def judge_messages(domain: DomainSection, query: str) -> list[dict[str, str]]:
    """The professional model's yes/no check that a query is a valid, in-domain question (KnowledgeSG step 4).

    The answer is read as P("Yes") vs P("No") from the model's scores, not parsed from free text, so every
    query gets a verdict.
    """
    system = (f"You are an expert in {domain.description}. You check questions written for a {domain.name} "
              "question-answering dataset. Answer with Yes or No only.")
    user = (f"Question: {query}\n\nIs this a clear, valid {domain.name} question that an expert in "
            f"{domain.description} could answer? Answer Yes or No.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def answer_messages(domain: DomainSection, query: str) -> list[dict[str, str]]:
    """An answer request in the domain-expert persona (also the system message the target is trained with)."""
    return [{"role": "system", "content": domain.answer_system_prompt}, {"role": "user", "content": query}]


def critique_messages(query: str, positive: str, negative: str) -> list[dict[str, str]]:
    """The generator's short critique of the best vs the worst answer (RewardDS refinement)."""
    system = "You are a strict reviewer of answers. Be brief and concrete."
    user = (f"Question: {query}\n\nAnswer A (better): {positive}\n\nAnswer B (worse): {negative}\n\n"
            "In two or three sentences: what makes A better than B, and what could still improve A?")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def rewrite_messages(domain: DomainSection, query: str, positive: str, critique: str) -> list[dict[str, str]]:
    """The rewriter's request for an improved answer from query + best answer + critique."""
    user = (f"Question: {query}\n\nA previous answer: {positive}\n\nReview of that answer: {critique}\n\n"
            "Write an improved answer to the question. Reply with the answer only.")
    return [{"role": "system", "content": domain.answer_system_prompt}, {"role": "user", "content": user}]
