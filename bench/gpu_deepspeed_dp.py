"""GPU check of the DeepSpeed DP path: NCCL, ZeRO-3 on CUDA, fp32 equality with Opacus, bf16 autocast.

    python bench/gpu_deepspeed_dp.py   # on a CUDA machine (1 GPU is enough: world size 1, NCCL)

Ray Train is not needed for what this proves (the step itself); the same functions run inside the Ray worker loop.
Prints the max difference between a DeepSpeed ZeRO-3 DP step and a single-process Opacus DPOptimizer step
(fp32), then times DP vs non-DP steps under bf16 autocast on a ~0.3B-parameter random Llama.
"""

from __future__ import annotations

import os
import time
import warnings

import torch
import torch.distributed as dist


def _model(hidden: int, layers: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    base = LlamaForCausalLM(cfg).cuda()
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))


def _batch(b: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32000, (b, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
           "position_ids": torch.arange(seq).expand(b, seq).clone()}
    return {k: v.cuda() for k, v in out.items()}


def equality(sigma=0.8, clip=0.05, seed=7) -> float:
    import deepspeed
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from ksg_ray.client.dp_trainer import DPRunSpec, _deepspeed_config, _full_params
    from ksg_ray.client.privacy.dp_sgd import DPSGD
    from ksg_ray.common.lora import lm_loss

    batch = _batch(6, 64)
    ref = _model(256, 2)
    gsm = GradSampleModule(ref, batch_first=True, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                      expected_batch_size=6, generator=torch.Generator(device="cuda").manual_seed(seed))
    lm_loss(gsm, batch).mean().backward()
    opt.step()
    want = {k: v.detach().clone() for k, v in ref.state_dict().items() if "lora_" in k}

    model = _model(256, 2)
    dp = DPSGD(model, max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=6, noise_seed=seed)
    spec = DPRunSpec(steps=1, sample_rate=1.0, noise_multiplier=sigma, max_grad_norm=clip, delta=1e-5, lr=1.0,
                     physical_batch_size=6, checkpoint_every=1, strategy="deepspeed", zero_stage=3)
    engine, _, _, _ = deepspeed.initialize(model=dp.module, optimizer=torch.optim.SGD(dp.params, lr=1.0),
                                           config=_deepspeed_config(spec, 1))
    sums, _, _ = dp.clipped_sum([batch], lm_loss)
    with _full_params(engine, dp.params):
        engine.backward(dp.surrogate_loss(dp.noised_sum(sums), 1))
    engine.step()
    with _full_params(engine, dp.params):
        got = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def timing(hidden=1024, layers=16, b=8, seq=256, steps=5) -> dict:
    from ksg_ray.client.privacy.dp_sgd import DPSGD
    from ksg_ray.common.lora import lm_loss

    res = {}
    for mode in ("plain", "dp"):
        model = _model(hidden, layers)
        batch = _batch(b, seq)
        if mode == "dp":
            dp = DPSGD(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=b)
            opt = torch.optim.AdamW(dp.params, lr=1e-4)

            def step(dp=dp, batch=batch, opt=opt):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    sums, _, _ = dp.clipped_sum([batch], lm_loss)
                dp.all_reduce_grads(dp.noised_sum(sums))
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step(model=model, batch=batch, opt=opt):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = lm_loss(model, batch).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        res[mode] = ((time.perf_counter() - t) / steps, torch.cuda.max_memory_allocated())
        del model, opt, step
        torch.cuda.empty_cache()
    return res


def main() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, backend {dist.get_backend()}")
    print(f"DeepSpeed ZeRO-3 DP step vs Opacus DPOptimizer (fp32, CUDA): max |Δ| = {equality():.2e}")
    r = timing()
    (tp, mp), (td, md) = r["plain"], r["dp"]
    print(f"bf16 autocast, random Llama 1024x16 + LoRA r8, batch 8 x 256: non-DP {tp * 1e3:.1f} ms "
          f"{mp / 2**30:.2f} GiB, DP {td * 1e3:.1f} ms {md / 2**30:.2f} GiB -> "
          f"time x{td / tp:.2f}, memory x{md / mp:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
