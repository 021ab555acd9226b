"""Linear combinations of stage vectors, the inner loop of every Runge-Kutta method."""
from __future__ import annotations

import torch

__all__ = ["combine"]


def combine(base, terms):
    """Return ``base + sum(c * v for c, v in terms)`` (``base`` may be ``None`` for zero).

    Zero coefficients are skipped. Under ``torch.no_grad`` the sum is accumulated in place into one
    fresh buffer; with grad enabled it is a chain of out-of-place ``torch.add(..., alpha=c)``, which
    records one autograd node per term (torchdiffeq spends ~30% of its time on the extra
    mul/sum/copy ops a stacked formulation needs). Returns ``base`` itself when nothing is added.
    """
    terms = [(c, v) for c, v in terms if c != 0.0]
    if not terms:
        return base if base is not None else None
    c0, v0 = terms[0]
    if base is not None and len(terms) == 1:
        return torch.add(base, v0, alpha=c0)
    # The increment is summed first and added to the state once: adding each small term to a
    # large state rounds at every term (float32 rk4 lost a factor 3.5 of accuracy that way).
    inc = v0 * c0
    if torch.is_grad_enabled():
        for c, v in terms[1:]:
            inc = torch.add(inc, v, alpha=c)
        return inc if base is None else torch.add(base, inc)
    for c, v in terms[1:]:
        inc.add_(v, alpha=c)
    return inc if base is None else inc.add_(base)
