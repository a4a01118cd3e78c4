"""LoRA models for training (DP on the client, plain on the server): a frozen base plus trainable adapters.

The base model is moved to its device *before* `get_peft_model` (otherwise the LoRA weights are silently
corrupted under Opacus, opacus#820); only adapter (and, for a reward model, head) weights train.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from ksg_ray.common.sections import LoraSection

__all__ = ["build_lora_lm", "example_tokens", "frozen_linears_to_bf16", "lm_builder", "lm_loss", "load_adapter",
           "lora_config", "per_sample_lm_loss", "save_adapter", "unwrap_peft"]


def build_lora_lm(device: torch.device, *, model_path: str, lora: LoraSection, seed: int = 0) -> PeftModel:
    """Load the causal LM from `model_path` (float32), move it to `device`, add LoRA adapters."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base.config.use_cache = False
    base.to(device)
    torch.manual_seed(seed)
    return get_peft_model(base, lora_config(lora, base.config.num_hidden_layers, task_type="CAUSAL_LM"))


def lora_config(lora: LoraSection, num_layers: int, **kwargs) -> LoraConfig:
    """peft's config for `lora` on a model of `num_layers` transformer layers (`top_layers`: the top ones only)."""
    layers = None
    if lora.top_layers is not None:
        if lora.top_layers > num_layers:
            raise ValueError(f"lora.top_layers={lora.top_layers}: the model has {num_layers} layers")
        layers = list(range(num_layers - lora.top_layers, num_layers))
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), layers_to_transform=layers, **kwargs)


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    """Store the frozen linear layers' weights in bf16, for a model that runs under bf16 autocast; returns how many.

    Autocast casts a float32 weight to bf16 at every use, and caches the cast only for weights that train: the
    frozen base is re-cast at every forward, and at every decode step in generation (on a 2-core AMX CPU a dev
    evaluation's greedy answers took 3.8 s that way, 1.8 s with the weights stored in bf16). Stored in bf16 they
    give the same matmuls bit for bit (autocast would round them the same way) without the casts. Embeddings,
    norms and trainable weights stay float32; an output head tied to the input embeddings gets its own bf16 copy,
    so the embedding lookup is unchanged.
    """
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(False)}
    count = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad or param.dtype != torch.float32:
                continue
            if id(param) in shared:  # shared with an embedding: a copy, so the embedding stays float32
                setattr(module, name, torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False))
            else:
                param.data = param.data.to(torch.bfloat16)
        count += 1
    return count


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
    """Per-record mean next-token cross-entropy over the labelled tokens (labels != -100); `per_sample_lm_loss`'s
    value, but the LM head and its softmax run only where a label is.

    The head over a 49k vocabulary is about a fifth of a forward pass, and its logits (float32, [B, L, V]) are
    the largest tensor of a training step; prompt and padding positions need neither. The model is still called
    through `module` (Opacus, DDP and DeepSpeed wrappers see their forward); position ids are passed per row
    for Opacus' per-sample shapes. A head with trainable weights gets every position, so that Opacus sees one
    row per record in it.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    head = _causal_lm(module).get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()):  # a trained head (LoRA on lm_head) needs per-row inputs
        return per_sample_lm_loss(module(**inputs).logits, batch["labels"])  # for its per-sample gradients
    targets = batch["labels"][:, 1:]
    labelled = targets != -100
    with _head_only_at(head, torch.nn.functional.pad(labelled, (0, 1))):  # position t predicts label t + 1
        logits = module(**inputs).logits  # [labelled tokens, vocab]
    token_loss = torch.nn.functional.cross_entropy(logits.float(), targets[labelled], reduction="none")
    rows = labelled.nonzero(as_tuple=True)[0]
    total = torch.zeros(len(targets), dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    return total / labelled.sum(dim=1).clamp(min=1)


@contextlib.contextmanager
def _head_only_at(head: torch.nn.Module, positions: torch.Tensor):
    """While inside, the model's output head (any causal LM's `get_output_embeddings`) sees only the hidden states
    at `positions` ([B, L] bool): a pre-hook, so whatever the model does after the head (Gemma's logit
    soft-capping) still applies, now to [K, vocab] logits."""
    handle = head.register_forward_pre_hook(lambda _head, args: (args[0][positions], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside Opacus / DDP / DeepSpeed / peft wrappers (LoRA or full fine-tune)."""
    from transformers import PreTrainedModel

    model = _unwrap(model, (PeftModel, PreTrainedModel))
    return model.get_base_model() if isinstance(model, PeftModel) else model


def example_tokens(example) -> int:
    """A tokenized example's length: what the trainers group physical micro-batches by, so little is padding."""
    return len(example.input_ids)


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    """peft's own format (adapter_model.safetensors + adapter_config.json): what a server loads with peft/vLLM."""
    unwrap_peft(model).save_pretrained(str(out))


def load_adapter(model: torch.nn.Module, src: Path) -> None:
    set_peft_model_state_dict(unwrap_peft(model), load_file(str(Path(src) / "adapter_model.safetensors")))


def unwrap_peft(model: torch.nn.Module) -> PeftModel:
    """Unwrap Opacus' GradSampleModule / DeepSpeed to the PeftModel."""
    return _unwrap(model, PeftModel)


def _unwrap(model: torch.nn.Module, kinds: type | tuple[type, ...]) -> torch.nn.Module:
    """Strip Opacus (`_module`) and DDP / DeepSpeed (`module`) wrappers down to an instance of `kinds`."""
    while not isinstance(model, kinds):
        model = model._module if hasattr(model, "_module") else model.module
    return model


def lm_builder(model_path: str, lora: LoraSection, seed: int):
    """A picklable `(device) -> model` for `DPTask.build_model`."""
    return partial(build_lora_lm, model_path=model_path, lora=lora, seed=seed)
