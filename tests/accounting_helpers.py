"""An independent accountant to hold the trainer's epsilons against."""

from __future__ import annotations


def pld_epsilon(history, delta: float = 1e-5) -> float:
    """Google's PLD accountant, add/remove adjacency (its default), Poisson-subsampled Gaussian per step."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    for sigma, q, steps in history:
        gaussian = dp_event.GaussianDpEvent(sigma)
        accountant.compose(gaussian if q == 1.0 else dp_event.PoissonSampledDpEvent(q, gaussian), steps)
    return accountant.get_epsilon(delta)
