"""chat_format with the real SmolLM2 tokenizer (ChatML): loss masks, truncation and collation."""

from pathlib import Path

import pytest
import torch

from ksg_ray.common.chat_format import (
    IGNORE_INDEX,
    MIN_ANSWER_TOKENS,
    TokenizedExample,
    answer_end_ids,
    build_messages,
    collate,
    prompt_text,
    question_prefix,
    tokenize_record,
    tokenize_records,
)
from ksg_ray.common.records import Record, load_records

SHARED_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical" / "dev.jsonl"
END = "<|im_end|>\n"  # what the ChatML template appends to every assistant turn


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def n_prompt(example: TokenizedExample) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def test_build_messages_omits_empty_system():
    assert build_messages(Record("Sys", "Q", "A")) == [{"role": "system", "content": "Sys"},
                                                       {"role": "user", "content": "Q"},
                                                       {"role": "assistant", "content": "A"}]
    assert [m["role"] for m in build_messages(Record("", "Q", "A"))] == ["user", "assistant"]


def test_prompt_text_is_chatml_generation_prompt(smollm2_tokenizer):
    record = Record("Be brief.", "What is 2+2?", "4")
    text = prompt_text(smollm2_tokenizer, record)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert prompt_text(smollm2_tokenizer, "What is 2+2?", instruction="Be brief.") == text
    # SmolLM2's template inserts its own default system prompt when there is none
    assert "named SmolLM" in prompt_text(smollm2_tokenizer, "What is 2+2?")


CASES = load_records("demo:medical", limit=2) + load_records("demo:financial", limit=2) + [
    Record("", "No system message?", "Then the default one."),
    Record("Sys", "Leading whitespace", "\n\n  merges with the header's newline"),  # prefix check fails
]


@pytest.mark.parametrize("record", CASES)
def test_labels_mask_exactly_the_prompt(smollm2_tokenizer, record):
    tok = smollm2_tokenizer
    ex = tokenize_record(tok, record, max_seq_len=1024)
    prompt = ids(tok, prompt_text(tok, record))
    assert not ex.truncated
    assert ex.input_ids[: len(prompt)] == prompt
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.labels[len(prompt):] == ex.input_ids[len(prompt):]
    assert tok.decode(ex.labels[len(prompt):]) == record.output + END
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(build_messages(record), tokenize=False)


def test_a_long_answer_is_cut_inside_its_content_and_keeps_its_end_of_turn(smollm2_tokenizer):
    """A model that never sees an answer end does not learn to stop: the cut keeps the template's end."""
    tok = smollm2_tokenizer
    record = Record("Sys", "Tell me a lot.", "word " * 200)
    ex = tokenize_record(tok, record, max_seq_len=64)
    prompt = ids(tok, prompt_text(tok, record))
    assert ex.truncated and len(ex.input_ids) == len(ex.labels) == 64
    assert ex.input_ids[: len(prompt)] == prompt and n_prompt(ex) == len(prompt)
    assert ex.labels[len(prompt):] == ex.input_ids[len(prompt):]
    answer = tok.decode(ex.input_ids[len(prompt):])
    assert answer.endswith(END) and record.output.startswith(answer[: -len(END)])
    assert answer_end_ids(tok) == ids(tok, END)
    # with sentences, the cut falls at the last sentence end that fits
    record = Record("Sys", "Tell me a lot.", "Rest the knee today. " * 40)
    ex = tokenize_record(tok, record, max_seq_len=64)
    answer = tok.decode(ex.labels[len(prompt):])
    assert answer.endswith("today." + END) and len(ex.input_ids) <= 64


@pytest.mark.parametrize("answer, kept", [("token " * 100, MIN_ANSWER_TOKENS), ("Short.", None)])
def test_long_prompt_is_cut_from_the_left_keeping_answer(smollm2_tokenizer, answer, kept):
    tok = smollm2_tokenizer
    record = Record("Sys", "Background. " * 200 + "So what now?", answer)
    full = tokenize_record(tok, record, max_seq_len=4096)
    ex = tokenize_record(tok, record, max_seq_len=64)
    n_answer = len(full.input_ids) - n_prompt(full)
    kept = kept or n_answer  # a short answer is kept whole
    assert ex.truncated and len(ex.input_ids) == 64
    assert n_prompt(ex) == 64 - kept
    assert ex.input_ids[:n_prompt(ex)] == full.input_ids[n_prompt(full) - (64 - kept): n_prompt(full)]
    assert tok.decode(ex.input_ids[n_prompt(ex):]).endswith(END)  # the answer, cut or not, keeps its end
    prompt_end = "So what now?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex.input_ids[: n_prompt(ex)]).endswith(prompt_end)


def test_max_seq_len_must_leave_room_for_the_answer(smollm2_tokenizer):
    with pytest.raises(ValueError, match="max_seq_len must be > 16"):
        tokenize_record(smollm2_tokenizer, Record("", "q", "a"), max_seq_len=MIN_ANSWER_TOKENS)


def test_tokenize_records_counts_truncated(smollm2_tokenizer):
    records = [Record("", "q", "short"), Record("", "q", "long " * 100), Record("", "q", "a")]
    examples, truncated = tokenize_records(smollm2_tokenizer, records, max_seq_len=48)
    assert [e.truncated for e in examples] == [False, True, False] and truncated == 1
    assert all(len(e.input_ids) <= 48 for e in examples)


def test_collate_pads_right_with_per_row_positions(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = [Record("", "q", "a"), Record("Sys", "longer question", "longer answer")]
    examples, _ = tokenize_records(tok, records, 128)
    lengths = [len(e.input_ids) for e in examples]
    batch = collate(examples, pad_token_id=tok.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    for t in batch.values():
        assert t.shape == (2, max(lengths)) and t.dtype == torch.long
    for i, (e, n) in enumerate(zip(examples, lengths, strict=True)):
        assert batch["input_ids"][i, :n].tolist() == e.input_ids
        assert batch["labels"][i, :n].tolist() == e.labels  # <|im_end|> keeps its label (also the pad id)
        assert batch["position_ids"][i].tolist() == list(range(n)) + [0] * (max(lengths) - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


@pytest.mark.skipif(not SHARED_DEV.is_file(), reason="shared domain data not present")
def test_real_records_render_identically(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records = load_records(SHARED_DEV)
    examples, truncated = tokenize_records(tok, records, max_seq_len=512)
    assert truncated < len(records) // 4
    for record, ex in zip(records, examples, strict=True):
        assert len(ex.input_ids) <= 512
        if not ex.truncated:
            assert tok.decode(ex.input_ids) == tok.apply_chat_template(build_messages(record), tokenize=False)


def test_question_loss_labels_the_question_but_not_the_system_message(smollm2_tokenizer):
    """The DP generator learns the client's questions too (KnowledgeSG), so the server can sample new ones."""
    tok = smollm2_tokenizer
    record = Record("Answer as a doctor.", "My knee hurts when I run.", "Rest it for a week.")
    plain = tokenize_record(tok, record, 256)
    with_question = tokenize_record(tok, record, 256, question_loss=True)
    assert plain.input_ids == with_question.input_ids
    labelled = tok.decode([t for t in with_question.labels if t != IGNORE_INDEX])
    assert labelled.startswith("My knee hurts when I run.") and "Rest it for a week." in labelled
    assert "Answer as a doctor" not in labelled and "My knee" not in tok.decode(
        [t for t in plain.labels if t != IGNORE_INDEX])
    prefix = question_prefix(tok, record.instruction)
    assert tok.apply_chat_template(build_messages(record), tokenize=False).startswith(prefix + record.input)
    cut = tokenize_record(tok, record, MIN_ANSWER_TOKENS + 4, question_loss=True)  # prefix cut from the left
    assert cut.truncated and len(cut.input_ids) == MIN_ANSWER_TOKENS + 4
