"""SERVER SIDE — the fine-tuned model's folder: written by `ksg finetune`, read by serving, refinement and the next
fine-tuning round.

Layout of `<run.output_dir>/<run.name>/model/`:

    model_ref.json          {"format": "adapter" | "merged", "base_model": "smollm2-135m", "tokenizer": ...,
                             "kind": "causal-lm-lora" | "causal-lm"}  (public names only, never a cache path)
    finetune_summary.json   rounds, epochs, losses, dev ROUGE-L per epoch, best epoch, wall time
    tokenizer files         tokenizer.json, tokenizer_config.json, ... (chat template included)
    format "adapter":       adapter_config.json (base_model_name_or_path = the public base name, as in
                            model_ref.json) + adapter_model.safetensors — a peft adapter over the public base
    format "merged":        config.json, generation_config.json, model*.safetensors — a plain HF model folder

`engine_paths(dir)` turns it into `build_engine(kind, model_path, adapter_path)` arguments: an embedded base
name such as `smollm2-135m` is resolved on the machine that loads it (`ksg_ray.common.hub.resolve_model`), so the
folder is portable between machines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODEL_REF", "SUMMARY_FILE", "InitRef", "ModelDirRef", "engine_paths", "export_model_dir", "format_summary",
           "read_model_dir", "resolve_init"]

MODEL_REF = "model_ref.json"
SUMMARY_FILE = "finetune_summary.json"
FORMATS = {"adapter": ("adapter_config.json", "adapter_model.safetensors"), "merged": ("config.json",)}
KINDS = {"adapter": "causal-lm-lora", "merged": "causal-lm"}


@dataclass(frozen=True)
class ModelDirRef:
    """A checked model folder: its path, format ("adapter" | "merged") and public base model name."""

    path: Path
    format: str
    base_model: str


def read_model_dir(path: str | Path) -> ModelDirRef:
    """Check a model folder written by `export_model_dir` and return what it holds.

    Raises:
        ValueError: not a folder, no or bad `model_ref.json`, or a file its format needs is missing.
    """
    root = Path(path)
    ref_file = root / MODEL_REF
    if not ref_file.is_file():
        raise ValueError(f"{root}: not a fine-tuned model folder ({MODEL_REF} missing)")
    try:
        ref = json.loads(ref_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{ref_file}: not valid JSON: {e}") from e
    fmt, base = ref.get("format"), ref.get("base_model")
    if fmt not in FORMATS or not isinstance(base, str) or not base:
        raise ValueError(f"{ref_file}: needs 'format' (one of {sorted(FORMATS)}) and a string 'base_model'")
    missing = [f for f in FORMATS[fmt] if not (root / f).is_file()]
    if fmt == "merged" and not list(root.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{root}: {fmt} model folder lacks {', '.join(missing)}")
    return ModelDirRef(root, fmt, base)


@dataclass(frozen=True)
class InitRef:
    """Where a fine-tuning run starts: kind "base" | "adapter" | "merged", the weights' folder, and the summary of
    the rounds before it (a previous `ksg finetune` model folder carries its own)."""

    kind: str
    path: str | None
    source: str | None
    prior_rounds: list[dict]


def resolve_init(init_from: str | None, model_name: str, *, mode: str, export: str) -> InitRef:
    """Check `init.from` against the config and say what the workers load.

    Args:
        init_from: None, a model folder written by `ksg finetune`, or "bundle:DIR" (the DP generator adapter).
        model_name: `model.name`; the folder's or bundle's base model must be this one.
        mode, export: the run's; a LoRA adapter over merged weights cannot be exported as an adapter.

    Raises:
        ValueError: the folder or bundle is invalid, built on another base model, or the combination cannot
            be exported.
    """
    if init_from is None:
        return InitRef("base", None, None, [])
    if init_from.startswith("bundle:"):
        from ksg_ray.bundle import verify_bundle

        bundle = Path(init_from[len("bundle:"):])
        if "generator" not in verify_bundle(bundle)["components"]:
            raise ValueError(f"init.from={init_from}: the bundle has no generator component")
        base = json.loads((bundle / "generator" / MODEL_REF).read_text())["base_model"]
        _same_base(init_from, base, model_name)
        return InitRef("adapter", str(bundle / "generator"), init_from, [])
    ref = read_model_dir(init_from)
    _same_base(init_from, ref.base_model, model_name)
    if ref.format == "merged" and mode == "lora" and export == "adapter":
        raise ValueError(f"init.from={init_from} holds merged weights: an adapter trained on them has no public base; "
                         "set export=merged (or mode=full)")
    summary = ref.path / SUMMARY_FILE
    prior = json.loads(summary.read_text()).get("rounds", []) if summary.is_file() else []
    return InitRef(ref.format, str(ref.path), str(init_from), prior)


def _same_base(where: str, base: str, model_name: str) -> None:
    if base != model_name:
        raise ValueError(f"init.from={where} was trained on base model {base!r} but model.name is {model_name!r}: "
                         f"set model.name={base}")


def engine_paths(path: str | Path) -> tuple[str, str | None]:
    """(model_path, adapter_path) for `ksg_ray.engines.build_engine`: the resolved public base + the adapter
    folder, or the merged folder alone."""
    from ksg_ray.common.hub import model_dir_engine_args

    return model_dir_engine_args(read_model_dir(path).path)  # checked first: a half-written folder fails here


def export_model_dir(weights: Path, out: Path, *, fmt: str, base_model: str, tokenizer_path: str,
                     merge_base_path: str | None = None, dtype: str = "float32",
                     summary: dict[str, Any] | None = None) -> Path:
    """Write the model folder at `out` from a checkpoint's `model/` (replacing any old one, atomically).

    Args:
        weights: a peft adapter folder (LoRA runs) or a full HF model folder (full fine-tunes).
        out: the model folder to write.
        fmt: "adapter" (copy the adapter, naming the public base) or "merged" (one plain HF folder).
        base_model: the public base name written into model_ref.json and adapter_config.json.
        tokenizer_path: where the tokenizer is read from.
        merge_base_path: for fmt="merged" from an adapter: the weights the adapter sits on.
        dtype: weight dtype of a merged export.
        summary: written as finetune_summary.json.

    Returns:
        `out`.
    """
    import torch
    from transformers import AutoTokenizer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        is_adapter = (weights / "adapter_config.json").is_file()
        if fmt == "adapter":
            if not is_adapter:
                raise ValueError(f"{weights}: export=adapter needs LoRA weights (a full fine-tune exports merged)")
            shutil.copy2(weights / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
            adapter_config = json.loads((weights / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = base_model  # not this machine's cache path
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        elif is_adapter:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(merge_base_path, dtype=getattr(torch, dtype))
            merged = PeftModel.from_pretrained(base, str(weights)).merge_and_unload()
            merged.save_pretrained(str(tmp), safe_serialization=True)
        else:
            for f in weights.iterdir():
                if f.suffix == ".safetensors" or f.name in ("config.json", "generation_config.json",
                                                             "model.safetensors.index.json"):
                    shutil.copy2(f, tmp / f.name)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(str(tmp))
        ref = {"format": fmt, "base_model": base_model, "tokenizer": base_model, "kind": KINDS[fmt]}
        (tmp / MODEL_REF).write_text(json.dumps(ref, indent=2))
        if summary is not None:
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        read_model_dir(tmp)
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def format_summary(s: dict) -> str:
    """`ksg finetune`'s printed summary of one round (from its `finetune_summary.json` dict)."""
    from ksg_ray.server.finetune.data import format_dev_score as fmt

    epochs = ", ".join(f"{i}: loss {loss:.3f} / ROUGE-L {fmt(r)}"
                       for i, (loss, r) in enumerate(zip(s["epoch_train_loss"], s["dev_rouge_l"], strict=True), 1))
    return "\n".join([
        f"model       {s['model_dir']} ({s['export']}, base {s['base_model']}, mode {s['mode']})",
        f"data        {s['rows']} rows (per round {s['rows_per_round']}), {s['steps']} steps, init {s['init']}",
        f"dev         ROUGE-L {fmt(s['dev_rouge_l_start'])} before → best {fmt(s['best_dev_rouge_l'])} at epoch "
        f"{s['best_epoch']} ({s['dev']['records']} records, {s['dev']['source']})" if s["dev"]["records"] else
        f"dev         {s['dev']['source']}",
        f"epochs      {epochs}",
        f"loss        answer tokens of a fixed probe of training rows {s['probe_loss_start']:.4f} before → "
        f"{s['epoch_probe_loss'][s['best_epoch'] - 1]:.4f} at the best epoch",
        f"rounds      {len(s['rounds'])} so far; wall time {s['wall_time_s']:.1f}s",
    ])
