"""SERVER SIDE — load the client's models from the transfer bundle alone (no data path anywhere).

The bundle names its public base model in each component's `model_ref.json`; the base is provisioned by
`resolve_model` and the component's adapter (and, for the reward model, its scalar head) loaded on top.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ksg_ray.bundle import read_model_ref, verify_bundle
from ksg_ray.common.hub import resolve_model

__all__ = ["component_base", "load_generator", "load_reward"]


def component_base(bundle_dir: str | Path, component: str) -> str:
    """Local path of the component's public base model."""
    return resolve_model(read_model_ref(bundle_dir, component)["base_model"])


def load_generator(bundle_dir: str | Path, device: str = "cpu"):
    """(causal LM with the DP adapter, tokenizer), after verifying the bundle."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify_bundle(Path(bundle_dir))
    base_path = component_base(bundle_dir, "generator")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(Path(bundle_dir) / "generator")).to(device).eval()
    return model, AutoTokenizer.from_pretrained(base_path)


def load_reward(bundle_dir: str | Path, device: str = "cpu"):
    """(reward model: base + LoRA + scalar head, tokenizer), after verifying the bundle."""
    from ksg_ray.common.reward_model import load_reward_model

    verify_bundle(Path(bundle_dir))
    return load_reward_model(Path(bundle_dir) / "reward", component_base(bundle_dir, "reward"), device)
