"""The synthesis pipeline: its pure parts (ranking, pool rule, stores, dedup, PII, query parsing), its stage
UDFs driven with dict batches, and the whole job on a real client bundle over a local Ray cluster — with the
client's private file gone, a rerun that adds nothing, and a stage actor killed mid-run."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest
from conftest import my_processes, private_data_moved_away

from ksg_ray.common.config import KsgConfigError, load_config
from ksg_ray.server.synth.config import SynthConfig
from ksg_ray.server.synth.dedup import near_duplicates, similar_to_any
from ksg_ray.server.synth.pii import PIIScrubber
from ksg_ray.server.synth.pipeline import refine_queries
from ksg_ray.server.synth.prompts import parse_query, query_messages
from ksg_ray.server.synth.reward_filter import average_ranks, best_rewrite, combined_ranks, keep_top, positive_negative
from ksg_ray.server.synth.store import JsonlStore

# --- pure parts ------------------------------------------------------------------------------------------


def test_ranks_share_ties_and_combine_reward_with_perplexity():
    assert average_ranks([0.1, 0.9, 0.9, 0.5], higher_is_better=True) == [4, 1.5, 1.5, 3]
    # candidate 0: best reward, worst perplexity; candidate 2: second on both
    rewards, logprobs = [3.0, 1.0, 2.0], [-4.0, -1.0, -2.0]
    assert combined_ranks(rewards, logprobs, alpha=1.0) == [1, 3, 2]
    assert combined_ranks(rewards, logprobs, alpha=0.0) == [3, 1, 2]
    assert combined_ranks(rewards, logprobs, alpha=0.5) == [2, 2, 2]
    assert positive_negative(rewards, logprobs, alpha=0.5) == (0, 1)  # tie on rank: higher reward first
    assert positive_negative([1.0, 2.0], [None, -1.0], alpha=0.5) == (1, 0)  # no log-prob ranks last
    with pytest.raises(ValueError, match="at least one"):
        positive_negative([], [], 0.5)


def test_keep_top_fraction_and_the_refinement_pool_rule():
    rewards = {f"q{i}": float(i) for i in range(16)}
    assert keep_top(rewards, 0.125) == ["q15", "q14"]
    assert keep_top({"a": 1.0}, 0.125) == ["a"]  # never empty
    assert best_rewrite([0.1, 0.7, 0.9], [True, True, False], pool_min=0.5) == 1  # unfinished never kept
    assert best_rewrite([0.1, 0.4], [True, True], pool_min=0.5) is None


def test_refinement_takes_every_query_or_a_fixed_sample_of_max_queries():
    candidates = {f"q{i}": ([{"text": "a"}] if i % 4 else []) for i in range(40)}  # every 4th has no candidate
    with_candidates = [q for q, c in candidates.items() if c]
    assert refine_queries(candidates, None, 0, 1) == with_candidates
    assert refine_queries(candidates, 30, 0, 1) == with_candidates  # fewer than the cap: all of them
    sample = refine_queries(candidates, 8, 0, 1)
    assert len(sample) == 8 and set(sample) <= set(with_candidates)
    assert sample == [q for q in with_candidates if q in sample]  # in the candidates' order
    assert refine_queries(dict(reversed(candidates.items())), 8, 0, 1)[::-1] == sample  # the order does not pick
    assert refine_queries(candidates, 8, 0, 2) != sample and refine_queries(candidates, 8, 1, 1) != sample


def test_a_run_stored_before_max_queries_resumes_as_every_query(tmp_path):
    from ksg_ray.server.synth.pipeline import _check_same_run

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()

    def cfg(*extra: str) -> SynthConfig:
        return load_config(SynthConfig, "configs/synthesize.yaml", [f"bundle={tmp_path / 'bundle'}", *extra])

    _check_same_run(cfg(), out)
    stored = json.loads((out / "synth_run.json").read_text())
    del stored["refine"]["max_queries"]  # as written before the field existed
    (out / "synth_run.json").write_text(json.dumps(stored))
    _check_same_run(cfg(), out)  # None = every query, as that run refined
    with pytest.raises(ValueError, match=r"other settings \(refine changed\)"):
        _check_same_run(cfg("refine.max_queries=16"), out)


def test_store_refuses_duplicates_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "s.jsonl"
    with JsonlStore(path) as store:
        assert store.append({"id": "a", "x": 1}) and store.append({"id": "b", "x": 2})
        assert not store.append({"id": "a", "x": 3}) and store.refused == 1
    with path.open("a") as f:
        f.write('{"id": "c", "x"')  # the process died mid-line
    store = JsonlStore(path)
    assert set(store.rows) == {"a", "b"} and store.rows["a"]["x"] == 1
    assert store.append({"id": "c", "x": 4})
    store.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:2: not valid JSON"):
        JsonlStore(path)


@pytest.mark.parametrize("method", ["tfidf", "rouge_l", "embedding"])
def test_near_duplicates_keep_the_first_of_each_group(method):
    texts = ["How do I lower my blood pressure without medicine?",
             "how do i lower my blood pressure without medicine",  # exact after normalising
             "How can I lower my blood pressure without any medicine?",
             "What are the tax rules for a Roth IRA withdrawal?"]
    dropped = near_duplicates(texts, method, threshold=0.6)
    assert dropped[1] == 0 and dropped.get(2) == 0 and 3 not in dropped and 0 not in dropped


def test_seed_similarity_flags_copies_only():
    sims = similar_to_any(["What is the difference between a cold and the flu?", "How do bonds pay interest?"],
                          ["What is the difference between a cold and the flu?"], "tfidf", 0.52)
    assert sims[0] == pytest.approx(1.0) and sims[1] is None


def test_a_patient_description_is_a_query_without_a_question_mark():
    text = "Here is a new medical question: I have had knee pain for two weeks after running. It is worse on stairs."
    assert parse_query(text, 3, require_question=False) == (
        "I have had knee pain for two weeks after running. It is worse on stairs.", None)
    assert parse_query("My son has a rash and a fever. What could it be? I hope this helps.", 3,
                       require_question=False) == ("My son has a rash and a fever. What could it be?", None)
    assert parse_query("<|im_start|>user I have a cough", 3, require_question=False)[1] == "copies prompt markup"
    assert SynthConfig().queries.require_question is False


def test_a_sampled_message_keeps_its_opening_and_first_sentences():
    from ksg_ray.server.synth.prompts import first_sentences, join_prefix, sample_query_messages

    assert join_prefix("Hi doctor, my son has", "a fever. He is 5.") == "Hi doctor, my son has a fever. He is 5."
    assert join_prefix("Hi, I", ", too, have a cough.") == "Hi, I, too, have a cough."
    assert first_sentences("A rash. It itches! Is it bad? I am running for mayor.", 2) == "A rash. It itches!"
    assert first_sentences("One. Two.", None) == "One. Two."
    assert sample_query_messages("Sys", "Hi doctor,")[-1] == {"role": "user", "content": "Hi doctor,",
                                                              "continue": True}


def test_an_answer_cut_at_the_budget_is_trimmed_to_its_last_sentence():
    from ksg_ray.common.chat_format import trim_to_sentence
    from ksg_ray.server.synth.pipeline import _merge_candidates

    assert trim_to_sentence("Rest the knee. Ice it twice a day. If it swells, see a") == \
        "Rest the knee. Ice it twice a day."
    assert trim_to_sentence("no sentence ends here") == "no sentence ends here"  # kept, not rejected
    batch = {"query": ["My knee hurts. What should I do?"], "answers_p": [["Rest it. Then se", "no end", "Done.", " "]],
             "answers_p_finished": [[False, False, True, False]]}
    kept = _merge_candidates(dict(batch), ["p"], require_finished=False)
    assert kept["candidates"] == [["Rest it.", "no end", "Done."]] and kept["unfinished_dropped"] == [1]
    strict = _merge_candidates(dict(batch), ["p"], require_finished=True)
    assert strict["candidates"] == [["Done."]] and strict["unfinished_dropped"] == [3]


def test_answer_filters_drop_candidates_with_their_reason():
    from ksg_ray.server.synth.filters import DegenerateTextFilter, LanguageFilter, OffQuestionFilter
    from ksg_ray.server.synth.pipeline import _merge_candidates

    loop = "Drink water and rest well. Drink water and rest well. Drink water and rest well."
    good = "Rest the knee, put ice on it and keep it raised; see a doctor if it swells."
    batch = {"query": ["I twisted my knee playing football and it hurts. What should I do?"],
             "answers_p": [["Ho mal di testa da tre giorni e non riesco a dormire bene.", loop,
                            "Follow the next-of-kin rules when you're in court.", good]],
             "answers_p_finished": [[True, True, True, True]]}
    out = _merge_candidates(batch, ["p"], require_finished=True,
                            filters=(LanguageFilter(), DegenerateTextFilter(1), OffQuestionFilter(0.3)))
    assert out["candidates"] == [[good]]  # judged against the row's own query
    assert [r.split(":")[0] for r in out["candidates_rejected"][0]] == ["language", "degenerate", "off question"]


def test_query_samples_are_shared_only_from_a_run_that_drew_them_alike(tmp_path):
    from ksg_ray.server.synth.pipeline import _check_same_run, _share_queries

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"components": {}}')
    src = tmp_path / "pipeline"
    src.mkdir()
    _check_same_run(SynthConfig(bundle=bundle, queries={"mode": "sample", "num_prompts": 3}), src)
    rows = [{"prompt_id": f"p{i:05d}", "user_prefix": "", "samples": [f"sample {i}"], "samples_finished": [True]}
            for i in range(3)]
    raw = "".join(json.dumps(r) + "\n" for r in rows) + '{"prompt_id": "p00003", "sam'  # still being written
    (src / "queries_raw.jsonl").write_text(raw)

    def shared(out: str, **queries) -> dict:
        cfg = SynthConfig(bundle=bundle, queries={"mode": "sample", "num_prompts": 2, "share_from": src, **queries})
        (tmp_path / out).mkdir()
        _check_same_run(cfg, tmp_path / out)
        with JsonlStore(tmp_path / out / "queries_raw.jsonl", key="prompt_id") as store:
            _share_queries(cfg, store, tmp_path / out)
        return store.rows

    # what turns samples into queries may differ (min_words); only this run's prompts are copied
    assert shared("variant", min_words=5) == {r["prompt_id"]: r for r in rows[:2]}
    assert (src / "queries_raw.jsonl").read_text() == raw  # the other run's file is only read
    assert shared("other_temperature", temperature=0.5) == {}
    assert shared("other_mode", mode="seed_prompt") == {}
    assert shared("nothing_there", share_from=tmp_path / "missing") == {}


def test_too_few_rows_names_the_step_that_lost_them(tmp_path):
    from ksg_ray.server.synth.pipeline import TooFewRows

    funnel = [("prompts", 8), ("query samples generated", 40), ("unique well-formed queries", 30),
              ("passed the professional filter", 4), ("written", 3)]
    err = TooFewRows(tmp_path, 3, 32, funnel, {"judge said no": 26, "too short": 5}, 0)
    msg = str(err)
    assert "3 rows < min_rows=32" in msg and "'passed the professional filter' (30 -> 4)" in msg
    assert "judge said no: 26" in msg and str(tmp_path / "synthetic.jsonl") in msg


def test_pii_scrub_redacts_and_counts():
    scrub = PIIScrubber(SynthConfig().dedup.pii_patterns)
    text, n = scrub("Mail jane.doe@example.com or call 555-123-4567; SSN 123-45-6789. Dose 500 mg.")
    assert n == 3 and "example.com" not in text and "[REDACTED:email]" in text and "500 mg" in text
    assert scrub.counts == {"email": 1, "phone": 1, "ssn": 1, "credit_card": 0, "iban": 0}


def test_query_parsing_keeps_the_question_and_rejects_markup_and_fragments():
    assert parse_query('Question: "Is a fever of 38.5 dangerous for a child?"\n\nYes, if...', 3) == (
        "Is a fever of 38.5 dangerous for a child?", None)
    assert parse_query("Here's a new medical question: How does a doctor find a virus? I hope it helps.", 3) == (
        "How does a doctor find a virus?", None)
    assert parse_query('I think so. A question: "Are there risks of eating garlic?', 3)[0] == (
        "Are there risks of eating garlic?")
    assert parse_query("My knee hurts when I run, what should I do", 3) == (None, "not a question (no '?')")
    assert parse_query("My knee hurts when I run, what should I do", 3, require_question=False)[1] is None
    assert parse_query("Example question 3: copied?", 3) == (None, "copies prompt markup")
    assert parse_query("assistant: hi there friend?", 3)[1] == "copies prompt markup"
    assert parse_query("Why?", 3) == (None, "too short")
    assert parse_query("  ", 1, require_question=False) == (None, "empty")


def test_prompts_are_deterministic_and_use_only_public_seeds():
    domain = SynthConfig().domain.model_copy(update={"seed_questions": ["Seed one here?", "Seed two here?",
                                                                         "Seed three here?"]})
    a, b = query_messages(domain, 4, 2, seed=0), query_messages(domain, 4, 2, seed=0)
    assert a == b and sum(s in a[1]["content"] for s in domain.seed_questions) == 2
    seedless = query_messages(domain.model_copy(update={"seed_questions": []}), 0, 2, seed=0)
    assert "Example" not in seedless[1]["content"]


def test_synth_config_has_no_place_for_private_data():
    with pytest.raises(KsgConfigError, match="data"):
        load_config(SynthConfig, overrides=["data.path=../shared/data/medical/train.jsonl"])
    with pytest.raises(KsgConfigError, match="max_actors"):
        load_config(SynthConfig, overrides=["engine.min_actors=2", "engine.max_actors=1"])


# --- stage UDFs on dict batches (no cluster) ---------------------------------------------------------------


def test_judge_udf_gives_a_probability_and_skips_rows_without_work(tiny_model_path):
    from ksg_ray.server.synth.judge_stage import JudgeUDF
    from ksg_ray.server.synth.prompts import judge_messages

    udf = JudgeUDF("transformers", tiny_model_path, min_yes_probability=0.5)
    domain = SynthConfig().domain
    batch = {"judge_messages": np.array([judge_messages(domain, "Is it a cold?"), None,
                                         judge_messages(domain, "Is it the flu?")], dtype=object),
             "__error__": np.array([None, None, "RuntimeError: earlier stage"], dtype=object)}
    out = udf(batch)
    p = out["judge_yes_probability"]
    assert 0 < p[0] < 1 and p[1] is None and p[2] is None
    assert out["judge_pass"][0] == (p[0] >= 0.5) and out["__error__"][2] == "RuntimeError: earlier stage"


# --- the whole job on a real client bundle ----------------------------------------------------------------

def test_stage_actors_use_the_configured_threads(ray_cluster):
    """Ray gives an actor floor(num_cpus) >= 1 threads; `engine.threads` lets a 0.5-CPU actor use both cores."""
    import ray

    from ksg_ray.server.synth.config import EngineSection
    from ksg_ray.server.synth.pipeline import Step, _apply

    class TorchThreads:  # defined here so Ray pickles it by value (workers cannot import this test module)
        """Reports the torch thread count of the actor it runs in (the engine arguments are ignored)."""

        def __init__(self, **_: object) -> None:
            import torch

            self.threads = torch.get_num_threads()

        def __call__(self, batch: dict) -> dict:
            return {"threads": np.full(len(batch["id"]), self.threads)}

    def threads(**engine) -> set[int]:
        ds = _apply(ray.data.range(4), [Step(TorchThreads, {}, actor=True)], EngineSection(num_cpus=0.5, **engine))
        return {int(t) for t in ds.to_pandas()["threads"]}

    assert threads() == {1}
    assert threads(threads=2) == {2}


TINY_SYNTH = ["professional.model=tiny-random", "queries.num_prompts=4", "queries.per_prompt=2",
              "queries.max_new_tokens=12", "queries.min_words=1", "queries.require_finished=false",
              "queries.require_question=false",
              "professional.min_yes_probability=0.3", "answers.n=2", "answers.max_new_tokens=8",
              "answers.require_finished=false", "scoring.keep_fraction=0.5", "refine.rounds=1", "refine.n=2",
              "refine.critique_max_new_tokens=8", "refine.max_new_tokens=8", "engine.batch_size=2",
              "filters.language=false", "filters.degenerate=false",  # a random model writes no language,
              "filters.off_question=false"]  # nor answers a question


# The funnel's stages under TINY_SYNTH, names without their measured values ("... (reward >= pool min -0.3)"):
# the transformers run below must show them, and so must the vLLM run in test_vllm_stage (the same funnel shape).
TINY_FUNNEL = ["prompts", "query samples generated", "unique well-formed queries",
               "not copies of a seed (tfidf < 0.52)", "passed the professional filter", "finished answer candidates",
               "queries with a scored candidate", "kept by reward-guided filtering (top 0.5)",
               "refine round 1: queries refined", "refine round 1: finished rewrites", "refine round 1: rewrites kept",
               "pool after round 1",
               "after duplicate removal (tfidf < 0.9)", "PII redactions", "written"]


def funnel_stages(summary: dict) -> list[str]:
    return [re.sub(r" \(reward >= .*\)$", "", name) for name, _ in summary["funnel"]]


def _synth(bundle, out, *extra):
    from ksg_ray.jobs import synthesize

    return synthesize.main(TINY_SYNTH + [f"bundle={bundle}", f"run.output_dir={out}", *extra])


@pytest.mark.e2e
def test_synthesis_runs_from_the_bundle_alone_and_a_rerun_adds_nothing(client_bundle, tmp_path):
    tmp, _, _ = client_bundle
    fused = "engine.fuse_steps=true"  # as configs/synthesize.yaml runs on a CPU; the field's default is false
    with private_data_moved_away(tmp):  # the server never has the client's data
        summary = _synth(tmp / "bundle", tmp_path, fused)
    funnel = dict(summary["funnel"])
    assert funnel_stages(summary) == TINY_FUNNEL
    assert funnel["prompts"] == 4 and funnel["query samples generated"] == 8
    counts = [c for name, c in summary["funnel"] if name != "PII redactions"]
    assert counts[1:5] == sorted(counts[1:5], reverse=True)  # each filter only removes
    assert funnel["refine round 1: queries refined"] == funnel["queries with a scored candidate"]  # no max_queries
    assert summary["failed_rows"] == 0 and summary["duplicates_refused"] == 0
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert funnel["unique well-formed queries"] + sum(1 for r in rejected if "sample" in r and "id" not in r) == 8
    rows = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == funnel["written"] >= 1
    assert {"instruction", "input", "output", "id", "round", "stage", "reward", "perplexity", "answer_model",
            "generator_model", "reward_model"} <= set(rows[0])
    assert len({r["id"] for r in rows}) == len(rows)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "synthetic.parquet").num_rows == len(rows)
    # the same (default) seed and the same bundle give the same funnel and the same rows in a fresh directory,
    # also with one actor pool per step instead of each phase's steps fused into one actor (engine.fuse_steps)
    unfused = _synth(tmp / "bundle", tmp_path / "unfused", "engine.fuse_steps=false")
    assert unfused["funnel"] == summary["funnel"]
    assert (tmp_path / "unfused" / "synthetic.jsonl").read_text() == (tmp_path / "synthetic.jsonl").read_text()
    from ksg_ray.common.records import load_records

    assert len(load_records(tmp_path / "synthetic.jsonl")) == len(rows)  # trainable as is
    assert json.loads((tmp_path / "funnel.json").read_text())["funnel"] == [list(x) for x in summary["funnel"]]

    stores = {p.name: p.read_text() for p in tmp_path.glob("*.jsonl") if p.name not in ("rejected.jsonl",)}
    again = _synth(tmp / "bundle", tmp_path, fused, "min_rows=0")  # a check of the output, not a setting of the work
    assert again["funnel"] == summary["funnel"] and again["duplicates_refused"] == 0
    assert {p.name: p.read_text() for p in tmp_path.glob("*.jsonl") if p.name != "rejected.jsonl"} == stores
    with pytest.raises(ValueError, match=r"other settings \(answers changed\)"):
        _synth(tmp / "bundle", tmp_path, fused, "answers.n=3")


def _kill_first(pattern: str, ready, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first of this test's Ray actor processes whose command line holds `pattern`, once `ready()`
    holds."""
    while not stop.is_set() and not killed:
        if ready():
            for proc in my_processes(pattern):
                proc.kill()
                killed.append(proc.pid)
                return
        time.sleep(0.05)


@pytest.mark.e2e
def test_killing_a_stage_actor_mid_run_loses_and_duplicates_nothing(client_bundle, tmp_path):
    tmp, _, _ = client_bundle
    scored = tmp_path / "scored.jsonl"
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_first, args=("ScoreUDF", lambda: scored.exists() and
                                                         scored.stat().st_size > 0, stop, killed), daemon=True)
    watcher.start()
    extra = ["queries.num_prompts=10", "refine.rounds=0"]
    try:
        summary = _synth(tmp / "bundle", tmp_path, *extra)
    except Exception as e:  # Ray Data gave up on the stage: the rerun below must finish the job
        summary = None
        print(f"run died after the kill ({type(e).__name__}); resuming")
    finally:
        stop.set()
        watcher.join()
    assert killed, "the ScoreUDF actor was never seen running"
    if summary is None or summary["failed_rows"]:
        summary = _synth(tmp / "bundle", tmp_path, *extra)
    raw = [json.loads(line)["prompt_id"] for line in (tmp_path / "queries_raw.jsonl").read_text().splitlines()]
    assert sorted(raw) == [f"p{i:05d}" for i in range(10)]
    queried = dict(summary["funnel"])["not copies of a seed (tfidf < 0.52)"]
    answered = [json.loads(line)["id"] for line in scored.read_text().splitlines()]
    assert len(answered) == len(set(answered)) == queried  # every query exactly once
    assert summary["failed_rows"] == 0 and summary["duplicates_refused"] == 0
