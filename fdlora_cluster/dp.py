"""Client-level differential privacy on the global adapter (`privacy:` in the config): the
clip each leader applies to its update, the seeded Gaussian noise the server adds to the sum,
and the privacy loss from a maintained accountant (Google's `dp-accounting`; nothing here is a
hand-written bound). Floor 1: no MPI, no config import.

The mechanism, per round (DP-FedAvg, McMahan et al., ICLR 2018, with fixed participation):
  - each leader clips its change `delta_i = trained global - received global` to L2 norm C
    (`clip`), so one client moves the sum of changes by at most C;
  - the server adds z ~ N(0, (sigma * C)^2) per coordinate to the SUM of the clipped changes,
    once per round (`add_noise`), then divides by the number of updates it averaged.
Each round that releases a global adapter is one Gaussian mechanism of noise multiplier sigma
(sensitivity C); T rounds compose without amplification by sampling (every client takes part
in every round), which is exactly `SelfComposedDpEvent(GaussianDpEvent(sigma), T)` (`epsilon`).
docs/RELIABILITY.md ("Differential privacy on the global adapter") says what the server is
trusted with and what the neighbouring relation is.
"""

from __future__ import annotations

import hashlib

import torch

from .state import State, l2_distance

# dp_accounting's Renyi-DP accountant (the default: milliseconds, the bound Opacus and TF Privacy
# report) and its privacy-loss-distribution one (tighter, about 8% lower epsilon at the same noise,
# but seconds per call at small noise multipliers)
ACCOUNTANTS = ("rdp", "pld")


def clip(state: State, reference: State, clip_norm: float) -> tuple[State, float]:
    """`state` moved back towards `reference` so that its change has L2 norm at most `clip_norm`:
    reference + change * min(1, clip_norm / ||change||). Returns (the clipped state, ||change||
    before the clip). A change already within the bound is returned as it is, bit for bit."""
    norm = l2_distance(state, reference)
    if not norm > clip_norm:  # NaN too: the server's check rejects a non-finite update
        return state, norm
    scale = clip_norm / norm
    out = {}
    for k, ref in reference.items():
        r = ref.to(torch.float64)
        out[k] = (r + (state[k].to(torch.float64) - r) * scale).to(state[k].dtype)
    return out, norm


def noise_generator(seed: int, round: int) -> torch.Generator:
    """The round's noise stream: a function of the run's seed and the round only, so a resumed job
    draws the same noise as one that never stopped (nothing to checkpoint)."""
    key = hashlib.sha256(f"fdlora-dp-noise/{seed}/{round}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def add_noise(total: State, std: float, seed: int, round: int) -> None:
    """z ~ N(0, std^2) per coordinate added in place to `total` (the server's float64 sum of the
    round's updates), drawn in sorted key order from the round's stream."""
    g = noise_generator(seed, round)
    for k in sorted(total):
        total[k].add_(torch.randn(total[k].shape, generator=g, dtype=torch.float64), alpha=std)


# ---------------------------------------------------------------- accounting (dp-accounting)

def _accountant(name: str):
    try:
        import dp_accounting
    except ImportError as e:  # an install without it: say how to get it
        raise ImportError("privacy: needs the `dp-accounting` package: pip install dp-accounting") from e
    if name == "pld":
        return dp_accounting.pld.PLDAccountant()
    if name == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    raise ValueError(f"accountant {name!r}; expected one of {', '.join(ACCOUNTANTS)}")


def dp_event(noise_multiplier: float, rounds: int):
    """T rounds of the Gaussian mechanism, every client in every round (no sampling)."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)


def epsilon(noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """The privacy loss epsilon at `delta` after `rounds` released rounds (0 before any)."""
    if rounds <= 0:
        return 0.0
    acc = _accountant(accountant)
    acc.compose(dp_event(noise_multiplier, rounds))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose `rounds` rounds stay within (target_epsilon, delta),
    found by the library's own search (dp_accounting.calibrate_dp_mechanism)."""
    import dp_accounting

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda sigma: dp_event(sigma, rounds), target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.3, 1.0), tol=1e-4))


class PrivacyBudget:
    """The run's privacy loss as rounds are released: `spend()` after each round's noised
    aggregate; raises BudgetExceeded when `target_epsilon` would be passed. The configured rounds
    are checked against the target before the job starts (config.check_environment); this is the
    guard for what actually ran (a resumed job counts the rounds before its checkpoint)."""

    def __init__(self, noise_multiplier: float, delta: float, accountant: str = "rdp",
                 target_epsilon: float | None = None, released: int = 0):
        self.noise_multiplier, self.delta, self.accountant = noise_multiplier, delta, accountant
        self.target_epsilon, self.released = target_epsilon, released

    def epsilon(self, rounds: int | None = None) -> float:
        return epsilon(self.noise_multiplier, self.released if rounds is None else rounds, self.delta, self.accountant)

    def spend(self) -> float:
        """One more released round; returns epsilon after it."""
        eps = self.epsilon(self.released + 1)
        if self.target_epsilon is not None and eps > self.target_epsilon:
            raise BudgetExceeded(f"privacy: releasing round {self.released + 1} would bring epsilon to {eps:.4g} > "
                                 f"privacy.target_epsilon = {self.target_epsilon:g} (delta {self.delta:g}); stopping")
        self.released += 1
        return eps


class BudgetExceeded(RuntimeError):
    """Another round would pass privacy.target_epsilon."""
