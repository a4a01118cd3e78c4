"""One DP-SGD step that works the same under plain data parallelism and under DeepSpeed.

Opacus wraps the optimizer (`DPOptimizer`) and knows DDP, but not DeepSpeed, whose engine reduces gradients
inside its own `backward`. So the step is split where the privacy argument needs it:

1. `clipped_sum`: per-sample gradients of the trainable parameters (Opacus `GradSampleModule` hooks, fired by
   `torch.autograd.grad` so no framework reducer sees them), each clipped to `max_grad_norm`, summed locally.
2. `noised_sum`: rank 0 adds N(0, σ²C²) noise to its local sum before any reduction. The other ranks' clipped
   sums are reduced unnoised among the training workers (a ring all-reduce passes partial sums between them),
   which is fine because every worker runs on the client; only the noised total leaves the training job.
3. Reduction: `ddp` all-reduces the noised sums and sets `p.grad = total / expected_batch_size`; `deepspeed`
   runs the engine's own backward on the linear surrogate `Σ_p <p, g_p>·W/B`, whose gradient is exactly the
   noised sum, so DeepSpeed (ZeRO 1–3) reduces it as it would any gradient.

Noise uses Opacus' own generator calls in Opacus' parameter order, so a step equals a single-process Opacus
`DPOptimizer` step on the union of the workers' records (tested). The noise and sampling seeds are secret by
default: anyone who knows them can subtract the noise.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from opacus.grad_sample import GradSampleModule
from opacus.optimizers.optimizer import _generate_noise

__all__ = ["DPSGD", "poisson_sample"]

# TEST ONLY: "1" drops the noise while σ, and so the claimed ε, stay as planned: a planted bug that the one-run
# audit (`ksg audit one-run`, tests/test_one_run_audit.py) must catch. Never set it outside that test.
TEST_ONLY_NO_NOISE_ENV = "KSG_TEST_ONLY_DISABLE_DP_NOISE"



def poisson_sample(num_records: int, sample_rate: float, seed: int, step: int, rank: int, world_size: int) -> list[int]:
    """Indices of this rank's shard (records rank, rank+W, ...) each drawn independently with probability q.

    Every rank samples its own shard at the same rate, so the union over ranks is a Poisson sample of the whole
    dataset at rate q — the assumption of the accountant. Seeded by (seed, step, rank) so a resumed run
    replays exactly the batch it lost rather than drawing a new one.
    """
    shard = torch.arange(rank, num_records, world_size)
    g = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
    keep = torch.rand(len(shard), generator=g) < sample_rate
    return shard[keep].tolist()


class DPSGD:
    """Per-sample clipping, noise and reduction for one model on one worker.

    Args:
        module: the model; only parameters with `requires_grad` are trained (LoRA, a reward head).
        max_grad_norm: per-record clip norm C.
        noise_multiplier: σ (0 = the non-private baseline through the same code).
        expected_batch_size: q·N, the Poisson sample's expected size; the noised sum is divided by it.
        rank, world_size: the worker's place in the data-parallel group.
        noise_seed: only rank 0 draws noise; None = a secret random seed.
    """

    def __init__(
        self, module: torch.nn.Module, *, max_grad_norm: float, noise_multiplier: float, expected_batch_size: float,
        rank: int = 0, world_size: int = 1, noise_seed: int | None = None,
    ):
        if max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {max_grad_norm}")
        self.module = module if isinstance(module, GradSampleModule) else GradSampleModule(
            module, batch_first=True, loss_reduction="sum")
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=self.params[0].device)
        self.generator.manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)

    def clipped_sum(
        self, batches: Iterable[dict[str, torch.Tensor]], loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    ) -> tuple[list[torch.Tensor], float, int]:
        """Σ_i clip(∇L_i) over this worker's records, processed in physical chunks.

        Args:
            batches: chunks of this worker's Poisson sample (any sizes; may be empty).
            loss_fn: (module, chunk) -> per-record losses of shape [B]; row i of the chunk is record i (a record
                of several texts, like a reward model's candidate answers, is packed into one row), so the
                per-sample gradients Opacus computes are per record.

        Returns:
            (per-parameter clipped sums in float32, sum of the records' losses, number of records).

        The forward and backward may run under bf16 autocast; from the per-sample gradients on, everything is
        float32 with autocast off (norms, clip factors, sums, and later the noise), so one record moves the sum
        by at most C up to float32 rounding, whatever the compute dtype.
        """
        # ds_shape: DeepSpeed ZeRO-3 keeps a partition in p and the full shape beside it.
        sums = [torch.zeros(getattr(p, "ds_shape", p.shape), dtype=torch.float32, device=p.device)
                for p in self.params]
        loss_total, count = 0.0, 0
        self.module.train()
        for chunk in batches:
            losses = loss_fn(self.module, chunk)
            torch.autograd.grad(losses.sum(), self.params)  # fires the grad-sample hooks; result unused
            with torch.autocast(self.params[0].device.type, enabled=False):
                grad_samples = [p.grad_sample.float() for p in self.params]
                norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples],
                                    dim=1).norm(2, dim=1)
                factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
                for s, g in zip(sums, grad_samples, strict=True):
                    s += torch.einsum("i,i...", factor, g)
            for p in self.params:
                p.grad_sample = None
            loss_total += float(losses.detach().sum())
            count += len(losses)
        return sums, loss_total, count

    def lockstep_pass(self, batch: dict[str, torch.Tensor], loss_fn) -> None:
        """A forward/backward whose result is discarded: keeps a rank with fewer records in step with the others
        where every forward is a collective (DeepSpeed ZeRO-3 gathers parameters per layer)."""
        losses = loss_fn(self.module, batch)
        torch.autograd.grad(losses.sum(), self.params)
        for p in self.params:
            p.grad_sample = None

    def noised_sum(self, sums: list[torch.Tensor]) -> list[torch.Tensor]:
        """Add the step's Gaussian noise on rank 0 (other ranks' sums pass through)."""
        if self.rank != 0:
            return sums
        if os.environ.get(TEST_ONLY_NO_NOISE_ENV) == "1":  # TEST ONLY: the planted bug (see above)
            return sums
        std = self.noise_multiplier * self.max_grad_norm
        return [s + _generate_noise(std=std, reference=s, generator=self.generator) for s in sums]

    def all_reduce_grads(self, sums: list[torch.Tensor]) -> None:
        """`ddp` reduction: p.grad = (Σ over workers of the noised local sums) / expected batch size."""
        for p, s in zip(self.params, sums, strict=True):
            if self.world_size > 1:
                dist.all_reduce(s, op=dist.ReduceOp.SUM)
            p.grad = (s / self.expected_batch_size).view_as(p).to(p.dtype)

    def surrogate_loss(self, sums: list[torch.Tensor], grad_average_world_size: int) -> torch.Tensor:
        """A loss whose gradient is `sums · W / B`: a framework that averages gradients over W workers
        (DeepSpeed) then holds Σ noised sums / B in each parameter's gradient."""
        scale = grad_average_world_size / self.expected_batch_size
        return sum((p * (s.detach() * scale).to(p.dtype)).sum() for p, s in zip(self.params, sums, strict=True))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
