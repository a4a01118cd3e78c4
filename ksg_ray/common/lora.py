"""LoRA models for training (DP on the client, plain on the server): a frozen base plus trainable adapters.

The base model is moved to its device *before* `get_peft_model` (otherwise the LoRA weights are silently
corrupted under Opacus, opacus#820); only adapter (and, for a reward model, head) weights train.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from ksg_ray.common.sections import LoraSection

__all__ = ["build_lora_lm", "lm_builder", "lm_loss", "load_adapter", "per_sample_lm_loss", "save_adapter",
           "unwrap_peft"]


def build_lora_lm(device: torch.device, *, model_path: str, lora: LoraSection, seed: int = 0) -> PeftModel:
    """Load the causal LM from `model_path` (float32), move it to `device`, add LoRA adapters."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base.config.use_cache = False
    base.to(device)
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    ))


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's answer tokens (labels != -100): one loss per record."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    token_loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(shift_labels)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def lm_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-record loss on answer tokens; position ids are passed per row for Opacus' per-sample shapes."""
    out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"])
    return per_sample_lm_loss(out.logits, batch["labels"])


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    """peft's own format (adapter_model.safetensors + adapter_config.json): what a server loads with peft/vLLM."""
    unwrap_peft(model).save_pretrained(str(out))


def load_adapter(model: torch.nn.Module, src: Path) -> None:
    set_peft_model_state_dict(unwrap_peft(model), load_file(str(Path(src) / "adapter_model.safetensors")))


def unwrap_peft(model: torch.nn.Module) -> PeftModel:
    """Unwrap Opacus' GradSampleModule / DeepSpeed to the PeftModel."""
    while not isinstance(model, PeftModel):
        model = model._module if hasattr(model, "_module") else model.module
    return model


def lm_builder(model_path: str, lora: LoraSection, seed: int):
    """A picklable `(device) -> model` for `DPTask.build_model`."""
    return partial(build_lora_lm, model_path=model_path, lora=lora, seed=seed)
