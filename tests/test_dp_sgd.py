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


def test_labelled_only_logits_give_the_full_logits_loss_and_clipped_sum(tiny_model_path):
    """`lm_loss` runs the LM head only where a label is: the same per-record losses and the same clipped sum as
    `per_sample_lm_loss` on logits at every position, with prompts, padding and records of different lengths."""
    from transformers import AutoTokenizer

    from ksg_ray.common.lora import per_sample_lm_loss

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    examples, _ = tokenize_records(tok, load_records("demo", limit=6), max_seq_len=96, question_loss=False)
    batch = collate(examples, tok.pad_token_id)
    assert len({len(e.input_ids) for e in examples}) > 1 and (batch["labels"] == -100).float().mean() > 0.3
    model = build_lora_lm(torch.device("cpu"), model_path=tiny_model_path, lora=LoraSection(r=4), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)

    def full_logits(module, b):
        out = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
        return per_sample_lm_loss(out.logits, b["labels"])

    torch.testing.assert_close(lm_loss(model, batch), full_logits(model, batch))
    dp = DPSGD(model, max_grad_norm=CLIP, noise_multiplier=0.0, expected_batch_size=6)
    new, new_loss, _ = dp.clipped_sum([batch], lm_loss)
    old, old_loss, _ = dp.clipped_sum([batch], full_logits)
    assert abs(new_loss - old_loss) < 1e-4
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the head's hook is gone after the call


def test_length_grouped_micro_batches_change_the_padding_not_the_sum(setup, tiny_model_path):
    """Records of similar length share a micro-batch (longest first); the clipped sum is the same however the
    step's records are split, which is what lets the trainer group them."""
    from transformers import AutoTokenizer

    from ksg_ray.common.lora import example_tokens
    from ksg_ray.common.ray_train import TrainTask, micro_batch_split

    dp, _ = setup
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    examples, _ = tokenize_records(tok, load_records("demo", limit=6), max_seq_len=96, question_loss=True)
    lengths = [len(e.input_ids) for e in examples]
    task = TrainTask(build_model=None, examples=examples, collate=None, loss_fn=None, save=None, load=None,
                     length=example_tokens)
    split = micro_batch_split(list(range(6)), 2, task)
    assert sorted(i for c in split for i in c) == list(range(6))
    for longer, shorter in zip(split, split[1:], strict=False):
        assert min(lengths[i] for i in longer) >= max(lengths[i] for i in shorter)
    assert micro_batch_split([3, 1, 2], 2, None) == [[3, 1], [2]]  # no lengths: sampled order
    grouped, _, n = dp.clipped_sum([collate([examples[i] for i in c], tok.pad_token_id) for c in split], lm_loss)
    apart, _, _ = dp.clipped_sum([collate([e], tok.pad_token_id) for e in examples], lm_loss)
    assert n == 6
    for a, b in zip(grouped, apart, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-4)


def test_frozen_base_stored_in_bf16_gives_the_autocast_clipped_sum_bit_for_bit(tiny_model_path):
    """The trainers store the frozen linear weights in bf16 when they run under bf16 autocast, to skip autocast's
    per-forward casts: per-record losses and the clipped sum are exactly those of the float32-stored model, the
    embeddings, norms and adapters stay float32, and a tied output head gets its own copy."""
    from transformers import AutoTokenizer

    from ksg_ray.common.lora import frozen_linears_to_bf16

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    examples, _ = tokenize_records(tok, load_records("demo", limit=4), max_seq_len=64, question_loss=False)
    chunks = [collate(examples[:2], tok.pad_token_id), collate(examples[2:], tok.pad_token_id)]
    sums = []
    for cast in (False, True):
        model = build_lora_lm(torch.device("cpu"), model_path=tiny_model_path, lora=LoraSection(r=4), seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        if cast:
            embed, head = model.get_input_embeddings(), model.get_output_embeddings()
            assert head.weight is embed.weight  # the tiny model ties them, like SmolLM2
            assert frozen_linears_to_bf16(model) > 0
            assert head.weight.dtype == torch.bfloat16 and embed.weight.dtype == torch.float32
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
        dp = DPSGD(model, max_grad_norm=CLIP, noise_multiplier=0.0, expected_batch_size=4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums.append(dp.clipped_sum(chunks, lm_loss))
    (before, loss_before, n_before), (after, loss_after, n_after) = sums
    assert (n_before, loss_before) == (n_after, loss_after)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_top_layer_adapters_train_the_top_layers_alone_and_sum_the_same_gradients(tiny_model_path):
    """`lora.top_layers`: adapters (and so gradients, clipping, noise) in the top layers only; the per-record
    hooks still give the plain gradient of the batch, and a model with fewer layers than asked is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    examples, _ = tokenize_records(tok, load_records("demo", limit=3), max_seq_len=64, question_loss=True)
    model = build_lora_lm(torch.device("cpu"), model_path=tiny_model_path, lora=LoraSection(r=4, top_layers=1))
    top = model.config.num_hidden_layers - 1
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(f".layers.{top}." in name for name in trained), trained
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate(examples, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(lm_loss(model, batch).sum(), params)
    dp = DPSGD(model, max_grad_norm=1e9, noise_multiplier=0.0, expected_batch_size=3)  # no record is clipped
    sums, _, n = dp.clipped_sum([batch], lm_loss)
    assert n == 3
    for s, g in zip(sums, plain, strict=True):
        torch.testing.assert_close(s, g, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="top_layers"):
        build_lora_lm(torch.device("cpu"), model_path=tiny_model_path, lora=LoraSection(top_layers=top + 2))
