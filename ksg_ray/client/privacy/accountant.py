"""Privacy accounting: calibrate σ for a whole run, and ε of a composed history of mechanisms.

A history is a list of Poisson-subsampled Gaussian mechanisms (σ, q, steps), as Opacus' accountants keep it;
composing two models trained on the same records is concatenating their histories. The published KnowledgeSG
code calibrated σ for 10 steps and then ran 100 rounds with a fresh accountant each round; here σ is
calibrated for the whole run, and the history survives checkpoints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from ksg_ray.common.errors import KsgError


class PrivacyPlanError(KsgError, ValueError):
    """A DP plan that cannot be met (ε ≤ 0, or a σ no search reaches), or a resume that would change it."""

__all__ = ["ACCOUNTANTS", "Mechanism", "calibrate_noise", "epsilon_for", "smallest_sigma"]

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
    """Smallest σ (ε within `EPSILON_TOLERANCE` under the target, as Opacus' `get_noise_multiplier`) so that
    `steps` steps at rate q spend at most `target_epsilon`; 0 for ε = inf.

    With `prior_history` (what the runs this one composes with spent), the target is the composed ε of those
    runs and this one.

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
    if spent >= target_epsilon - EPSILON_TOLERANCE:
        raise PrivacyPlanError(f"the runs this one composes with already spent ε={spent:.3f} of the total "
                               f"target ε={target_epsilon}: nothing is left for this run")

    def composed(s: float) -> float:
        return epsilon_for([*prior_history, (s, sample_rate, steps)], delta, accountant)

    try:  # the composed ε needs at least the noise of this run alone
        return smallest_sigma(composed, target_epsilon, low=sigma)
    except PrivacyPlanError as e:
        raise PrivacyPlanError(f"cannot reach a total ε={target_epsilon} after ε={spent:.3f} already spent") from e


EPSILON_TOLERANCE = 0.01  # Opacus' default: the calibrated σ spends between target - 0.01 and the target
MAX_SIGMA = 1e4


def smallest_sigma(epsilon_at: Callable[[float], float], target: float, low: float | None = None,
                   high: float | None = None, tolerance: float = EPSILON_TOLERANCE) -> float:
    """The σ whose ε (`epsilon_at`, decreasing in σ) lies in (target - tolerance, target].

    A bracketed false position on log ε against log σ (Illinois), aimed at target - tolerance/2: ε is nearly
    a power of σ, so it lands in the band in 1-3 accountant calls after the bracket, where Opacus' bisection
    from [0, 20] makes about 14 (each PRV call ~0.6 s on a 2-core CPU). `low`/`high` are guesses: a bracket
    that does not hold is widened.

    Raises:
        PrivacyPlanError: no σ up to `MAX_SIGMA` reaches the target.
    """
    def log_gap(eps: float) -> float:  # > 0: too little noise (+inf: unbounded ε); -inf: ε = 0
        return math.log(eps / aim) if eps > 0 else -math.inf

    aim = target - tolerance / 2
    hi = high or (2 * low if low else 1.0)
    e_hi = epsilon_at(hi)
    lo, e_lo = (low, None) if low and low < hi else (None, None)
    while e_hi > target:  # too little noise: double
        lo, e_lo, hi = hi, e_hi, 2 * hi
        if hi > MAX_SIGMA:
            raise PrivacyPlanError(f"no σ up to {MAX_SIGMA:g} reaches ε={target}")
        e_hi = epsilon_at(hi)
    if lo is None:
        lo = hi / 2
    if e_lo is None:
        e_lo = epsilon_at(lo)
    while e_lo <= target:  # already enough noise at the low end: halve
        if target - e_lo <= tolerance or lo < 1e-6:
            return lo
        hi, e_hi, lo = lo, e_lo, lo / 2
        e_lo = epsilon_at(lo)
    kept = 0  # which end the last step kept (Illinois: halve a stale end's gap)
    g_lo, g_hi = log_gap(e_lo), log_gap(e_hi)
    while target - e_hi > tolerance:
        x_lo, x_hi = math.log(lo), math.log(hi)
        if math.isfinite(g_lo) and math.isfinite(g_hi) and g_lo != g_hi:
            x = x_hi - g_hi * (x_hi - x_lo) / (g_hi - g_lo)
            x = min(max(x, x_lo + 0.01 * (x_hi - x_lo)), x_hi - 0.01 * (x_hi - x_lo))
        else:
            x = (x_lo + x_hi) / 2
        s = math.exp(x)
        e = epsilon_at(s)
        if e <= target:
            hi, e_hi, g_hi = s, e, log_gap(e)
            g_lo = g_lo / 2 if kept == -1 else g_lo
            kept = -1
        else:
            lo, e_lo, g_lo = s, e, log_gap(e)
            g_hi = g_hi / 2 if kept == 1 else g_hi
            kept = 1
        if hi - lo < 1e-9 * hi:
            break
    return hi


@functools.lru_cache(maxsize=256)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ for one run, once per process and plan; for PRV, the bracket is [0.9, 1] × RDP's σ (RDP's ε bounds PRV's
    from above, and costs milliseconds a call), so 3-4 PRV calls settle it."""
    def at(acc: str) -> Callable[[float], float]:
        return lambda s: epsilon_for([(s, sample_rate, steps)], delta, acc)

    try:
        high = smallest_sigma(at("rdp"), target_epsilon)
        if accountant == "rdp":
            return high
        return smallest_sigma(at(accountant), target_epsilon, low=0.9 * high, high=high)  # PRV's σ: 0.92-0.95 of it
    except PrivacyPlanError as e:
        raise PrivacyPlanError(f"cannot reach ε={target_epsilon} at δ={delta}, q={sample_rate:.4f}, {steps} steps: "
                               f"{e}") from e
