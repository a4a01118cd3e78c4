"""The RewardDS reward proxy: base model + LoRA + a scalar head, trained with a Bradley–Terry loss.

Input is the chat of a judge system prompt, the question and one answer; output one logit (the reward).
Each private record yields three candidate answers — the private truth, the DP generator's greedy answer and
the base model's — and preference pairs truth ≻ base, truth ≻ DP generator, DP generator ≻ base. All rows of
one record go through the model together and carry `row_to_record`, so `DPSGD` clips the record's summed
gradient once: the guarantee is per record, not per pair (the published code clipped per pair, which gives
only group privacy).
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
           "reward_scores", "tokenize_reward_example"]

JUDGE_PROMPT = (
    "You are a data quality evaluator. Judge the quality of this conversation: is the assistant's answer "
    "accurate, helpful and specific to the user's question?"
)
# candidate order inside a record, and the preference pairs (chosen, rejected) between them; the non-DP proxy
# (off by default, NOT DP) ranks between the truth and the base model, as in RewardDS
CANDIDATES = ("truth", "dp_generator", "base", "non_dp_proxy")
PAIRS = ((0, 2), (0, 1), (1, 2), (0, 3), (3, 2))


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


def reward_example_tokens(example: RewardExample) -> int:
    """A record's padded width in a batch (its longest candidate row): what DP training groups micro-batches by."""
    return max(len(r) for r in example.rows)


def collate_reward(examples: list[RewardExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of all records (right-padded) plus the maps row → record and pair → (chosen row, rejected row)."""
    rows, row_to_record, chosen, rejected, pair_to_record = [], [], [], [], []
    for i, ex in enumerate(examples):
        base = len(rows)
        rows.extend(ex.rows)
        row_to_record.extend([i] * len(ex.rows))
        for c, r in ex.pairs:
            chosen.append(base + c)
            rejected.append(base + r)
            pair_to_record.append(i)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return {
        "input_ids": ids, "attention_mask": mask,
        "position_ids": torch.arange(width).expand(len(rows), width).clone() * mask,
        "row_to_record": torch.tensor(row_to_record), "num_records": torch.tensor(len(examples)),
        "pair_chosen": torch.tensor(chosen, dtype=torch.long),
        "pair_rejected": torch.tensor(rejected, dtype=torch.long),
        "pair_to_record": torch.tensor(pair_to_record, dtype=torch.long),
    }


def reward_scores(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per row (the head's logit at the row's last real token)."""
    out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"])
    return out.logits.squeeze(-1).float()


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
    """Rewards of (question, answer) pairs, in batches of like lengths (`length_batches`), in the input order."""
    pad = reward_pad_id(tokenizer)
    rows = [judge_chat_ids(tokenizer, q, a, max_seq_len) for q, a in zip(questions, answers, strict=True)]
    out = [math.nan] * len(rows)
    dev = next(model.parameters()).device
    for chunk in length_batches([len(r) for r in rows], batch_size, max_padding):
        batch = collate_reward([RewardExample(rows=[rows[i]], pairs=[]) for i in chunk], pad)
        for i, reward in zip(chunk, reward_scores(model, {k: v.to(dev) for k, v in batch.items()}).tolist(),
                             strict=True):
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
