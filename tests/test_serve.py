"""The OpenAI-compatible Serve app: real Serve over HTTP on 127.0.0.1, the official openai client, tiny models.

The base is tiny-random with larger random weights (tiny-random's own greedy answer is "\\n" forever, which
would make every comparison pass), saved as a merged model folder; a random peft LoRA adapter on it
(`init_lora_weights=False`) is a second model id, and an adapter that names the embedded `tiny-random` base is
a third. Answers over HTTP are compared with the engine called directly in this process.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch
import yaml
from conftest import free_ports, save_random_lora, save_varied_model

from ksg_ray.common.config import KsgConfigError
from ksg_ray.engines import SamplingParams, prompt_ids
from ksg_ray.engines.transformers_engine import TransformersEngine
from ksg_ray.serve.config import AuthSection, ServeAppConfig, parse_app_config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sk-ksg-test-3f9a"
BODY_CAP = 16_000
MAX_TOKENS_CAP = 64
MAX_PROMPT_TOKENS = 200
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What helps with a mild fever?"}]
PROMPTS = ["hi", "What should I do about a cough that has lasted two weeks?", "2+2?", "Name a fruit.",
           "Explain compound interest in one sentence.", "Why is the sky blue?", "ok", "Tell me a short story."]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_path) -> dict[str, str]:
    """Model id -> dir: a merged folder, a LoRA adapter on it, and an adapter naming the embedded base."""
    out = tmp_path_factory.mktemp("serve-models")
    save_varied_model(tiny_model_path, out / "base")
    save_random_lora(str(out / "base"), out / "lora", seed=0)
    save_random_lora(tiny_model_path, out / "lora-embedded", seed=1)
    cfg_file = out / "lora-embedded" / "adapter_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"base_model_name_or_path": "tiny-random"}))
    return {"tiny-base": str(out / "base"), "tiny-lora": str(out / "lora"),
            "tiny-embedded-lora": str(out / "lora-embedded")}


@pytest.fixture(scope="module")
def direct(model_dirs) -> dict[str, TransformersEngine]:
    """The same models called directly, as the reference for answers over HTTP."""
    return {"tiny-base": TransformersEngine(model_dirs["tiny-base"]),
            "tiny-lora": TransformersEngine(model_dirs["tiny-base"], model_dirs["tiny-lora"])}


@pytest.fixture(scope="module")
def server(ray_cluster, model_dirs) -> str:
    """The app on its own port; Serve is shut down afterwards so the session's Ray stays usable."""
    from ray import serve

    from ksg_ray.serve.app import build_app
    from ksg_ray.serve.launch import start_serve

    (port,) = free_ports(1)
    start_serve("127.0.0.1", port)
    app = build_app({
        "models": model_dirs,
        "engine": {"kind": "transformers", "num_cpus": 1, "max_models_per_replica": 3},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
        "auth": {"token": TOKEN},
        "limits": {"max_tokens": MAX_TOKENS_CAP, "default_max_tokens": 8, "max_prompt_tokens": MAX_PROMPT_TOKENS,
                   "max_body_bytes": BODY_CAP, "max_choices": 4},
    })
    try:
        serve.run(app, name="ksg-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def greedy(engine: TransformersEngine, messages: list[dict], max_tokens: int):
    return engine.generate([messages], SamplingParams(max_new_tokens=max_tokens))[0][0]


# ---------------------------------------------------------------- the openai client, unchanged


def test_models_list_and_retrieve(client, model_dirs):
    assert {m.id for m in client.models.list().data} == set(model_dirs)
    assert client.models.retrieve("tiny-lora").id == "tiny-lora"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_answer_and_usage_match_the_engine(client, direct):
    resp = client.chat.completions.create(model="tiny-base", messages=ASK, max_tokens=12, temperature=0)
    ref = greedy(direct["tiny-base"], ASK, 12)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "tiny-base"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text and ref.text
    assert resp.choices[0].finish_reason == ("stop" if ref.finished else "length")
    assert resp.usage.prompt_tokens == len(prompt_ids(direct["tiny-base"].tokenizer, ASK))
    assert resp.usage.completion_tokens == ref.num_tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_server_timing_header_gives_the_engine_time_inside_the_request(server):
    """The ingress reports the engine's share (`Server-Timing: engine;dur=<ms>`): what the serving layer adds is
    the rest, measured in the replica's own process (bench/serve.py)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path, body in (("chat/completions", {"model": "tiny-base", "messages": ASK, "max_tokens": 8}),
                       ("completions", {"model": "tiny-base", "prompt": ["Hi", "Hello there"], "max_tokens": 8})):
        started = time.perf_counter()
        resp = requests.post(f"{server}/v1/{path}", json=body, headers=headers, timeout=120)
        elapsed_ms = (time.perf_counter() - started) * 1000
        assert resp.status_code == 200, resp.text
        timing = re.fullmatch(r"engine;dur=(\d+\.\d)", resp.headers["Server-Timing"])
        assert timing, resp.headers["Server-Timing"]
        assert 0 < float(timing.group(1)) < elapsed_ms


def test_chat_stream_is_the_same_answer_in_openai_chunks(client, server, direct):
    chunks = list(client.chat.completions.create(model="tiny-base", messages=ASK, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    ref = greedy(direct["tiny-base"], ASK, 12)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # pieces, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if ref.finished else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.num_tokens
    raw = requests.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"model": "tiny-base", "messages": ASK, "max_tokens": 4, "stream": True}, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")


def test_completions_ask_each_prompt_as_one_user_turn(client, direct):
    one = client.completions.create(model="tiny-base", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.choices[0].text == greedy(direct["tiny-base"], [{"role": "user", "content": PROMPTS[1]}], 10).text
    two = client.completions.create(model="tiny-base", prompt=PROMPTS[:2], max_tokens=10, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].text == one.choices[0].text
    streamed = client.completions.create(model="tiny-base", prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == one.choices[0].text


def test_adapter_is_selected_by_the_model_field(client, direct):
    def ask(model: str) -> str:
        resp = client.chat.completions.create(model=model, messages=ASK, max_tokens=12, temperature=0)
        return resp.choices[0].message.content

    base, adapted = ask("tiny-base"), ask("tiny-lora")
    assert base != adapted
    assert adapted == greedy(direct["tiny-lora"], ASK, 12).text
    assert isinstance(ask("tiny-embedded-lora"), str)  # an adapter naming the embedded base loads and answers


def test_the_proxy_and_replicas_run_with_the_fast_request_path(server):
    """`CONTROLLER_OPTIONS` reach Serve's HTTP proxy (the controller starts it with its own environment), so it
    sends requests over Serve's gRPC data plane rather than Ray actor calls; both replicas run our code on
    Serve's event loop (`REPLICA_ENV`). Together ~7 ms less per request here (README, Serve)."""
    import psutil
    import ray
    from ray._private import ray_constants

    from ksg_ray.serve.app import REPLICA_ENV

    node = ray._private.worker._global_node
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    envs: list[tuple[str, dict[str, str]]] = []  # (process title, environment) of this session's Ray workers
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            envs.append((" ".join(proc.cmdline()), proc.environ()))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # a worker that came and went meanwhile
            continue
    proxies = [env for title, env in envs if title.startswith("ray::ProxyActor")]
    replicas = [env for title, env in envs if title.startswith("ray::ServeReplica:ksg-test:")]
    assert proxies, "no Serve proxy found under this session's raylet"
    assert len(replicas) == 2, [title for title, _ in envs]  # the ingress and the model server
    assert all(env.get("RAY_SERVE_PROXY_USE_GRPC") == "1" for env in proxies)
    assert all(REPLICA_ENV.items() <= env.items() for env in replicas)


def test_concurrent_requests_are_batched_without_changing_answers(client, direct):
    def ask(prompt: str) -> str:
        return client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=10, temperature=0).choices[0].message.content

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == [greedy(direct["tiny-base"], [{"role": "user", "content": p}], 10).text for p in PROMPTS]


def test_sampling_with_a_seed_and_n(client):
    kw = dict(model="tiny-base", messages=ASK, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first, again = (client.chat.completions.create(**kw) for _ in range(2))
    assert first.choices[0].message.content == again.choices[0].message.content
    many = client.chat.completions.create(**kw | {"n": 3})
    assert [c.index for c in many.choices] == [0, 1, 2]


# ---------------------------------------------------------------- auth, errors, hostile input


def test_auth_missing_or_wrong_token_is_401_right_token_200(server):
    body = {"model": "tiny-base", "messages": ASK, "max_tokens": 2}
    url = f"{server}/v1/chat/completions"
    missing = requests.post(url, json=body, timeout=60)
    wrong = requests.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    right = requests.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["error"]["code"] == wrong.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{server}/v1/models", timeout=60).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert requests.get(f"{server}/health", timeout=60).json() == {"status": "ok"}  # probes need no token


def _hostile_requests() -> list[tuple[str, str, str, dict, bytes | None, int]]:
    """(what, method, path, headers, body, expected status): malformed, oversized, unauthorised, unknown."""
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    ok = {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def js(**changes) -> bytes:
        return json.dumps({k: v for k, v in (ok | changes).items() if v is not ...}).encode()

    chat = "/v1/chat/completions"
    cases = [
        ("truncated JSON", "POST", chat, auth, b'{"model": "tiny-base", "messages": [', 400),
        ("not JSON", "POST", chat, auth, b"hello there", 400),
        ("empty body", "POST", chat, auth, b"", 400),
        ("JSON array", "POST", chat, auth, b"[1, 2, 3]", 400),
        ("invalid UTF-8", "POST", chat, auth, b'{"model": "\xff\xfe"}', 400),
        ("deep nesting", "POST", chat, auth, b"[" * 5000 + b"]" * 5000, 400),
        ("NaN temperature", "POST", chat, auth, js()[:-1] + b', "temperature": NaN}', 400),
        ("huge max_tokens", "POST", chat, auth, js(max_tokens=10**9), 400),
        ("max_tokens over cap", "POST", chat, auth, js(max_tokens=MAX_TOKENS_CAP + 1), 400),
        ("negative max_tokens", "POST", chat, auth, js(max_tokens=-5), 400),
        ("max_tokens as string", "POST", chat, auth, js(max_tokens="16"), 400),
        ("n as bool", "POST", chat, auth, js(n=True), 400),
        ("n over cap", "POST", chat, auth, js(n=100), 400),
        ("stream with n=2", "POST", chat, auth, js(n=2, stream=True), 400),
        ("temperature as string", "POST", chat, auth, js(temperature="hot"), 400),
        ("top_p zero", "POST", chat, auth, js(top_p=0), 400),
        ("messages as string", "POST", chat, auth, js(messages="hi"), 400),
        ("empty messages", "POST", chat, auth, js(messages=[]), 400),
        ("null content", "POST", chat, auth, js(messages=[{"role": "user", "content": None}]), 400),
        ("unknown role", "POST", chat, auth, js(messages=[{"role": "robot", "content": "x"}]), 400),
        ("missing model", "POST", chat, auth, js(model=...), 400),
        ("model as number", "POST", chat, auth, js(model=7), 400),
        ("unknown field", "POST", chat, auth, js(frobnicate=1), 400),
        ("stop sequences", "POST", chat, auth, js(stop=["\n"]), 400),
        ("negative seed", "POST", chat, auth, js(seed=-1), 400),
        ("prompt over the token cap", "POST", chat, auth,
         js(messages=[{"role": "user", "content": "fever " * (MAX_PROMPT_TOKENS + 50)}]), 400),
        ("unknown model", "POST", chat, auth, js(model="gpt-4"), 404),
        ("missing token", "POST", chat, {"Content-Type": "application/json"}, js(), 401),
        ("wrong token", "POST", chat, {"Authorization": "Bearer sk-wrong"}, js(), 401),
        ("basic auth", "POST", chat, {"Authorization": f"Basic {TOKEN}"}, js(), 401),
        ("oversized body", "POST", chat, auth, js(messages=[{"role": "user", "content": "a" * BODY_CAP}]), 413),
        ("oversized completion", "POST", "/v1/completions", auth, json.dumps(
            {"model": "tiny-base", "prompt": "b" * (BODY_CAP * 2)}).encode(), 413),
        ("token-id prompt", "POST", "/v1/completions", auth, json.dumps(
            {"model": "tiny-base", "prompt": [1, 2, 3]}).encode(), 400),
        ("echo", "POST", "/v1/completions", auth, json.dumps(
            {"model": "tiny-base", "prompt": "x", "echo": True}).encode(), 400),
        ("GET on a POST route", "GET", chat, auth, None, 405),
        ("unknown route", "POST", "/v1/engines/davinci", auth, js(), 404),
    ]
    return cases


def test_hostile_requests_get_openai_errors_never_5xx(server, client):
    cases = _hostile_requests()
    schedule = [cases[i % len(cases)] for i in range(200)]

    def send(case):
        what, method, path, headers, body, expected = case
        resp = requests.request(method, f"{server}{path}", headers=headers, data=body, timeout=120)
        return what, expected, resp.status_code, resp.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, schedule))
    assert len(results) == 200
    wrong = [(what, expected, status) for what, expected, status, _ in results if status != expected]
    assert not wrong, wrong
    assert not [r for r in results if r[2] >= 500]
    for what, _, _, body in results:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], what
    # every replica is still up and answering
    resp = client.chat.completions.create(model="tiny-base", messages=ASK, max_tokens=4, temperature=0)
    assert resp.choices[0].message.content is not None
    assert requests.get(f"{server}/health", timeout=60).status_code == 200


def test_abandoned_streams_leave_the_server_answering(server, client):
    for _ in range(4):
        with requests.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"model": "tiny-base", "messages": ASK, "max_tokens": MAX_TOKENS_CAP, "stream": True},
                           stream=True, timeout=60) as resp:
            assert resp.status_code == 200
            assert next(resp.iter_lines()).startswith(b"data: ")  # one event, then the client hangs up
    resp = client.chat.completions.create(model="tiny-base", messages=ASK, max_tokens=4, temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_repeated_engine_failures_fail_the_health_check(model_dirs):
    """Serve replaces a replica whose `check_health` raises; three engine failures in a row mark it broken."""
    from ksg_ray.serve.app import ModelServer

    replica = ModelServer.func_or_class(parse_app_config({"models": model_dirs}))
    replica.check_health()
    for _ in range(2):
        replica._note_engine_failure(RuntimeError("out of memory"), engine=None)
    replica.check_health()  # a failure or two may be transient
    replica._note_engine_failure(RuntimeError("out of memory"), engine=None)
    with pytest.raises(RuntimeError, match="engine broken: RuntimeError: out of memory"):
        replica.check_health()


@pytest.mark.e2e
def test_sixteen_concurrent_clients_for_thirty_seconds_see_no_errors(server):
    stop_at = time.monotonic() + 30
    done, errors, lock = [0], [], threading.Lock()

    def client_loop(i: int) -> None:
        c = openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=120)
        k = 0
        while time.monotonic() < stop_at:
            model = "tiny-lora" if (i + k) % 3 == 0 else "tiny-base"
            messages = [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]
            try:
                if k % 4 == 3:
                    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                        model=model, messages=messages, max_tokens=8, stream=True) if ch.choices)
                else:
                    text = c.chat.completions.create(model=model, messages=messages, max_tokens=8).choices[0] \
                        .message.content
                assert isinstance(text, str)
                with lock:
                    done[0] += 1
            except Exception as e:  # every failure counts; none is expected
                with lock:
                    errors.append(f"client {i}: {type(e).__name__}: {e}")
            k += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"16 clients, 30 s: {done[0]} requests answered, {len(errors)} errors")
    assert errors == [], errors[:5]
    assert done[0] >= 16


# ---------------------------------------------------------------- config (no Ray)


def test_config_reports_every_problem_at_once():
    with pytest.raises(KsgConfigError) as err:
        parse_app_config({"models": {"bad id!": "x"}, "autoscaling": {"min_replicas": 3, "max_replicas": 1},
                          "limits": {"max_tokens": 0}, "bogus": 1})
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 4 and "models" in text and "max_replicas" in text and "bogus" in text
    with pytest.raises(KsgConfigError, match="not a directory"):
        parse_app_config({"models": {"m": "/no/such/dir"}}).check_model_dirs()


def test_token_from_env_and_refusal_to_start_open(monkeypatch):
    assert AuthSection().resolve_token() is None
    monkeypatch.setenv("KSG_TEST_TOKEN", "abc")
    assert AuthSection(token_env="KSG_TEST_TOKEN").resolve_token() == "abc"
    monkeypatch.delenv("KSG_TEST_TOKEN")
    with pytest.raises(RuntimeError, match="KSG_TEST_TOKEN"):
        AuthSection(token_env="KSG_TEST_TOKEN").resolve_token()
    assert "abc" not in repr(AuthSection(token="abc"))


def test_serve_config_file_is_a_valid_serve_config_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    from ksg_ray.serve.launch import CONTROLLER_OPTIONS

    data = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(data)
    assert data["controller_options"] == CONTROLLER_OPTIONS  # `serve run` gets what `ksg serve` gets
    app = next(a for a in data["applications"] if a["import_path"] == "ksg_ray.serve.app:build_app")
    assert isinstance(parse_app_config(app["args"]), ServeAppConfig)


def test_ksg_serve_arguments_build_the_app_config(model_dirs):
    from ksg_ray.serve.launch import add_serve_args, app_config_from_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args([model_dirs["tiny-lora"], "models.base=tiny-random", "auth.token_env=null",
                              "limits.max_tokens=32", "limits.default_max_tokens=16",
                              "--port", "8123", "--config", str(ROOT / "serve/config.yaml")])
    cfg = app_config_from_args(args)
    assert cfg.models["ksg-distilled"] == model_dirs["tiny-lora"] and cfg.models["base"] == "tiny-random"
    assert cfg.limits.max_tokens == 32 and not cfg.auth.enabled and args.port == 8123
    assert cfg.engine.kind == "transformers"
    args = parser.parse_args([model_dirs["tiny-lora"], "auth.token_env=null", "--engine", "vllm"])
    assert app_config_from_args(args).engine.kind == "vllm"


def test_a_lone_client_never_waits_for_a_batch_but_several_do():
    from ksg_ray.serve.model_server import LoadGauge

    gauge = LoadGauge(wait_s=0.1, cycle_s=2.0)
    lone = [gauge.arrived(now=t) for t in (0.0, 2.2, 4.4, 6.6)]  # one client, one request per answer
    assert lone == [False] * 4
    crowd = LoadGauge(wait_s=0.1, cycle_s=2.0)
    first = [crowd.arrived(now=0.001 * k) for k in range(16)]  # 16 clients at once
    assert first[:2] == [False, False] and all(first[2:])
    again = [crowd.arrived(now=2.2 + 0.001 * k) for k in range(16)]  # their next requests, one cycle later
    assert all(again)
    assert crowd.arrived(2, now=100.0)  # one request with several prompts batches them
