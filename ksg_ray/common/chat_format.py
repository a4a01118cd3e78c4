"""Records -> training tensors, through the tokenizer's own chat template.

Training and inference must render a record the same way, or the fine-tuned model is asked questions in a
format it never saw; so both go through `tokenizer.apply_chat_template` (`tokenize_record` for training,
`prompt_text` for generation). By default the loss is on the answer only. With `question_loss` (the DP
generator) it covers the user's question too, so the generator also learns what the client's questions look
like and the server can sample new ones from it (KnowledgeSG); only the system message and the user turn's
header stay unlabelled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ksg_ray.common.records import Record

__all__ = ["IGNORE_INDEX", "MIN_ANSWER_TOKENS", "TokenizedExample", "answer_end_ids", "build_messages", "collate",
           "prompt_text", "question_prefix", "tokenize_record", "tokenize_records", "trim_to_sentence"]

IGNORE_INDEX = -100  # label of tokens without loss (prompt, padding): the value torch's cross-entropy skips
MIN_ANSWER_TOKENS = 16  # a truncated example keeps at least this much answer, or it would teach nothing


@dataclass
class TokenizedExample:
    """One record as token ids; `labels` is `input_ids` with the prompt masked to IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def build_messages(record: Record) -> list[dict[str, str]]:
    """Chat messages: system = instruction (omitted if empty), user = input, assistant = output."""
    system = [{"role": "system", "content": record.instruction}] if record.instruction else []
    return system + [{"role": "user", "content": record.input},
                     {"role": "assistant", "content": record.output}]


def prompt_text(tokenizer: Any, record_or_question: Record | str, instruction: str = "") -> str:
    """The generation prompt (system + user + the assistant header) exactly as training rendered it.

    Args:
        tokenizer: a tokenizer with a chat template.
        record_or_question: a record (its output is ignored) or the question text.
        instruction: the system message when a question string is given ("" = none).
    """
    record = record_or_question
    if isinstance(record, str):
        record = Record(instruction, record, "")
    messages = build_messages(record)[:-1]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


_SENTINEL = "\x1eksg-question\x1e"


def question_prefix(tokenizer: Any, instruction: str) -> str:
    """The rendered text up to where the user's question starts (system message + user header): the prompt
    from which a question is sampled, and the part of a training example that a question loss leaves out."""
    system = [{"role": "system", "content": instruction}] if instruction else []
    text = tokenizer.apply_chat_template(system + [{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise ValueError("the chat template does not render the user's content verbatim; question sampling "
                         "needs a template that does")
    return text[:text.index(_SENTINEL)]


def tokenize_record(tokenizer: Any, record: Record, max_seq_len: int,
                    question_loss: bool = False) -> TokenizedExample:
    """Tokenize one record for causal-LM training with the loss on the answer tokens only.

    The prompt is the template's generation prompt; the answer is the rest of the rendered conversation
    (for ChatML: the output, `<|im_end|>` and a newline). Over `max_seq_len`, the answer's content is cut
    first, at its last sentence end that fits, and the template's end of turn is kept (`_cut_answer`; the
    record is kept, so N and the DP sampling rate do not change); if the prompt alone exceeds
    `max_seq_len - MIN_ANSWER_TOKENS`, the prompt is cut from the left (its
    end, the question and the assistant header, is what the answer depends on) keeping `MIN_ANSWER_TOKENS` of
    answer. With `question_loss`, the question's tokens (all of the prompt after `question_prefix`) are
    labelled as well.

    Raises:
        ValueError: `max_seq_len` leaves no room for the minimum answer, or the chat template does not render
            the prompt as a prefix of the conversation (such templates cannot be masked this way).
    """
    if max_seq_len <= MIN_ANSWER_TOKENS:
        raise ValueError(f"max_seq_len must be > {MIN_ANSWER_TOKENS}, got {max_seq_len}")
    messages = build_messages(record)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{record.source or 'record'}: the chat template's generation prompt is not a "
                         "prefix of the rendered conversation; this template is not supported")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        answer_ids = full_ids[len(prompt_ids):]
    else:  # BPE merged across the boundary (an answer starting with whitespace): split at the text instead
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]

    n_prompt, n_answer = len(prompt_ids), len(answer_ids)
    keep_answer = min(n_answer, max(max_seq_len - n_prompt, MIN_ANSWER_TOKENS))
    keep_prompt = min(n_prompt, max_seq_len - keep_answer)
    truncated = keep_answer < n_answer or keep_prompt < n_prompt
    prompt_ids = prompt_ids[n_prompt - keep_prompt:]
    if keep_answer < n_answer:
        answer_ids = _cut_answer(tokenizer, answer_ids, keep_answer)
    prompt_labels = [IGNORE_INDEX] * keep_prompt
    if question_loss:
        prefix = question_prefix(tokenizer, record.instruction)
        if not prompt.startswith(prefix):
            raise ValueError(f"{record.source or 'record'}: the question prefix is not a prefix of the prompt")
        n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        masked = max(0, n_prefix - (n_prompt - keep_prompt))  # what is left of the prefix after a left cut
        prompt_labels = [IGNORE_INDEX] * masked + prompt_ids[masked:]
    return TokenizedExample(prompt_ids + answer_ids, prompt_labels + answer_ids, truncated)


def answer_end_ids(tokenizer: Any) -> list[int]:
    """The tokens the chat template puts after an assistant message's content (ChatML: `<|im_end|>` and a
    newline): the end of turn that a model must see at the end of every answer to learn to stop."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if _SENTINEL not in text:
        raise ValueError("the chat template does not render the assistant's content verbatim")
    tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


def trim_to_sentence(text: str) -> str:
    """`text` up to its last complete sentence (unchanged if it has none): an answer cut at a budget then
    ends where a sentence ends, and a model trained on it (answer + end of turn) stops at a sentence."""
    ends = [m.end() for m in re.finditer(r"[.!?](?:[\"')\]]*)(?=\s|$)", text)]
    return text[:ends[-1]].strip() if ends else text


def _cut_answer(tokenizer: Any, answer_ids: list[int], keep: int) -> list[int]:
    """An over-long answer cut to `keep` tokens inside its content, at its last sentence end, with the
    template's end of turn kept: cut from the right, an answer would lose the very token that teaches a model
    to stop (at seq 256, half of the medical records had none left in their labels)."""
    end = answer_end_ids(tokenizer)
    if not end or answer_ids[-len(end):] != end or keep <= len(end):
        return answer_ids[:keep]
    content = answer_ids[:keep - len(end)]
    text = tokenizer.decode(content)
    trimmed = trim_to_sentence(text)
    if trimmed != text and trimmed:
        content = tokenizer(trimmed, add_special_tokens=False)["input_ids"][:keep - len(end)]
    return content + end


def tokenize_records(
    tokenizer: Any, records: list[Record], max_seq_len: int, question_loss: bool = False
) -> tuple[list[TokenizedExample], int]:
    """Tokenize every record; returns the examples and how many were truncated (a statistic of the data: on the
    client it stays in the log)."""
    examples = [tokenize_record(tokenizer, r, max_seq_len, question_loss) for r in records]
    return examples, sum(e.truncated for e in examples)


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into `input_ids`, `attention_mask`, `labels` and `position_ids`, all [B, L] int64.

    `position_ids` are materialised per row (0..len-1, then 0 on padding) rather than left to the model's
    broadcast [1, L]: per-sample gradient code (Opacus) needs every input to carry the batch dimension.
    Padding is found by length, never by comparing with `pad_token_id`, which may be a real token
    (SmolLM2 pads with `<|im_end|>`, the end of every answer).
    """
    shape = (len(examples), max(len(e.input_ids) for e in examples))
    batch = {k: torch.zeros(shape, dtype=torch.long) for k in ("attention_mask", "position_ids")}
    batch["input_ids"] = torch.full(shape, pad_token_id, dtype=torch.long)
    batch["labels"] = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        batch["input_ids"][i, :n] = torch.tensor(e.input_ids)
        batch["labels"][i, :n] = torch.tensor(e.labels)
        batch["attention_mask"][i, :n] = 1
        batch["position_ids"][i, :n] = torch.arange(n)
    return batch
