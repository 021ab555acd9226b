"""Linear combinations of stage vectors, the inner loop of every Runge-Kutta method."""
from __future__ import annotations

import torch

__all__ = ["combine", "combine_stages", "StageRow"]


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


class StageRow:
    """One row of a tableau (a stage's ``a[i]``, ``b`` or ``b_err``) in the form
    :func:`combine_stages` uses: the indices of its non-zero coefficients, those coefficients, and
    a tensor of them per ``(dtype, device)`` (made once, so no host-to-device copy per step)."""

    def __init__(self, coefs):
        self.idx = tuple(j for j, c in enumerate(coefs) if c != 0.0)
        self.coefs = tuple(float(coefs[j]) for j in self.idx)
        self._tensors = {}
        self._last = (None, None, None)  # (dtype, device, tensor): the solve's, without a dict lookup

    def tensor(self, dtype, device) -> torch.Tensor:
        last_dtype, last_device, w = self._last
        if dtype is last_dtype and device == last_device:
            return w
        key = (dtype, device)
        w = self._tensors.get(key)
        if w is None:
            w = self._tensors[key] = torch.tensor(self.coefs, dtype=dtype).to(device)
        self._last = (dtype, device, w)
        return w


# combine_stages stacks at least STACK_MIN_TERMS stage vectors of at most STACK_MAX_NUMEL entries;
# measured on a CPU (1 thread): 2-6 terms of 10-4000 entries cost 4-8 us stacked against 5-20 us
# as adds; at 16k entries the two are even, and beyond it the stack's extra copy loses.
STACK_MIN_TERMS = 2
STACK_MAX_NUMEL = 8192
# Stacked as rows (one addmv) up to ROW_STACK_MAX_NUMEL entries, as columns (mv + add) beyond.
# Under autograd the row form's two nodes (stack, addmv) beat the column form's four (stack,
# transpose, mv, add) forward + backward by 3-5 us per combination up to ~500 entries; without
# autograd the strided row stack loses ~1 us at 200 entries and 5-6 terms, and more beyond. The
# threshold must not depend on the grad mode (recomputed steps must match the forward's bit for
# bit), so it sits where the grad-mode gain is kept and the no-grad loss is still small.
ROW_STACK_MAX_NUMEL = 256


def combine_stages(base, vs, row: StageRow, h: float | torch.Tensor):
    """``base + h * sum_j row[j] * vs[j]`` over the row's non-zero coefficients (``base`` may be
    ``None`` for zero; returns ``base`` itself when the row is all zeros). ``vs`` are flat ``(N,)``;
    ``h`` a float, or a 0-d tensor inside the compiled step (:mod:`~pyode_bridge.solvers.compiled`).

    For a few small vectors, two operations whatever the number of terms: the stages are stacked
    and multiplied by the row's cached coefficient vector (``addmv``), instead of one ``add`` per
    term (per-op dispatch dominates small vector fields; under autograd this also records two
    nodes instead of ``m``). Otherwise :func:`combine`. Which one is used depends only on the row
    and ``N``, so the forward and every recomputation of a step (``checkpointed``,
    ``interpolating``'s re-solve) run the same arithmetic and agree bit for bit.
    """
    idx = row.idx
    if isinstance(h, torch.Tensor):
        # The compiled step's h (a float would recompile per value); alpha= takes no tensor (dynamo
        # bakes its value into the graph), so each term is a product. Summed first, as in combine.
        inc = None
        for c, j in zip(row.coefs, idx):
            inc = vs[j] * (h * c) if inc is None else inc + vs[j] * (h * c)
        return base if inc is None else inc if base is None else base + inc
    if len(idx) == 1 and base is not None:  # the commonest row of a low-order method, one add
        return torch.add(base, vs[idx[0]], alpha=h * row.coefs[0])
    n = vs[idx[0]].numel() if idx else 0
    if len(idx) < STACK_MIN_TERMS or n > STACK_MAX_NUMEL:
        return combine(base, [(h * c, vs[j]) for c, j in zip(row.coefs, idx)])
    # The increment is summed before it is added to the state (as in combine): addmv on the stages
    # stacked as columns accumulates each term onto the state, rounding per term, which cost
    # float32 rk4 its margin in torchdiffeq's own event test (1.0e-4 against 2.9e-5). Stacked as
    # rows, addmv takes one dot product per entry and adds it once.
    grad = torch.is_grad_enabled()
    rows = n <= ROW_STACK_MAX_NUMEL
    m = torch.stack([vs[j] for j in idx], dim=1) if rows else torch.stack([vs[j] for j in idx]).T
    w = row.tensor(m.dtype, m.device)
    if base is None:
        return torch.mv(m, w) * h if grad else torch.mv(m, w).mul_(h)
    if rows:
        return torch.addmv(base, m, w, alpha=h)
    return torch.add(base, torch.mv(m, w), alpha=h)
