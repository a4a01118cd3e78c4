"""bench/cpu_limits.py: its FLOP counts match the models' weights, and its matmul probe runs (in process, tiny)."""

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("cpu_limits", Path(__file__).parents[1] / "bench" / "cpu_limits.py")
cpu_limits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_limits)


def test_linear_flops_are_twice_the_matmul_weights(smollm2_path):
    """2 FLOPs per weight of every matmul (the tied embedding counted once, as the lm head)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_path))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    m = cpu_limits.flop_model(json.loads(Path(smollm2_path, "config.json").read_text()))
    assert m["linear"] == 2 * weights
    assert 130e6 < weights < 140e6  # SmolLM2-135M


def test_lora_flops_are_twice_the_adapter_weights(tiny_model_path):
    from ksg_ray.common.lora import build_lora_lm
    from ksg_ray.common.sections import LoraSection

    model = build_lora_lm(torch.device("cpu"), model_path=tiny_model_path, lora=LoraSection())
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    m = cpu_limits.flop_model(json.loads(Path(tiny_model_path, "config.json").read_text()))
    assert m["lora"] == 2 * adapter


def test_matmul_probe_runs():
    out = cpu_limits.worker_peak(Namespace(matmul_n=64, mkl_only=0))
    assert {"mkl_fp32", "onednn_fp32", "bf16"} <= out.keys() and out["mkl_fp32"] > 0
    assert out["mkl_fp32_rel_err"] < 1e-5
