"""The deployment files in cluster/ agree with the code they launch: jobs, configs, the Serve app and Ray itself.

Nothing here starts a cluster. Each test reads the YAML and checks what would otherwise fail only on a real
cluster, minutes after `kubectl apply` / `ray up`: a command naming a missing job or an invalid config, a Serve
app that is not the one in serve/config.yaml, an image of another Ray, a GPU pod too small for a config's workers.
"""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from test_configs import SCHEMAS  # tests/ is on sys.path under pytest's default import mode

from ksg_ray.common.config import load_config
from ksg_ray.pipeline.config import PipelineConfig
from ksg_ray.serve.config import parse_app_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CLUSTER_FILES = sorted(CLUSTER.rglob("*.yaml"))
ENTRYPOINT = re.compile(r"python (jobs/\w+\.py) --config (configs/\S+\.yaml)")
RAY_IMAGE = re.compile(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py(\d)(\d+)-(gpu|cu\d+)$")
ARCHIVE_PIP = re.compile(r"^ksg-ray\[([\w,-]+)\] @ (\S+)$")
# Written by other sessions of this project: a test that needs one of them skips until it exists.
WRITTEN_ELSEWHERE = ("serve/config.yaml", "configs/pipeline.yaml", "configs/pipeline_gpu.yaml")
# What a GPU cluster changes in the Serve app's args: the engine (vLLM, GPUs) and where the models are.
CLUSTER_ONLY_ARGS = ("engine", "models")


def _require(rel: str) -> Path:
    path = ROOT / rel
    if not path.is_file():
        if rel in WRITTEN_ELSEWHERE:
            pytest.skip(f"{rel} is not written yet (another session's file)")
        pytest.fail(f"{rel} does not exist")
    return path


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kube(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in CLUSTER_FILES for d in _docs(p) if d.get("kind") == kind]


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayClusterSpec: a RayCluster's spec, a RayJob's rayClusterSpec, a RayService's rayClusterConfig."""
    return ([(f"{n} RayCluster", d["spec"]) for n, d in _kube("RayCluster")]
            + [(f"{n} RayJob", d["spec"]["rayClusterSpec"]) for n, d in _kube("RayJob")]
            + [(f"{n} RayService", d["spec"]["rayClusterConfig"]) for n, d in _kube("RayService")])


def _ray_up() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, pod spec, Ray container) of the head and every worker group."""
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"], g["template"]["spec"]["containers"][0]) for name, g in groups]


def _cpus(quantity: str | int | float) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _max_gpus(spec: dict[str, Any]) -> int:
    """GPUs of a RayClusterSpec with every worker group at maxReplicas."""
    return sum(g["maxReplicas"] * _gpus(g["template"]["spec"]["containers"][0]) for g in spec["workerGroupSpecs"])


def _extras(spec: str) -> set[str]:
    return {e.strip() for e in spec.split(",")}


def _project_extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _load(rel: str, overrides: list[str] | None = None):
    schema = next(s for prefix, s in SCHEMAS.items() if Path(rel).name.startswith(prefix))
    return load_config(schema, _require(rel), overrides or [])


def _stage_configs(cfg: PipelineConfig) -> list[tuple[str, Any]]:
    """Each stage's config with the pipeline's overrides, loaded as the pipeline's stages will load them."""
    stages = ("dp_train", "dp_reward", "synthesize", "finetune", "evaluate")
    return [(s, _load(str(getattr(cfg, s).config), list(getattr(cfg, s).overrides))) for s in stages]


def _demands(rel: str) -> list[tuple[str, float, float]]:
    """(what, CPUs, GPUs) that one Ray Train worker or one engine actor of a config asks for."""
    cfg = _load(rel)
    loaded = _stage_configs(cfg) if isinstance(cfg, PipelineConfig) else [(rel, cfg)]
    out = []
    for name, c in loaded:
        if hasattr(c, "scaling") and c.scaling.use_gpu:
            out.append((f"{name} Train worker", c.scaling.cpus_per_worker, 1.0))
        engine = getattr(c, "engine", None)
        if getattr(engine, "num_gpus", 0) > 0:
            out.append((f"{name} engine actor", engine.num_cpus, engine.num_gpus))
    return out


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_cluster_file_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: not one or more YAML mappings"
    if path.name != "ray-up.yaml":
        for d in docs:
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(d), f"{path.name}: {d.get('kind')} lacks fields"


def test_entrypoints_name_existing_jobs_and_valid_configs():
    """Every `python jobs/X.py --config configs/Y.yaml` in cluster/ and in the README's commands."""
    found = [(p.name, *m) for p in [*CLUSTER_FILES, ROOT / "README.md"] for m in ENTRYPOINT.findall(p.read_text())]
    assert any(job == "jobs/pipeline.py" for _, job, _ in found)
    for name, job, config in found:
        assert (ROOT / job).is_file(), f"{name}: {job} does not exist"
        assert Path(config).name.startswith(Path(job).stem), f"{name}: {job} is given {config}, another job's config"
        _load(config)


def test_the_rayjob_runs_the_paper_scale_pipeline_with_valid_stage_configs():
    (name, job), = _kube("RayJob")
    job_file, config = ENTRYPOINT.fullmatch(job["spec"]["entrypoint"]).groups()
    assert job_file == "jobs/pipeline.py" and job["spec"]["shutdownAfterJobFinishes"] is True
    loaded = _stage_configs(_load(config))
    assert [s for s, _ in loaded] == ["dp_train", "dp_reward", "synthesize", "finetune", "evaluate"]


def test_runtime_envs_install_this_project_with_existing_extras():
    envs = [(n, yaml.safe_load(d["spec"]["runtimeEnvYAML"])) for n, d in _kube("RayJob")]
    envs += [(n, app.get("runtime_env", {})) for n, d in _kube("RayService")
             for app in yaml.safe_load(d["spec"]["serveConfigV2"])["applications"]]
    assert envs
    for name, env in envs:
        (pip,) = env["pip"]
        extras, url = ARCHIVE_PIP.fullmatch(pip).groups()
        assert _extras(extras) <= _project_extras(), f"{name}: unknown extras {extras}"
        if "working_dir" in env:
            assert env["working_dir"] == url, f"{name}: working_dir and the installed package are different code"


def test_images_are_gpu_images_of_the_installed_ray():
    major_minor = tuple(ray.__version__.split(".")[:2])
    images = [(f"{n} {g}", c["image"]) for n, spec in _ray_cluster_specs() for g, _, c in _containers(spec)]
    images.append(("ray-up.yaml docker", _ray_up()["docker"]["image"]))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    min_python = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    for where, image in images:
        m = RAY_IMAGE.fullmatch(image)
        assert m, f"{where}: {image} is not a pinned rayproject/ray GPU image (X.Y.Z-pyNNN-gpu|-cuNNN)"
        assert m.groups()[:2] == major_minor, f"{where}: {image} is not Ray {ray.__version__}"
        assert (int(m[4]), int(m[5])) >= min_python, f"{where}: {image} has an older Python than {requires}"
    for where, spec in _ray_cluster_specs():
        image = _containers(spec)[0][2]["image"]
        assert spec["rayVersion"] == RAY_IMAGE.fullmatch(image).expand(r"\1.\2.\3"), f"{where}: rayVersion != image"


def test_ray_cluster_specs_have_a_cpu_head_and_autoscaling_gpu_workers():
    storage = {d["metadata"]["name"] for _, d in _kube("PersistentVolumeClaim")}
    for where, spec in _ray_cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, where
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            bad = {k: v for k, v in group["rayStartParams"].items() if not isinstance(v, str)}
            assert not bad, f"{where}: rayStartParams must be strings (the CRD's type), got {bad}"
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: work could land on the head"
        for group, pod, container in _containers(spec):
            gpus = _gpus(container)
            assert (gpus == 0) == (group == "head"), f"{where} {group}: {gpus} GPUs"
            requests = container["resources"].get("requests", {})
            assert "nvidia.com/gpu" not in requests or int(requests["nvidia.com/gpu"]) == gpus, f"{where} {group}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where} {group}: mount {mount['name']} has no volume"
            claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
            assert claims <= storage, f"{where} {group}: claims {claims - storage} are not in cluster/kuberay/"
        ports = {p["containerPort"] for p in _containers(spec)[0][2]["ports"]}
        assert {6379, 8265, 10001} <= ports, f"{where}: head lacks the GCS, dashboard or client port"
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["maxReplicas"], f"{where} {g['groupName']}"
            if not where.endswith("RayService"):  # a service keeps its replicas up; batch clusters scale from 0
                assert g["minReplicas"] == 0, f"{where} {g['groupName']}: GPUs held while idle"


def test_gpu_pods_and_nodes_fit_every_gpu_config():
    batch = [(w, spec) for w, spec in _ray_cluster_specs() if not w.endswith("RayService")]
    pods = [(f"{w} {g}", _cpus(c["resources"]["requests"]["cpu"]), _gpus(c))
            for w, spec in batch for g, _, c in _containers(spec) if g != "head"]
    node = _ray_up()["available_node_types"]["gpu_worker"]
    pods.append(("ray-up.yaml gpu_worker", node["resources"]["CPU"], node["resources"]["GPU"]))
    max_gpus = {w: _max_gpus(spec) for w, spec in batch}
    max_gpus["ray-up.yaml"] = node["max_workers"] * node["resources"]["GPU"]
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*_gpu.yaml"))
    assert {"configs/synthesize_vllm_gpu.yaml", "configs/dp_reward_gpu.yaml"} <= set(configs)
    for rel in configs:
        cfg = _load(rel)
        for what, cpus, gpus in _demands(rel):
            for where, pod_cpus, pod_gpus in pods:
                assert cpus <= pod_cpus and gpus <= pod_gpus, f"{rel}: a {what} ({cpus} CPU, {gpus} GPU) never " \
                                                              f"fits a {where} pod ({pod_cpus} CPU, {pod_gpus} GPU)"
        if hasattr(cfg, "scaling") and cfg.scaling.use_gpu:
            for where, total in max_gpus.items():
                assert cfg.scaling.num_workers <= total, f"{rel}: {cfg.scaling.num_workers} GPU workers > {where}"


def _serve_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    reference = yaml.safe_load(_require("serve/config.yaml").read_text())
    (_, service), = _kube("RayService")
    return reference, yaml.safe_load(service["spec"]["serveConfigV2"])


def test_rayservice_is_the_serve_config_app_with_gpu_engine_and_cluster_paths():
    from ray.serve.schema import ServeDeploySchema

    reference, cluster = _serve_configs()
    for config in (reference, cluster):
        ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay submit
    (ref_app,), (app,) = reference["applications"], cluster["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == ref_app[key], f"serveConfigV2 {key}: {app[key]!r} != serve/config.yaml {ref_app[key]!r}"
    assert cluster["http_options"]["port"] == reference["http_options"]["port"]
    assert cluster["controller_options"] == reference["controller_options"]

    module, attr = app["import_path"].split(":")
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package, _, leaf = module.rpartition(".")
    assert (ROOT / package_dirs[package] / f"{leaf}.py").is_file(), f"{module} is not a file of this checkout"
    assert callable(getattr(importlib.import_module(module), attr))

    ref_args, args = ref_app["args"], app["args"]
    assert set(args) == set(ref_args), f"args sections differ: {set(args) ^ set(ref_args)}"
    for section in set(args) - set(CLUSTER_ONLY_ARGS):
        assert args[section] == ref_args[section], f"args.{section} differs from serve/config.yaml"
    assert set(args["models"]) == set(ref_args["models"]), "the cluster serves other model ids"
    cfg = parse_app_config(args, source="rayservice.yaml serveConfigV2")
    assert cfg.engine.num_gpus >= 1, "the cluster app runs its models without GPUs"


def test_rayservice_pods_carry_the_serve_port_token_and_enough_gpus():
    reference, cluster = _serve_configs()
    cfg = parse_app_config(cluster["applications"][0]["args"])
    (_, service), = _kube("RayService")
    spec = service["spec"]["rayClusterConfig"]
    for group, _, container in _containers(spec):
        ports = {p["containerPort"] for p in container.get("ports", [])}
        assert reference["http_options"]["port"] in ports, f"RayService {group}: no Serve port"
        env = {e["name"] for e in container.get("env", [])}
        assert cfg.auth.token_env in env, f"RayService {group}: {cfg.auth.token_env} unset, the app would not start"
    assert _max_gpus(spec) >= cfg.autoscaling.max_replicas * cfg.engine.num_gpus, "Serve never reaches max_replicas"
    (_, raycluster), = _kube("RayCluster")
    head = _containers(raycluster["spec"])[0][2]
    assert reference["http_options"]["port"] in {p["containerPort"] for p in head["ports"]}


def test_rayservice_serves_the_last_round_of_the_gpu_pipeline():
    pipeline = _load("configs/pipeline_gpu.yaml")
    _, cluster = _serve_configs()
    served = Path(cluster["applications"][0]["args"]["models"]["ksg-distilled"])
    assert served == pipeline.run_dir / "finetune" / f"round{pipeline.rounds}" / "model"


def test_ray_up_config_passes_rays_validation_and_installs_the_project():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _ray_up()
    validate_config(prepare_config(config))  # what `ray up` runs first (defaults of the provider filled in)
    assert config["file_mounts"]["~/ksg-ray"] == "."
    installs = [re.search(r"pip install -e '\.\[([\w,-]+)\]'", c) for c in config["setup_commands"]]
    (extras,) = [m[1] for m in installs if m]
    assert _extras(extras) == {"deepspeed", "vllm"} and _extras(extras) <= _project_extras()
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"].get("CPU") == 0
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"])
    workers = [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert workers and all(n["resources"]["GPU"] >= 1 and n["min_workers"] == 0 for n in workers)


def test_validation_here_would_catch_a_broken_file(tmp_path, monkeypatch):
    """The checks above fail on the mistakes they exist for (a wrong image, a wrong Serve app, a bad ray-up key)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = _ray_up() | {"max_wrokers": 8}
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(bad))
    assert not RAY_IMAGE.fullmatch("rayproject/ray:latest-gpu")
    assert not RAY_IMAGE.fullmatch("rayproject/ray:2.60.0-py311")  # the CPU image
    text = (CLUSTER / "kuberay" / "rayservice.yaml").read_text().replace("max_batch_size: 8", "max_batch_size: 4")
    (tmp_path / "rayservice.yaml").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "CLUSTER_FILES", [tmp_path / "rayservice.yaml"])
    with pytest.raises(AssertionError, match="args.batching differs"):
        test_rayservice_is_the_serve_config_app_with_gpu_engine_and_cluster_paths()
