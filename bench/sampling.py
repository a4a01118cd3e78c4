"""Seeded sampled generation: the inverse-CDF sampler against the Gumbel-noise one it replaced, side by side.

    python bench/sampling.py [--prompts 32] [--rounds 2] [--threads 2]

Both are `RowSeededSampling`s (one generator per row, so a row's samples do not depend on its batch); the Gumbel
one, kept here as the reference, added noise to every token of the vocabulary (one uniform and two logarithms per
token per row per step), the engine's draws one uniform per row and inverts the CDF of the row's nucleus
(`sample_top_p`). The same exact distribution, other random streams, so the token counts differ a little; the
figure is tokens/s. The prompts are the embedded default's answer prompts (its synthesis settings: temperature,
top-p, `n`, max new tokens, batch) on the packaged demo questions; rounds alternate so drift hits both alike.
Run it with MKL's Intel path (`eval "$(python -m ksg_ray.common.cpu_blas)"`), as `ksg` runs.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LogitsProcessor


class GumbelSampling(LogitsProcessor):
    """The sampler before session 29: Gumbel-max over the tempered, top-p-cut logits."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            logits = logits.masked_fill(top_p_cut(logits, self.top_p), float("-inf"))
        uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))
        return torch.log_softmax(logits, dim=-1) + gumbel.to(logits.device)


def top_p_cut(logits: torch.Tensor, top_p: float, k: int = 1024) -> torch.Tensor:
    """The positions outside each row's nucleus, from `topk(k)` (a full sort for a row whose top k fall short)."""
    probs = torch.softmax(logits, dim=-1)
    top, order = torch.topk(probs, min(k, logits.shape[-1]), dim=-1)
    mass_before = top.cumsum(dim=-1) - top
    cut = torch.ones_like(logits, dtype=torch.bool).scatter(1, order, mass_before >= top_p)
    short = (mass_before[:, -1] + top[:, -1] < top_p).nonzero().flatten()
    if short.numel():
        full, full_order = torch.sort(probs[short], descending=True, dim=-1)
        full_cut = (full.cumsum(dim=-1) - full) >= top_p
        cut[short] = full_cut.scatter(1, full_order, full_cut)
    return cut


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ksg_ray.common.config import load_config
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.records import load_records
    from ksg_ray.engines import SamplingParams
    from ksg_ray.engines import transformers_engine as te
    from ksg_ray.pipeline.config import PipelineConfig
    from ksg_ray.server.synth import prompts
    from ksg_ray.server.synth.config import SynthConfig

    stage = load_config(PipelineConfig, "configs/pipeline.yaml").synthesize
    cfg = load_config(SynthConfig, stage.config, stage.overrides)
    questions = [r.input for r in load_records("demo", limit=args.prompts)]
    messages = [prompts.answer_messages(cfg.domain, q) for q in questions]
    a = cfg.answers
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens, n=a.n,
                            seed=cfg.seed)
    engine = te.TransformersEngine(resolve_model("smollm2-135m"), batch_size=cfg.engine.batch_size)
    print(f"smollm2-135m, {len(messages)} demo questions x {a.n} samples, <= {a.max_new_tokens} tokens, temperature "
          f"{a.temperature}, top-p {a.top_p}, batch {cfg.engine.batch_size}, {args.threads} threads")
    engine_sampler, rates = te.RowSeededSampling, {}
    try:
        for _ in range(args.rounds):
            for name, sampler in (("gumbel", GumbelSampling), ("inverse CDF", engine_sampler)):
                te.RowSeededSampling = sampler  # what `generate` builds for seeded rows
                start = time.perf_counter()
                out = engine.generate(messages, params, seeds=list(range(len(messages))))
                seconds = time.perf_counter() - start
                tokens = sum(g.num_tokens for gens in out for g in gens)
                rates.setdefault(name, []).append(tokens / seconds)
                print(f"{name:12s} {seconds:6.1f} s  {tokens} tokens  {tokens / seconds:6.1f} tokens/s", flush=True)
    finally:
        te.RowSeededSampling = engine_sampler
    ratio = sum(rates["inverse CDF"]) / sum(rates["gumbel"])
    print(f"inverse CDF / gumbel tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
