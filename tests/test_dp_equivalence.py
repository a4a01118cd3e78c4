"""One distributed DP step (2 Ray Train workers) equals a single-process Opacus DP-SGD step.

Same seed, same sampled records (the union of the two ranks' Poisson samples), same noise (Opacus' own
generator calls): with SGD at lr=1 the parameter update *is* the noised, clipped, averaged gradient, so the
adapters after one step must agree to float tolerance — for `ddp` and for `deepspeed` (ZeRO on CPU, gloo).
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from conftest import skip_without_extra
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from safetensors.torch import load_file

from ksg_ray.client.dp_trainer import DPRunSpec, DPTask, fit_dp
from ksg_ray.client.privacy.dp_sgd import poisson_sample
from ksg_ray.common.chat_format import collate, tokenize_records
from ksg_ray.common.lora import build_lora_lm, lm_builder, lm_loss, load_adapter, save_adapter
from ksg_ray.common.records import load_records
from ksg_ray.common.sections import LoraSection, ScalingSection

pytestmark = pytest.mark.e2e  # real Ray clusters and trainings: the long tests, at their smallest settings

N, Q, SIGMA, CLIP, NOISE_SEED, SAMPLING_SEED = 12, 0.5, 0.7, 0.05, 1234, 99
LORA = LoraSection(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def examples(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    # question_loss: the generator as it is trained (its loss covers the question too)
    exs, _ = tokenize_records(tok, load_records("demo", limit=N), max_seq_len=48, question_loss=True)
    return exs, tok.pad_token_id


def _spec(strategy: str, zero_stage: int = 1) -> DPRunSpec:
    return DPRunSpec(steps=1, sample_rate=Q, noise_multiplier=SIGMA, max_grad_norm=CLIP, delta=1e-5, lr=1.0,
                     physical_batch_size=3, checkpoint_every=1, strategy=strategy, zero_stage=zero_stage,
                     optimizer="sgd", num_records=N, sampling_seed=SAMPLING_SEED, noise_seed=NOISE_SEED)


def _reference_adapter(model_path, examples, pad_id) -> dict[str, torch.Tensor]:
    """Plain single-process Opacus: GradSampleModule + DPOptimizer over the union of both ranks' samples."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    idx = poisson_sample(N, Q, SAMPLING_SEED, 0, 0, 2) + poisson_sample(N, Q, SAMPLING_SEED, 0, 1, 2)
    assert idx, "the seed must sample at least one record"
    model = build_lora_lm(torch.device("cpu"), model_path=model_path, lora=LORA, seed=0)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                      expected_batch_size=int(Q * N), loss_reduction="mean",
                      generator=torch.Generator().manual_seed(NOISE_SEED))
    batch = collate([examples[i] for i in idx], pad_token_id=pad_id)
    lm_loss(gsm, batch).mean().backward()
    opt.step()
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def _ray_adapter(tmp_path, model_path, examples, pad_id, strategy, zero_stage=1) -> dict[str, torch.Tensor]:
    task = DPTask(name="generator", build_model=lm_builder(model_path, LORA, 0), examples=examples,
                  collate=partial(collate, pad_token_id=pad_id), loss_fn=lm_loss, save=save_adapter, load=load_adapter)
    ckpt, metrics = fit_dp(task, _spec(strategy, zero_stage), scaling=ScalingSection(num_workers=2),
                           output_dir=tmp_path, name=f"eq-{strategy}{zero_stage}", max_failures=0)
    assert metrics["step"] == 1
    return load_file(str(ckpt / "model" / "adapter_model.safetensors"))


def _assert_same(ray_sd: dict, ref_sd: dict, init: dict) -> None:
    moved = 0.0
    for key, ref in ref_sd.items():
        short = key.replace(".default", "")
        got = ray_sd[short]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=f"{key} differs")
        moved = max(moved, float((ref - init[key]).abs().max()))
    assert moved > 1e-3, "the step must actually change the adapter (noise + clipped gradient)"


@pytest.mark.parametrize("strategy,zero_stage", [
    ("ddp", 1),
    pytest.param("deepspeed", 2, marks=pytest.mark.deepspeed),
    pytest.param("deepspeed", 3, marks=pytest.mark.deepspeed),  # frozen base partitioned too
])
def test_distributed_dp_step_equals_single_process_opacus(ray_cluster, tmp_path, tiny_model_path, examples,
                                                          strategy, zero_stage):
    if strategy == "deepspeed":
        skip_without_extra("deepspeed")
    exs, pad_id = examples
    init = build_lora_lm(torch.device("cpu"), model_path=tiny_model_path, lora=LORA, seed=0).state_dict()
    ref = _reference_adapter(tiny_model_path, exs, pad_id)
    got = _ray_adapter(tmp_path, tiny_model_path, exs, pad_id, strategy, zero_stage)
    _assert_same(got, ref, init)
