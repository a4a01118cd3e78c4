"""Privacy accounting: calibrate σ for a whole run, and ε of a composed history of mechanisms.

A history is a list of Poisson-subsampled Gaussian mechanisms (σ, q, steps), as Opacus' accountants keep it;
composing two models trained on the same records is concatenating their histories. The published KnowledgeSG
code calibrated σ for 10 steps and then ran 100 rounds with a fresh accountant each round; here σ is
calibrated for the whole run, and the history survives checkpoints.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ksg_ray.common.errors import KsgError


class PrivacyPlanError(KsgError, ValueError):
    """A DP plan that cannot be met (ε ≤ 0, or a σ no search reaches), or a resume that would change it."""

__all__ = ["ACCOUNTANTS", "Mechanism", "calibrate_noise", "epsilon_for"]

ACCOUNTANTS = ("prv", "rdp")


@dataclass
class Mechanism:
    """One DP training run: `steps` Poisson-subsampled Gaussian steps with noise multiplier σ and rate q.

    `run_id` names the run (its kind, and a nonce drawn whenever it starts from step 0): only a resume from its
    checkpoint keeps it; any other run gets a new one, so the ledger counts it again. `records` is the run's own
    N (q = B/N reveals it anyway); 0 = not recorded (older ledgers).
    """

    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    run_id: str = ""
    records: int = 0

    @property
    def key(self) -> str:
        """What identifies this run in a ledger (legacy entries without a run id: their name)."""
        return self.run_id or self.name

    def history(self) -> list[tuple[float, float, int]]:
        """Opacus accountant history entries; a σ=0 (non-private) run has no finite ε and no entry."""
        return [(self.noise_multiplier, self.sample_rate, self.steps)] if self.steps > 0 else []


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """ε of a composed history of (σ, q, steps) under `accountant`; inf if any step was non-private."""
    if any(sigma <= 0 for sigma, _, steps in history if steps > 0):
        return math.inf
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """ε of a history, computed once per process: a run asks for the same history's ε several times (each step's
    metrics, its report, the ledger's checks), and Opacus' PRV accountant takes about half a second a call on a
    2-core CPU (most of it in the RDP bound of its domain size)."""
    from opacus.accountants import PRVAccountant, RDPAccountant  # here: opacus imports torch (seconds), and the
    # ledger that imports this module is also behind `ksg --help` and `ksg bundle verify`

    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
    prior_history: list[tuple[float, float, int]] | None = None,
) -> float:
    """Smallest σ (within 1%) so that `steps` steps at rate q spend at most `target_epsilon`; 0 for ε = inf.

    With `prior_history` (what the runs this one composes with spent), the target is the composed ε of those
    runs and this one: σ is bisected on the composed history.

    Raises:
        ValueError: the target is not positive or cannot be reached.
    """
    if math.isinf(target_epsilon):
        return 0.0
    if target_epsilon <= 0:
        raise PrivacyPlanError(f"privacy.target_epsilon must be > 0, got {target_epsilon}")
    sigma = _noise_multiplier(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant)
    if not prior_history:
        return sigma
    spent = epsilon_for(prior_history, delta, accountant)
    if spent >= target_epsilon - 0.01:
        raise PrivacyPlanError(f"the runs this one composes with already spent ε={spent:.3f} of the total "
                               f"target ε={target_epsilon}: nothing is left for this run")

    def composed(s: float) -> float:
        return epsilon_for([*prior_history, (s, sample_rate, steps)], delta, accountant)

    low, high = sigma, 2 * sigma  # the composed ε needs at least the noise of this run alone
    while composed(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise PrivacyPlanError(f"cannot reach a total ε={target_epsilon} after ε={spent:.3f} already spent")
    while high - low > 0.005 * high:  # within 0.5%: the composed ε lands just under the target
        mid = (low + high) / 2
        low, high = (low, mid) if composed(mid) <= target_epsilon else (mid, high)
    return high


@functools.lru_cache(maxsize=256)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus' σ search (about 14 accountant calls: seconds on a 2-core CPU), once per process and plan."""
    from opacus.accountants.utils import get_noise_multiplier  # imports torch: only where σ is calibrated

    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant, epsilon_tolerance=0.01,
        ))
    except ValueError as e:
        raise PrivacyPlanError(
            f"cannot reach ε={target_epsilon} at δ={delta}, q={sample_rate:.4f}, {steps} steps: {e}"
        ) from e
