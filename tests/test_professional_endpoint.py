"""The professional model behind an OpenAI-compatible endpoint (`professional.endpoint`), tested against our own
Serve app on 127.0.0.1 serving SmolLM2: answers, the judge's Yes/No, a wrong token or model failing at start, and
a synthesis run whose professional answers come over HTTP."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import free_ports

from ksg_ray.engines import SamplingParams, build_engine

TOKEN_ENV = "KSG_TEST_PROFESSIONAL_TOKEN"
TOKEN = "pro-secret"


@pytest.fixture(scope="module")
def endpoint(ray_cluster, smollm2_path):
    """SmolLM2 on Serve (1 CPU, auth); Serve is shut down afterwards so the session's Ray stays usable."""
    from ray import serve

    from ksg_ray.serve.app import build_app
    from ksg_ray.serve.launch import start_serve

    (port,) = free_ports(1)
    start_serve("127.0.0.1", port)
    app = build_app({"models": {"pro": smollm2_path},
                     "engine": {"kind": "transformers", "num_cpus": 1, "max_models_per_replica": 1},
                     "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
                     "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
                     "auth": {"token": TOKEN}})
    try:
        serve.run(app, name="ksg-professional", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


def test_the_endpoint_engine_answers_judges_and_fails_fast_on_a_wrong_endpoint(endpoint, token, monkeypatch):
    engine = build_engine("openai", "pro", base_url=endpoint, api_key_env=TOKEN_ENV, max_concurrency=4)
    prompts = [[{"role": "user", "content": f"Name one symptom of flu ({i})."}] for i in range(3)]
    out = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=16, n=2), seeds=[1, 2, 3])
    assert [len(g) for g in out] == [2, 2, 2] and all(x.text and x.num_tokens > 0 for g in out for x in g)
    again = engine.generate(prompts, SamplingParams(temperature=0.7, max_new_tokens=16, n=2), seeds=[1, 2, 3])
    assert [[x.text for x in g] for g in again] == [[x.text for x in g] for g in out]  # seeded per row
    one_word = {"role": "system", "content": "Answer with one word: Yes or No."}  # SmolLM2's greedy replies:
    said = engine.yes_probability([[one_word, {"role": "user", "content": "Say Yes."}],  # "Yes."
                                   [one_word, {"role": "user", "content": "Is the sun cold?"}]])  # "No. The sun"
    assert said == [1.0, 0.0]
    with pytest.raises(ValueError, match="neither Yes nor No"):
        engine.yes_probability([[{"role": "user", "content": "Write the word banana."}]])
    with pytest.raises(NotImplementedError, match="local models"):
        engine.score(prompts[:1], ["x"])

    monkeypatch.setenv(TOKEN_ENV, "wrong")
    with pytest.raises(openai.AuthenticationError):
        build_engine("openai", "pro", base_url=endpoint, api_key_env=TOKEN_ENV)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with pytest.raises(openai.NotFoundError):
        build_engine("openai", "no-such-model", base_url=endpoint, api_key_env=TOKEN_ENV)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ValueError, match=f"{TOKEN_ENV} is not set"):
        build_engine("openai", "pro", base_url=endpoint, api_key_env=TOKEN_ENV)


@pytest.mark.e2e
def test_synthesis_asks_the_professional_over_http(endpoint, token, client_bundle, tmp_path):
    from test_synthesis import TINY_SYNTH

    from ksg_ray.jobs import synthesize

    tmp, _, _ = client_bundle
    pro = f"{{base_url: {endpoint}, model: pro, api_key_env: {TOKEN_ENV}, max_concurrency: 4}}"
    summary = synthesize.main(TINY_SYNTH + [f"bundle={tmp / 'bundle'}", f"run.output_dir={tmp_path}",
                                            f"professional.endpoint={pro}", "professional.filter=false",
                                            "refine.rounds=0", "answers.max_new_tokens=16"])
    assert summary["failed_rows"] == 0 and summary["models"]["professional"] == f"pro@{endpoint}"
    rows = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").read_text().splitlines()]
    assert rows and all(r["answer_model"] == f"pro@{endpoint}" for r in rows)
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert all(s["candidates_reward"] for s in scored if s["candidates"])  # scored locally by the reward model
