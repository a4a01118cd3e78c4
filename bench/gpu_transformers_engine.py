"""The transformers engine on a GPU: batched generation vs a per-prompt loop, scoring, and CPU/GPU agreement.

    python bench/gpu_transformers_engine.py MODEL_DIR [--layers 30] [--batch 64]

Needs no Ray, vLLM or model download: the model is SmolLM2-135M's shape with random weights, built from the config
and tokenizer in MODEL_DIR (e.g. `~/.cache/ksg-ray/smollm2-135m`; its weights are not read). It checks, on CUDA:
  - greedy answers of a left-padded batch equal the answers of the same prompts one at a time (fp32), and equal
    the CPU engine's answers for the same weights;
  - `score` (the perplexity stage's log-likelihoods) agrees with the CPU engine's;
and times, in bf16, the batched engine against a per-prompt loop (the ratio synthesis gains from batching).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _random_model(tokenizer_dir: Path, out: Path, layers: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(tokenizer_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = AutoConfig.from_pretrained(tokenizer_dir)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--loop-prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import torch

    from ksg_ray.engines import SamplingParams
    from ksg_ray.engines.transformers_engine import TransformersEngine

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    model = _random_model(args.tokenizer_dir, Path(tempfile.mkdtemp()) / "model", args.layers)
    prompts = [[{"role": "user", "content": f"Give me health tip number {i}" + " please" * (i % 7)}]
               for i in range(args.prompts)]

    # correctness, fp32: batch vs one at a time on CUDA, CUDA vs CPU
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    gpu32 = TransformersEngine(str(model), device="cuda", dtype="float32", batch_size=8)
    cpu32 = TransformersEngine(str(model), device="cpu", dtype="float32", batch_size=8)
    few = prompts[:8]
    batched = [g[0].text for g in gpu32.generate(few, greedy)]
    single = [gpu32.generate([p], greedy)[0][0].text for p in few]
    on_cpu = [g[0].text for g in cpu32.generate(few, greedy)]
    same_single = sum(a == b for a, b in zip(batched, single, strict=True))
    same_cpu = sum(a == b for a, b in zip(batched, on_cpu, strict=True))
    print(f"greedy, fp32: batched == one at a time on CUDA for {same_single}/8 prompts; CUDA == CPU for {same_cpu}/8")
    answers = ["Drink water and rest.", "See a doctor if the fever lasts more than three days."] * 4
    diff = max(abs(a - b) for a, b in zip(gpu32.score(few, answers), cpu32.score(few, answers), strict=True))
    print(f"score (sum of answer log-probs), CUDA vs CPU: max |difference| {diff:.2e}")
    del gpu32, cpu32

    # throughput, bf16: every answer forced to --tokens new tokens
    engine = TransformersEngine(str(model), device="cuda", dtype="bfloat16", batch_size=args.batch)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=args.tokens, stop_at_eos=False, seed=0)
    engine.generate(prompts[:args.batch], params)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(g.num_tokens for gens in engine.generate(prompts, params) for g in gens)
    torch.cuda.synchronize()
    batched_tps = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    loop_tokens = sum(g.num_tokens for p in prompts[:args.loop_prompts] for g in engine.generate([p], params)[0])
    torch.cuda.synchronize()
    loop_tps = loop_tokens / (time.perf_counter() - start)
    n_params = sum(p.numel() for p in engine.model.parameters()) / 1e6
    print(f"model: SmolLM2-135M's shape, {args.layers} layers ({n_params:.0f}M parameters, random weights), bf16")
    print(f"batched ({args.prompts} prompts x {args.tokens} tokens, batch {args.batch}): {batched_tps:9.1f} tokens/s")
    print(f"per-prompt loop ({args.loop_prompts} prompts):                     {loop_tps:9.1f} tokens/s")
    print(f"batched / loop: {batched_tps / loop_tps:.1f}")


if __name__ == "__main__":
    main()
