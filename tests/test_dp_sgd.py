"""The clipping bound holds whatever the compute dtype: under bf16 autocast one record still moves the clipped
sum by at most C (per-sample norms, clip factors and sums are float32)."""

from __future__ import annotations

import warnings

import pytest
import torch

from ksg_ray.client.privacy.dp_sgd import DPSGD
from ksg_ray.common.chat_format import collate, tokenize_records
from ksg_ray.common.lora import build_lora_lm, lm_loss
from ksg_ray.common.records import load_records
from ksg_ray.common.sections import LoraSection

CLIP = 1e-3  # far below the records' gradient norms: every record is clipped


@pytest.fixture(scope="module")
def setup(tiny_model_path):
    from transformers import AutoTokenizer

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    examples, _ = tokenize_records(tok, load_records("demo", limit=4), max_seq_len=64, question_loss=True)
    model = build_lora_lm(torch.device("cpu"), model_path=tiny_model_path, lora=LoraSection(r=4), seed=0)
    with torch.no_grad():  # LoRA B starts at 0; move it so every LoRA weight has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    dp = DPSGD(model, max_grad_norm=CLIP, noise_multiplier=0.0, expected_batch_size=4)
    return dp, [collate([e], tok.pad_token_id) for e in examples]


@pytest.mark.parametrize("bf16", [False, True])
def test_one_record_moves_the_clipped_sum_by_at_most_c(setup, bf16):
    dp, chunks = setup  # one record per chunk: no record's gradient depends on who shares its forward pass
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with_all, _, n_all = dp.clipped_sum(chunks, lm_loss)
        without_last, _, n = dp.clipped_sum(chunks[:-1], lm_loss)
        alone = [dp.clipped_sum([chunk], lm_loss)[0] for chunk in chunks]
    assert (n_all, n) == (4, 3)
    assert all(s.dtype == torch.float32 for s in with_all)
    delta = torch.cat([(a.double() - b.double()).flatten() for a, b in zip(with_all, without_last, strict=True)])
    moved = float(delta.norm())
    assert 0.5 * CLIP < moved <= CLIP * (1 + 1e-6), moved
    # each record on its own: a bf16 norm (8 bits of mantissa) would put some of them up to 0.4% over C
    norms = [float(torch.cat([s.double().flatten() for s in sums]).norm()) for sums in alone]
    assert all(0.5 * CLIP < x <= CLIP * (1 + 1e-6) for x in norms), norms
