"""`ksg pipeline` as users run it on a cluster: a Ray head started with `ray start --head` on 127.0.0.1, the
pipeline submitted with `ray job submit --working-dir .` at its smallest settings (tiny models), and the
distilled model it deploys on Serve answering through the official `openai` client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest
from conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")  # the CLI of the Ray these tests import
TINY_DP = ["model.name=tiny-random", "data.max_seq_len=96", "train.expected_batch_size=4", "train.max_steps=2",
           "scaling.num_workers=0", "privacy.delta=1e-3"]  # Ray Train's local mode, as the embedded default
TINY = {
    "dp_train.overrides": TINY_DP,
    "dp_reward.overrides": TINY_DP + ["candidates.max_new_tokens=8", "privacy.total_epsilon_budget=40"],
    "synthesize.overrides": ["professional.model=tiny-random", "queries.num_prompts=3", "queries.per_prompt=3",
                             "queries.max_new_tokens=12", "queries.min_words=1", "queries.require_question=false",
                             "queries.require_finished=false", "professional.filter=false", "answers.n=2",
                             "answers.max_new_tokens=8", "answers.require_finished=false", "refine.n=2",
                             "refine.critique_max_new_tokens=8", "refine.max_new_tokens=8", "engine.batch_size=4",
                             "filters.language=false", "filters.degenerate=false", "filters.domain=false",
                             "filters.off_question=false"],
    "finetune.overrides": ["model.name=tiny-random", "train.epochs=1", "dev.limit=2", "dev.max_new_tokens=4",
                           "data.max_seq_len=96", "scaling.num_workers=0"],
    "evaluate.overrides": ["data.limit=4", "data.max_new_tokens=8", "audit.limit=4", "audit.max_new_tokens=4",
                           "engine.ray=false", "judge.model=null"],
}
BINARY = {".safetensors", ".png", ".parquet", ".bin", ".pt", ".pkl", ".lock"}


def private_text_outside_client(run_dir: Path, records: list, min_len: int = 40) -> list[str]:
    """Files outside `client/` that share a substring of >= `min_len` characters with a record's question or
    answer. Any such window contains one of the text's aligned blocks of min_len // 2 characters, so each block
    found is extended both ways to measure the shared run."""
    block = min_len // 2
    texts = [t for r in records for t in (r.input, r.output) if len(t) >= min_len]
    found = []
    for path in run_dir.rglob("*"):
        if not path.is_file() or "client" in path.relative_to(run_dir).parts or path.suffix in BINARY:
            continue
        content = path.read_text(errors="ignore")
        for text in texts:
            for start in range(0, len(text) - block + 1, block):
                at = content.find(text[start:start + block])
                while at >= 0:
                    left = 0
                    while left < start and at - left > 0 and content[at - left - 1] == text[start - left - 1]:
                        left += 1
                    right = block
                    while start + right < len(text) and at + right < len(content) and \
                            content[at + right] == text[start + right]:
                        right += 1
                    if left + right >= min_len:
                        found.append(f"{path.relative_to(run_dir)}: {text[start - left:start + right][:60]!r}")
                        break
                    at = content.find(text[start:start + block], at + 1)
    return found


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def test_free_ports_never_repeat():
    """A node's ports and its cluster's GCS and dashboard ports are chosen in separate calls: none may repeat
    (CI once failed `ray start` on two equal ports)."""
    ports = free_ports(8) + free_ports(2) + [p for _ in range(20) for p in free_ports(1)]
    assert len(set(ports)) == len(ports) == 30


@pytest.fixture
def ray_head():
    """A Ray head of its own (the session cluster of the other tests is shut down around it: one cluster at a
    time on this machine), stopped afterwards."""
    import ray
    from conftest import init_local_ray, start_cli_node, stop_cli_cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    gcs, dashboard = free_ports(2)
    temp_dir = tempfile.mkdtemp(prefix="ksg-ray-")  # short: Ray's socket paths live under it
    try:
        start_cli_node(temp_dir, "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_cli_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if was_up:
            init_local_ray()


@pytest.mark.e2e
def test_pipeline_submitted_as_a_ray_job_serves_a_model_the_openai_client_can_ask(ray_head, tmp_path):
    (port,) = free_ports(1)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "held_out=4", "canaries.fraction=0", "rounds=0", "baselines=[pipeline]",
                 "stages=[dp_train, dp_reward, synthesize, finetune, evaluate, report, serve]", f"serve.port={port}"]
    overrides += [f"{k}={_yaml_list(v)}" for k, v in TINY.items()]
    runtime_env = {"working_dir": str(ROOT),
                   "env_vars": {k: os.environ[k] for k in ("KSG_CACHE", "HF_HUB_OFFLINE", "RAY_AUTH_MODE",
                                                           "TORCH_EXTENSIONS_DIR", "KSG_LEDGER_DIR")
                                if k in os.environ}}  # KSG_LEDGER_DIR: this test's own client ledger
    job = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head,
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/pipeline.py", "--config", "configs/pipeline.yaml", *overrides],
        capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    print(job.stdout[-4000:], job.stderr[-2000:])
    assert job.returncode == 0, job.stderr[-2000:]
    assert "pipeline stage wall times" in job.stdout and "serving 'ksg-distilled'" in job.stdout
    summary = json.loads((run_dir / "pipeline_summary.json").read_text())
    assert {"dp_train", "dp_reward", "synthesize round 0", "finetune round 0", "serve"} <= set(summary["stage_seconds"])
    card = (Path(summary["model_dir"]) / "README.md").read_text()  # the exported model's card
    assert "base_model: tiny-random" in card and "-DP with respect to the client's records" in card
    assert "| answer_loss |" in card

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list().data] == ["ksg-distilled"]
    reply = client.chat.completions.create(model="ksg-distilled", max_tokens=8,
                                           messages=[{"role": "user", "content": "Is a mild fever dangerous?"}])
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1

    # the finished run scored again on another test set, as a client does with its own split
    rescore = subprocess.run([sys.executable, "-m", "ksg_ray.cli", "eval-run", str(run_dir),
                              f"data.path={run_dir / 'client' / 'held_out.jsonl'}", "data.limit=2", "name=mine"],
                             capture_output=True, text=True, timeout=600)
    assert rescore.returncode == 0, rescore.stderr[-2000:]
    header, row = rescore.stdout.splitlines()[-2:]
    assert header.split()[:4] == ["method", "ε", "n", "answer_loss"]
    assert row.split()[0] == "pipeline" and row.split()[2] == "2"
    assert json.loads((run_dir / "eval-mine" / "pipeline.json").read_text())["n"] == 2

    # private text stays on the client's side: no file outside client/ shares 40 characters with a training or
    # held-out record's question or answer (the evaluation's predictions hold them, under client/eval)
    from ksg_ray.common.records import load_records

    client = run_dir / "client"
    assert (client / "eval" / "pipeline.predictions.jsonl").is_file()
    assert (client / "eval-mine" / "pipeline.predictions.jsonl").is_file()
    records = load_records(client / "private.jsonl") + load_records(client / "held_out.jsonl")
    assert private_text_outside_client(run_dir, records) == []
    planted = run_dir / "eval" / "leak.txt"  # the scan finds what it is for
    planted.write_text("x " + records[-1].output[:45] + " y")
    assert set(private_text_outside_client(run_dir, records)) == {f"eval/leak.txt: {records[-1].output[:45]!r}"}


def test_each_baseline_gets_its_own_synthesis_finetune_and_evaluation(ray_cluster, tmp_path, monkeypatch):
    """The wiring of the baselines, with every stage recorded instead of run (the stages have their own tests)."""
    import math

    from ksg_ray.bundle import dump_privacy
    from ksg_ray.jobs import dp_finetune, dp_reward, evaluate, finetune, pipeline, synthesize
    from ksg_ray.pipeline.config import SYNTH_VARIANTS

    calls: list[tuple[str, list[str]]] = []

    def arg(argv: list[str], key: str) -> str | None:
        values = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
        return values[-1] if values else None  # the last one wins, as in the config loader

    empty_synthesis: set[str] = set()  # output dirs whose synthesis writes no row

    from ksg_ray import engines

    judge_loads: list[str] = []
    monkeypatch.setattr(engines, "_build_engine", lambda kind, path, adapter, **kw: judge_loads.append(path))

    def recorder(name: str):
        def record(argv: list[str]) -> None:
            calls.append((name, argv))
            if name == "evaluate":  # each evaluation asks for the judge, as jobs/evaluate.py does
                engines.build_engine("transformers", "the-judge")
            if name == "synthesize":  # a synthesis output for the fine-tune stage to find
                out = Path(arg(argv, "run.output_dir"))
                out.mkdir(parents=True, exist_ok=True)
                (out / "synthetic.jsonl").write_text("" if str(out) in empty_synthesis else '{"round": 0}\n')
        return record

    for module in (dp_finetune, dp_reward, synthesize, finetune, evaluate):
        monkeypatch.setattr(module, "main", recorder(module.__name__.rsplit(".", 1)[-1]))
    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "privacy.json").write_text(dump_privacy({"epsilon": 10.5, "delta": 1e-5, "not_dp": [],
                                                               "mechanisms": []}))
    pipeline.main([f"run_dir={run}", "held_out=4", "canaries.fraction=0.5", "rounds=1",
                   "stages=[synthesize, finetune, evaluate]", "epsilon_grid=[4]",
                   "baselines=[base, non_private, dp_finetune, dp_synthetic, knowledgesg, rewardds, pipeline]"])

    synth = [(arg(a, "run.output_dir"), arg(a, "refine.rounds"), arg(a, "refine.rewriter"), a)
             for name, a in calls if name == "synthesize"]
    pipe, variants = str(run / "synth"), run / "variants"
    assert [(s[0], s[1], s[2]) for s in synth] == [
        (pipe, "0", None), (pipe, "1", str(run / "finetune" / "round0" / "model")),
        (str(variants / "dp_synthetic" / "synth"), "0", None), (str(variants / "knowledgesg" / "synth"), "0", None),
        (str(variants / "rewardds" / "synth"), "0", None),
        (str(variants / "rewardds" / "synth"), "1", str(variants / "rewardds" / "finetune" / "round0" / "model"))]
    for out, _, _, argv in synth[2:]:
        assert all(o in argv for o in SYNTH_VARIANTS[out.split("/")[-2]])
        assert arg(argv, "queries.share_from") == pipe  # the pipeline's samples, where drawn alike
    assert all(arg(a, "queries.share_from") is None for _, _, _, a in synth[:2])
    tuned = [arg(a, "data.path") for name, a in calls if name == "finetune"]
    assert tuned == [f"{pipe}/synthetic.jsonl"] * 2 + [f"{variants}/{v}/synth/synthetic.jsonl"
                                                       for v in ("dp_synthetic", "knowledgesg", "rewardds", "rewardds")]

    evals = {arg(a, "run.method"): a for name, a in calls if name == "evaluate"}
    assert list(evals) == ["base", "non_private", "dp_finetune", "dp_synthetic", "knowledgesg", "rewardds",
                           "pipeline", "dp_finetune@4"]
    assert judge_loads == ["the-judge"]  # the evaluations share their engines: the judge loads once, not 8 times
    assert arg(evals["pipeline"], "model.name") == str(run / "finetune" / "round1" / "model")
    assert arg(evals["rewardds"], "model.name") == str(variants / "rewardds" / "finetune" / "round1" / "model")
    assert arg(evals["knowledgesg"], "model.name") == str(variants / "knowledgesg" / "finetune" / "round0" / "model")
    for method in ("dp_synthetic", "knowledgesg", "rewardds", "pipeline"):  # post-processing of the bundle
        assert arg(evals[method], "run.epsilon") == "10.5" and arg(evals[method], "audit.bundle") == str(run / "bundle")
        assert arg(evals[method], "audit.synthetic").endswith("synth/synthetic.jsonl")
    assert arg(evals["knowledgesg"], "audit.synthetic") == f"{variants}/knowledgesg/synth/synthetic.jsonl"
    for method in ("base", "non_private", "dp_finetune", "dp_finetune@4"):  # not trained on a synthetic set
        assert arg(evals[method], "audit.scan_synthetic") == "false"
    assert arg(evals["base"], "run.epsilon") == "0" and arg(evals["non_private"], "run.epsilon") == "inf"
    # evaluation-only client runs: unpublished in the client's ledger, no bundle; their adapters stay in client/
    assert arg(evals["dp_finetune@4"], "model.adapter") == str(run / "client" / "dp_eps4" / "generator" / "adapter")
    assert arg(evals["non_private"], "model.adapter") == str(run / "client" / "non_private" / "generator" / "adapter")
    assert arg(evals["non_private"], "model.bundle") is None
    assert arg(evals["dp_finetune@4"], "run.family") == arg(evals["dp_finetune"], "run.family") == "dp_finetune"
    client_trainings = [(arg(a, "run.output_dir"), arg(a, "privacy.target_epsilon"), arg(a, "data.question_loss"))
                        for name, a in calls if name == "dp_finetune"]
    # dp_finetune learns the answers alone, like every other fine-tune, at the generator's ε (configs: 8)
    assert client_trainings == [(str(run / "client" / "non_private"), "inf", "false"),
                                (str(run / "client" / "dp_finetune"), "8.0", "false"),
                                (str(run / "client" / "dp_eps4"), "4.0", "false")]
    assert arg(evals["dp_finetune"], "model.adapter") == str(run / "client" / "dp_finetune" / "generator" / "adapter")
    assert arg(evals["dp_finetune"], "run.epsilon") == "8.0" and arg(evals["dp_finetune"], "model.bundle") is None
    assert all(arg(a, "data.path") == str(run / "client" / "private.jsonl") and arg(a, "privacy.publish") == "false"
               for _, a in calls if _ == "dp_finetune")
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert math.isfinite(sum(t for t in summary["stage_seconds"].values() if not isinstance(t, str)))

    # `ksg eval-run`: every method again, same model and ε, on another test set, results in eval-<name>/
    from ksg_ray.pipeline.eval_run import eval_run

    calls.clear()
    folder, _ = eval_run(run, ["data.path=/elsewhere/test.jsonl", "data.limit=64", "data.max_new_tokens=32"])
    rescored = {arg(a, "run.method"): a for name, a in calls if name == "evaluate"}
    assert folder == "eval-test" and list(rescored) == list(evals)
    for method, a in rescored.items():
        for key in ("model.name", "model.adapter", "model.bundle", "run.epsilon", "run.family"):
            assert arg(a, key) == arg(evals[method], key), (method, key)
        assert (arg(a, "data.path"), arg(a, "data.limit"), arg(a, "run.results")) == (
            "/elsewhere/test.jsonl", "64", "eval-test")
        assert arg(a, "data.max_new_tokens") == "32" and arg(a, "audit.scan_synthetic") == "false"
        assert not any(o.startswith(("audit.members", "audit.canary", "audit.secrets", "audit.nonmembers"))
                       for o in a)  # the run's own audits do not apply to another test set

    # a baseline whose synthesis wrote no row is neither fine-tuned nor evaluated, and the report says why
    calls.clear()
    other = tmp_path / "other"
    empty_synthesis.add(str(other / "variants" / "rewardds" / "synth"))
    (other / "bundle").mkdir(parents=True)
    (other / "bundle" / "privacy.json").write_text((run / "bundle" / "privacy.json").read_text())
    summary = pipeline.main([f"run_dir={other}", "held_out=4", "canaries.fraction=0.5", "rounds=1",
                             "stages=[synthesize, finetune, evaluate, report]", "baselines=[base, rewardds]"])
    assert [arg(a, "run.output_dir") for name, a in calls if name == "finetune"] == [str(other / "finetune")] * 2
    assert [arg(a, "run.method") for name, a in calls if name == "evaluate"] == ["base"]
    assert summary["stage_seconds"]["finetune [rewardds] round 0"].startswith("NOT RUN")
    assert "`rewardds`: NOT RUN" in (other / "report" / "report.md").read_text()

    # dp_finetune: generator evaluates the bundle's DP generator itself (question loss included), no extra run
    calls.clear()
    pipeline.main([f"run_dir={run}", "held_out=4", "stages=[evaluate]", "baselines=[dp_finetune]",
                   "dp_finetune=generator"])
    assert [name for name, _ in calls] == ["evaluate"]
    assert arg(calls[0][1], "model.bundle") == str(run / "bundle") and arg(calls[0][1], "model.adapter") is None
