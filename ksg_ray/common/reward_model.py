"""The RewardDS reward proxy: base model + LoRA + a scalar head, trained with a Bradley–Terry loss.

Input is the chat of a judge system prompt, the question and one answer; output one logit (the reward).
Each private record yields three candidate answers — the private truth, the DP generator's greedy answer and
the base model's — and preference pairs truth ≻ base, truth ≻ DP generator, DP generator ≻ base. A record is
one packed row: the judge prompt and question once, then each answer, which attends to the shared prefix and to
itself only and takes the positions it would have in its own chat (`collate_reward`). So the rewards are those
of the separate chats, the prefix (70-87 of a demo chat's ~96 tokens) is computed once instead of three times,
and `DPSGD` clips each row's gradient, which is the record's: the guarantee is per record, not per pair (the
published code clipped per pair, which gives only group privacy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

from ksg_ray.common.batching import length_batches
from ksg_ray.common.lora import lora_config
from ksg_ray.common.sections import LoraSection
from ksg_ray.common.torch_threads import one_torch_thread

__all__ = ["JUDGE_PROMPT", "RewardExample", "bradley_terry_loss", "build_lora_reward", "collate_reward",
           "load_reward_model", "pairwise_accuracy", "reward_example_tokens", "reward_messages", "reward_pad_id",
           "reward_scores", "score_texts", "shared_prefix_length", "tokenize_reward_example"]

JUDGE_PROMPT = (
    "You are a data quality evaluator. Judge the quality of this conversation: is the assistant's answer "
    "accurate, helpful and specific to the user's question?"
)
# candidate order inside a record, and the preference pairs (chosen, rejected) between them; the non-DP proxy
# (off by default, NOT DP) ranks between the truth and the base model, as in RewardDS
CANDIDATES = ("truth", "dp_generator", "base", "non_dp_proxy")
PAIRS = ((0, 2), (0, 1), (1, 2), (0, 3), (3, 2))
MAX_ANSWERS_PER_ROW = 8  # scoring: answers to one question packed in one row (its attention mask grows as its square)


def reward_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def reward_pad_id(tokenizer) -> int:
    """A pad id that never occurs in a rendered chat, so "last non-pad token" pooling is exact.

    SmolLM2 pads with `<|im_end|>`, which closes every turn; its unk token `<|endoftext|>` never appears.
    """
    for candidate in (tokenizer.unk_token_id, tokenizer.pad_token_id):
        if candidate is not None and candidate != tokenizer.eos_token_id:
            return candidate
    raise ValueError("the tokenizer has no pad or unk token distinct from its end token; set one explicitly")


@dataclass
class RewardExample:
    """One private record: token ids of each candidate answer's judge chat, and its preference pairs."""

    rows: list[list[int]]
    pairs: list[tuple[int, int]]


def judge_chat_ids(tokenizer, question: str, answer: str, max_seq_len: int) -> list[int]:
    text = tokenizer.apply_chat_template(reward_messages(question, answer), tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_seq_len]


def tokenize_reward_example(tokenizer, question: str, answers: list[str], max_seq_len: int) -> RewardExample:
    """Candidates in `CANDIDATES` order; a pair whose two answers are the same text carries no preference."""
    rows = [judge_chat_ids(tokenizer, question, a, max_seq_len) for a in answers]
    pairs = [(c, r) for c, r in PAIRS if max(c, r) < len(answers) and answers[c].strip() != answers[r].strip()]
    return RewardExample(rows=rows, pairs=pairs)


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all of a record's chats share, leaving at least one token of each after it (the
    token its reward is read at)."""
    limit, first = min(len(r) for r in rows) - 1, rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def reward_example_tokens(example: RewardExample) -> int:
    """A record's packed length (shared prefix once, then each chat's rest): what batches group records by."""
    prefix = shared_prefix_length(example.rows)
    return prefix + sum(len(r) - prefix for r in example.rows)


def collate_reward(examples: list[RewardExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One packed, right-padded row per record, and where each chat's reward is read.

    A row holds the record's shared prefix, then the rest of each chat in `rows` order. `attention_mask` is a
    4D boolean mask (True: may attend): a prefix token sees the prefix before it, a chat's token sees the prefix
    and its own chat before it, and padding sees padding and the prefix (only so that no attention row is empty:
    an empty one gives NaN, and NaN times a zero gradient is still NaN in Opacus' per-sample sums).
    `position_ids` restart after the prefix for each chat, so each chat's tokens are computed as in a batch of
    separate chats.
    `reward_at[i, k]` is the position of chat k's last token in row i (`reward_valid` marks the chats a record
    has), and `pair_chosen` / `pair_rejected` index the rewards flattened record by record, chat by chat.
    """
    rows, positions, segments, reward_at = [], [], [], []
    chosen, rejected, pair_to_record = [], [], []
    num_rewards = 0
    for i, ex in enumerate(examples):
        prefix = shared_prefix_length(ex.rows)
        ids, pos, seg, at = list(ex.rows[0][:prefix]), list(range(prefix)), [0] * prefix, []
        for k, chat in enumerate(ex.rows, start=1):
            ids.extend(chat[prefix:])
            pos.extend(range(prefix, len(chat)))
            seg.extend([k] * (len(chat) - prefix))
            at.append(len(ids) - 1)
        rows.append(ids)
        positions.append(pos)
        segments.append(seg)
        reward_at.append(at)
        for c, r in ex.pairs:
            chosen.append(num_rewards + c)
            rejected.append(num_rewards + r)
            pair_to_record.append(i)
        num_rewards += len(ex.rows)
    width, chats = max(len(r) for r in rows), max(len(a) for a in reward_at)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding, 0: shared prefix, k: chat k
    at = torch.zeros((len(rows), chats), dtype=torch.long)
    valid = torch.zeros((len(rows), chats), dtype=torch.bool)
    for j, (r, p, s, a) in enumerate(zip(rows, positions, segments, reward_at, strict=True)):
        ids[j, : len(r)], pos[j, : len(r)], seg[j, : len(r)] = torch.tensor(r), torch.tensor(p), torch.tensor(s)
        at[j, : len(a)], valid[j, : len(a)] = torch.tensor(a), True
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    sees = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    return {
        "input_ids": ids, "attention_mask": sees[:, None], "position_ids": pos,
        "reward_at": at, "reward_valid": valid, "num_records": torch.tensor(len(examples)),
        "pair_chosen": torch.tensor(chosen, dtype=torch.long),
        "pair_rejected": torch.tensor(rejected, dtype=torch.long),
        "pair_to_record": torch.tensor(pair_to_record, dtype=torch.long),
    }


def _sequence_classifier(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers `*ForSequenceClassification` inside Opacus' and peft's wrappers (LoRA stays injected)."""
    module = getattr(module, "_module", module)  # opacus GradSampleModule
    return module.get_base_model() if isinstance(module, PeftModel) else module


def reward_scores(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per chat, record by record (the head's logit at the chat's last token).

    The backbone and the head are called apart because the model's own pooling reads one token per row; the
    head sees [records, chats, hidden], so Opacus' per-sample gradients stay per record.
    """
    model = _sequence_classifier(module)
    mask = batch["attention_mask"]
    if model.config._attn_implementation == "eager":  # eager adds the mask to its scores; sdpa takes booleans
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(model.dtype).min)
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=mask,
                              position_ids=batch["position_ids"]).last_hidden_state
    rows = torch.arange(len(hidden), device=hidden.device)[:, None]
    logits = model.score(hidden[rows, batch["reward_at"]]).squeeze(-1)
    return logits[batch["reward_valid"]].float()


def bradley_terry_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-record loss: mean over the record's pairs of −log σ(r_chosen − r_rejected)."""
    r = reward_scores(module, batch)
    pair_loss = -F.logsigmoid(r[batch["pair_chosen"]] - r[batch["pair_rejected"]])
    n = int(batch["num_records"])
    total = torch.zeros(n, dtype=pair_loss.dtype, device=pair_loss.device).index_add(0, batch["pair_to_record"],
                                                                                      pair_loss)
    count = torch.zeros(n, device=pair_loss.device).index_add(0, batch["pair_to_record"], torch.ones_like(pair_loss))
    return total / count.clamp(min=1)


def build_lora_reward(device: torch.device, *, model_path: str, lora: LoraSection, seed: int = 0) -> PeftModel:
    """Sequence classification with one label: LoRA on the backbone, the `score` head trained in full."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(seed)  # the head is new: seed it like the adapters
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = reward_pad_id(tokenizer)
    base.config.use_cache = False
    base.to(device)
    return get_peft_model(base, lora_config(lora, base.config.num_hidden_layers, task_type="SEQ_CLS",
                                            modules_to_save=["score"]))


def reward_builder(model_path: str, lora: LoraSection, seed: int):
    return partial(build_lora_reward, model_path=model_path, lora=lora, seed=seed)


def load_reward_model(component_dir: str | Path, model_path: str, device: str = "cpu"):
    """Server side: the base model (public) + the bundle's reward adapter and head; returns (model, tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with one_torch_thread():  # loaded in a Ray actor's main thread, run in another: see torch_threads
        base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
        base.config.pad_token_id = reward_pad_id(tokenizer)
        model = PeftModel.from_pretrained(base, str(component_dir)).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def score_texts(model, tokenizer, questions: list[str], answers: list[str], max_seq_len: int = 512,
                batch_size: int = 16, max_padding: float | None = 0.25) -> list[float]:
    """Rewards of (question, answer) pairs, in the input order.

    The answers to one question share a packed row (up to `MAX_ANSWERS_PER_ROW` of them), so the judge prompt and
    question are computed once per row; rows go in batches of like lengths (`length_batches`), `batch_size`
    rows at a time.
    """
    pad = reward_pad_id(tokenizer)
    by_question: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_question.setdefault(q, []).append(i)
    groups = [g[j:j + MAX_ANSWERS_PER_ROW] for g in by_question.values()
              for j in range(0, len(g), MAX_ANSWERS_PER_ROW)]
    examples = [RewardExample(rows=[judge_chat_ids(tokenizer, questions[i], answers[i], max_seq_len) for i in g],
                              pairs=[]) for g in groups]
    out = [math.nan] * len(questions)
    dev = next(model.parameters()).device
    for chunk in length_batches([reward_example_tokens(ex) for ex in examples], batch_size, max_padding):
        batch = collate_reward([examples[j] for j in chunk], pad)
        rewards = reward_scores(model, {k: v.to(dev) for k, v in batch.items()}).tolist()
        for i, reward in zip((i for j in chunk for i in groups[j]), rewards, strict=True):
            out[i] = reward
    return out


def pairwise_accuracy(model, model_path: str, questions: list[str], chosen: list[str], rejected: list[str],
                      max_seq_len: int = 512) -> float:
    """Share of pairs where the chosen answer gets the higher reward (ties count half)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.eval()
    rc = score_texts(model, tokenizer, questions, chosen, max_seq_len)
    rr = score_texts(model, tokenizer, questions, rejected, max_seq_len)
    model.train()
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rc, rr, strict=True))
    return wins / max(1, len(rc))
