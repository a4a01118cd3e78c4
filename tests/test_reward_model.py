"""The reward model: one packed row per record with each chat's own reward, record-level clipping across a
record's pairs, Bradley–Terry loss, exact pooling."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import save_varied_model
from opacus.grad_sample import GradSampleModule
from transformers import AutoTokenizer

from ksg_ray.client.privacy.dp_sgd import DPSGD
from ksg_ray.common.reward_model import (
    PAIRS,
    bradley_terry_loss,
    build_lora_reward,
    collate_reward,
    reward_example_tokens,
    reward_pad_id,
    reward_scores,
    tokenize_reward_example,
)
from ksg_ray.common.sections import LoraSection

CLIP = 0.01
QUESTIONS = [
    ("My knee hurts after running, what should I do?",
     ["Rest, ice and a gradual return; see a doctor if swelling persists.", "Knees are joints.", "Run more."]),
    ("Should I pay off my car loan early?",
     ["Compare the loan rate with what the money earns elsewhere.", "Loans are debts.", "Cars are nice."]),
    ("Is a daily headache a concern?",
     ["Yes if new or worsening; track triggers and see a physician.", "Headaches hurt.", "Drink coffee."]),
]


@pytest.fixture(scope="module")
def setup(tiny_model_path):
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = build_lora_reward(torch.device("cpu"), model_path=tiny_model_path, lora=LoraSection(r=4), seed=0)
    with torch.no_grad():  # LoRA's B starts at zero: random adapters make the backbone's gradients count
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    model = GradSampleModule(model, batch_first=True, loss_reduction="sum")  # Opacus hooks a model once
    examples = [tokenize_reward_example(tok, q, answers, 96) for q, answers in QUESTIONS]
    return tok, model, examples


def _clipped_sum(model, examples, pad):
    dp = DPSGD(model, max_grad_norm=CLIP, noise_multiplier=0.0, expected_batch_size=len(examples))
    sums, _, n = dp.clipped_sum([collate_reward(examples, pad)], bradley_terry_loss)
    assert n == len(examples)  # losses are per record, not per pair or per row
    return torch.cat([s.flatten() for s in sums])


def _alone(model, chat: list[int]) -> torch.Tensor:
    """The reward of one chat through the model's own forward and pooling: what packing must reproduce."""
    return model._module(input_ids=torch.tensor([chat])).logits.reshape(())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # sdpa takes the boolean mask, eager an additive one
def test_a_packed_row_gives_each_chat_the_reward_it_gets_alone(setup, attention):
    tok, model, examples = setup
    batch = collate_reward(examples, reward_pad_id(tok))
    assert batch["input_ids"].shape[0] == len(examples)  # one row per record
    assert all(reward_example_tokens(ex) < 0.7 * sum(len(r) for r in ex.rows) for ex in examples)
    config = model._module.get_base_model().config
    before = config._attn_implementation
    model.eval()
    try:
        config._attn_implementation = attention
        with torch.no_grad():
            packed = reward_scores(model, batch)
            alone = torch.stack([_alone(model, chat) for ex in examples for chat in ex.rows])
    finally:
        config._attn_implementation = before
        model.train()
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert len({round(float(r), 4) for r in alone}) == len(alone)  # distinct: a mixed-up chat would show


def test_chats_cut_inside_their_shared_prefix_keep_their_own_reward(setup):
    """Truncated to 12 tokens, all three chats are the same tokens: the prefix stops one short, and each chat
    keeps its last token."""
    tok, model, _ = setup
    ex = tokenize_reward_example(tok, "Is a daily headache a concern?", ["Yes.", "No.", "Maybe."], 12)
    assert all(r == ex.rows[0] for r in ex.rows) and reward_example_tokens(ex) == 11 + 3
    model.eval()
    with torch.no_grad():
        packed = reward_scores(model, collate_reward([ex], reward_pad_id(tok)))
        alone = _alone(model, ex.rows[0])
    model.train()
    torch.testing.assert_close(packed, alone.expand(3), rtol=1e-4, atol=1e-5)


def test_clipped_sum_of_packed_records_equals_clipping_each_records_separate_chats(setup):
    """The reference needs no Opacus and no packing: each record's loss from its chats run alone, its gradient by
    autograd, clipped to C, summed. Packing and per-sample gradients must give the same sum."""
    tok, model, examples = setup
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    norms = []
    for ex in examples:
        r = torch.stack([_alone(model, chat) for chat in ex.rows])
        loss = torch.stack([-torch.nn.functional.logsigmoid(r[c] - r[j]) for c, j in ex.pairs]).mean()
        grads = torch.autograd.grad(loss, params)
        norm = torch.cat([g.flatten() for g in grads]).norm()
        norms.append(float(norm))
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, CLIP / (float(norm) + 1e-6))
    assert min(norms) > CLIP  # every record is clipped: the test compares clipped gradients, not raw ones
    for p in params:
        p.grad_sample = None
    got = _clipped_sum(model, examples, reward_pad_id(tok))
    torch.testing.assert_close(got, torch.cat([e.flatten() for e in expected]), rtol=1e-3, atol=1e-7)


def test_a_record_with_three_pairs_moves_the_clipped_sum_by_at_most_the_clip_norm(setup):
    tok, model, examples = setup
    pad = reward_pad_id(tok)
    assert all(len(ex.pairs) == 3 and len(ex.rows) == 3 for ex in examples)
    with_all = _clipped_sum(model, examples, pad)
    without_last = _clipped_sum(model, examples[:-1], pad)
    delta = float((with_all - without_last).norm())
    assert 0 < delta <= CLIP * (1 + 1e-4)
    # clipping per pair instead would let one record move the sum by up to 3·C: the unclipped record is larger
    dp = DPSGD(model, max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=1)
    unclipped, _, _ = dp.clipped_sum([collate_reward(examples[-1:], pad)], bradley_terry_loss)
    assert float(torch.cat([s.flatten() for s in unclipped]).norm()) > CLIP


def test_pooling_reads_the_last_real_token_whatever_the_padding(setup):
    tok, model, examples = setup
    pad = reward_pad_id(tok)
    assert pad != tok.eos_token_id
    model.eval()
    with torch.no_grad():
        batched = reward_scores(model, collate_reward(examples, pad))
        single = torch.cat([reward_scores(model, collate_reward([ex], pad)) for ex in examples])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    model.train()


def test_bradley_terry_loss_prefers_the_chosen_answer(setup):
    tok, model, examples = setup
    batch = collate_reward(examples, reward_pad_id(tok))
    loss = bradley_terry_loss(model, batch)
    assert loss.shape == (len(examples),)
    r = reward_scores(model, batch).detach()
    c, j = PAIRS[0]
    expected0 = -torch.nn.functional.logsigmoid(
        torch.tensor([r[c] - r[j], r[0] - r[1], r[1] - r[2]])).mean()
    assert float(loss[0]) == pytest.approx(float(expected0), rel=1e-4)


def test_identical_candidates_make_no_pair(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ex = tokenize_reward_example(tok, "q?", ["truth", "same", "same"], 64)
    assert ex.pairs == [(0, 2), (0, 1)]


def test_non_dp_proxy_is_used_and_marks_the_ledger_not_dp(tmp_path, tiny_model_path):
    """Off by default; when set, its answers join the pairs and the privacy report says "not DP"."""
    import json

    from ksg_ray.client.config import DPRewardConfig
    from ksg_ray.client.privacy.engine import PrivacyEngine
    from ksg_ray.client.reward_candidates import NOT_DP_PROXY, GeneratorRef, build_reward_examples, candidate_cache_key
    from ksg_ray.common.config import load_config
    from ksg_ray.common.records import load_records

    records = load_records("demo", limit=2)
    run_dir = tmp_path / "reward"
    run_dir.mkdir()
    generator = GeneratorRef(tiny_model_path, str(tmp_path / "generator"), "sha-of-the-test-generator")
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    for proxy, rows, pairs, flagged in ((None, 3, 3, False), (tmp_path / "proxy", 4, 5, True)):
        override = f"candidates.non_dp_proxy_adapter={proxy}" if proxy else "data.limit=2"
        cfg = load_config(DPRewardConfig, None, [override])
        engine = PrivacyEngine(cfg.privacy.model_copy(update={"ledger_dir": tmp_path}), records)
        key = candidate_cache_key(cfg, generator, engine.record_set)
        cached = {"records": [r.source for r in records], "key": key, "base": ["b1", "b2"],
                  "dp_generator": ["d1", "d2"], "non_dp_proxy": ["p1", "p2"]}
        (run_dir / "candidates.json").write_text(json.dumps(cached))  # no generation needed
        examples, _, failed = build_reward_examples(cfg, records, tok, generator, run_dir, engine)
        assert not failed and all(len(e.rows) == rows and len(e.pairs) == pairs for e in examples)
        assert (NOT_DP_PROXY in engine.report()["not_dp"]) is flagged


def test_a_retrained_generator_invalidates_the_candidate_cache(tmp_path, monkeypatch):
    """Candidates are cached per record; another generator (or other data, other settings) must not reuse them."""
    import json

    from ksg_ray.client import reward_candidates as rc
    from ksg_ray.client.config import DPRewardConfig
    from ksg_ray.common.config import load_config
    from ksg_ray.common.records import load_records

    calls = []
    monkeypatch.setattr(rc, "generate_answer_sets", lambda records, **sources: calls.append(sorted(sources)) or
                        {name: [f"{kw['adapter_path']}:{i}" for i in range(len(records))]
                         for name, kw in sources.items()})
    records, cache = load_records("demo", limit=2), tmp_path / "candidates.json"
    cfg = load_config(DPRewardConfig, None, [])
    old, new = (rc.GeneratorRef("base", "gen", sha) for sha in ("sha-old", "sha-new"))
    sources = {"dp_generator": {"adapter_path": "gen"}}
    first = rc.load_or_generate_candidates(records, cache, rc.candidate_cache_key(cfg, old, "d"), **sources)
    again = rc.load_or_generate_candidates(records, cache, rc.candidate_cache_key(cfg, old, "d"), **sources)
    assert first == again and len(calls) == 1  # same generator: cached
    rc.load_or_generate_candidates(records, cache, rc.candidate_cache_key(cfg, new, "d"), **sources)
    rc.load_or_generate_candidates(records, cache, rc.candidate_cache_key(cfg, new, "other-data"), **sources)
    assert len(calls) == 3  # a retrained generator, then other data: generated again
    assert json.loads(cache.read_text())["key"]["generator_sha256"] == "sha-new"


def test_two_candidate_sources_in_one_execution_keep_their_answers_apart(ray_cluster, tiny_model_path, tmp_path):
    """The sources run as unioned branches of one Ray Data execution: every answer lands at its source and record.

    Greedy answers of one model at 3 and at 6 new tokens: the shorter must start the longer, record by record.
    """
    from ksg_ray.client.reward_candidates import generate_answer_sets
    from ksg_ray.common.records import load_records

    save_varied_model(tiny_model_path, tmp_path / "varied")  # a tiny model whose answers differ by prompt
    records = load_records("demo", limit=5)
    kw = dict(engine="transformers", model_path=str(tmp_path / "varied"), adapter_path=None, batch_size=2)
    sets = generate_answer_sets(records, short=kw | {"max_new_tokens": 3}, long=kw | {"max_new_tokens": 6})
    assert set(sets) == {"short", "long"} and all(len(a) == len(records) for a in sets.values())
    assert all(long.startswith(short) for short, long in zip(sets["short"], sets["long"], strict=True))
    assert len(set(sets["long"])) > 1  # the answers differ by record, so a mixed-up order would show
    # in this process (`candidates.ray: false`): the same GenerateUDF on the same batches, so the same answers
    here = generate_answer_sets(records, short=kw | {"max_new_tokens": 3, "ray": False},
                                long=kw | {"max_new_tokens": 6, "ray": False})
    assert here == sets
