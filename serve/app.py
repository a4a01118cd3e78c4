"""SERVER SIDE — the Ray Serve app: an OpenAI-compatible HTTP API in front of the distilled model(s).

Two deployments:

- `OpenAIIngress` (`ksg_ray.serve.ingress`, FastAPI): the protocol, validation and auth.
- `ModelServer` (`ksg_ray.serve.model_server`): the engines, multiplexed by model id, batched and streamed.

`engine.kind: vllm` replaces `ModelServer` with Ray's own `ray.serve.llm` deployment (`ksg_ray.serve.vllm_server`:
one vLLM engine per replica, the adapters as LoRAs of their shared base); the ingress stays in front. vllm is
imported only then.

Start it with `ksg serve MODEL_DIR`, `serve run serve/config.yaml`, or `serve.run(build_app({...}))`.
"""

from typing import Any

from ray import serve

from ksg_ray.serve.config import ServeAppConfig, parse_app_config
from ksg_ray.serve.ingress import OpenAIIngress, read_body
from ksg_ray.serve.model_server import ModelServer

__all__ = ["REPLICA_ENV", "ModelServer", "OpenAIIngress", "build_app", "read_body"]

# Our replicas run our code and their handles' router on Serve's own event loop instead of a thread and a loop of
# their own, as Ray's throughput-optimized mode does: ~2 ms less per request here (README, Serve). Safe because
# nothing of ours blocks the loop: engine calls, model loads and long prompts' tokenization go to threads.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def build_app(args: dict[str, Any] | ServeAppConfig) -> serve.Application:
    """The Serve application: ingress + model deployment, from a config (the `args:` of a Serve config file).

    Args:
        args: a `ServeAppConfig` or its fields as a dict (what `serve run`/`serve deploy` pass).

    Returns:
        The bound application, for `serve.run` or a Serve config's `import_path`.

    Raises:
        KsgConfigError: the config is invalid or a model entry is not a model dir (every problem listed).

    Examples:
        >>> serve.run(build_app({"models": {"ksg-distilled": "runs/finetune/round0/model"}}))
        >>> # serve run serve/config.yaml  (import_path: ksg_ray.serve.app:build_app)
    """
    cfg = args if isinstance(args, ServeAppConfig) else parse_app_config(args)
    cfg.check_model_dirs()
    if cfg.engine.kind == "vllm":
        from ksg_ray.serve.vllm_server import build_vllm_deployment

        model_server = build_vllm_deployment(cfg)
    else:
        model_server = ModelServer.options(
            autoscaling_config=cfg.autoscaling.serve_options(),
            max_ongoing_requests=cfg.ingress.model_max_ongoing_requests,
            ray_actor_options={"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus,
                               "runtime_env": {"env_vars": REPLICA_ENV}},
        ).bind(cfg)
    return OpenAIIngress.options(
        num_replicas=cfg.ingress.num_replicas, max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus, "runtime_env": {"env_vars": REPLICA_ENV}},
    ).bind(cfg, model_server)
