"""Events: integrate until ``event_fn(t, y)`` first reaches zero, with the event time and state
differentiable.

The search runs the ordinary stepping loop (:func:`~pyode_bridge.solvers.integrate`) and screens
every accepted step through ``on_step`` for the first time ``event_fn`` reaches zero, touching or
crossing (as torchdiffeq defines the event): ``event_fn`` at the step's end and middle, and, unless
the parabola through those and the step's start stays clearly positive, at 5 more times inside it
(:func:`first_zero`). Screening inside the step, not only at its end, keeps a root from being passed
over where event_fn is zero at the step's end (an end-time guard ``if t > t_end: return 0``), where
two roots lie inside one step, or where it only touches zero. The root is then bracketed on the
step's own dense output (Illinois' regula falsi with a bisection safeguard, to the resolution of a
float64 time); a value exactly zero narrows the bracket like a negative one. Only the interpolant
is evaluated: ``func`` runs no more than that step's dense output itself needs (nothing for dopri5,
tsit5, bosh3; the end derivative of a cubic Hermite step, which the next step would have computed;
dopri8's extra dense stages, only in a step where the cubic Hermite of its end derivatives finds
something).
The ``on_step`` callback then ends the solve.

Gradients (implicit function theorem, as torchdiffeq). With ``Y(t_e)`` the solution at the event
time held fixed and ``g`` the component of ``event_fn`` that crossed zero, ``g(t_e, Y(t_e; p), p) = 0``
gives, for any input ``p`` (``y0``, ``t0``, parameters of ``func`` or of ``event_fn``)::

    dt_e/dp = -(dg/dy . dY/dp + dg/dp) / (dg/dt + dg/dy . f(t_e, y_e))
    dy_e/dp = dY/dp + f(t_e, y_e) dt_e/dp

``dY/dp`` comes from the solve itself: with ``sensitivity="backprop"`` autograd through the search's
own steps and dense output; with any other gradient method, a second solve from ``t0`` to the
(detached) event time with that method (its forward NFE are counted in ``stats``). The values
returned are the search's, whatever the gradient method.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Generator, Iterable, Sequence, TypeVar

import torch

from ._problem import prepare, solve
from ._state import State, StateSpec, add_note
from ._time_grad import StartTime
from .backends.base import get_backend
from .errors import SolverError
from .sensitivity._function import first_order_only
from .solvers import HermiteDenseStep, ScipyMethod, integrate
from .stats import SolveStats

__all__ = ["odeint_until_event"]

_T = TypeVar("_T")

# A tangential crossing (dg/dt + dg/dy . f ~ 0) leaves dt_e/dp undefined; below this many units of
# round-off of that derivative its computed value is noise and the gradient would be silently wrong.
_TANGENTIAL_ROUNDOFF = 1e3
# Adaptive searches run over horizons that double (the loop needs a finite end): 1, 2, 4, ... times
# |t[1] - t[0]|. A fixed-step search runs chunks of this many steps (doubling), so a large
# max_num_steps never builds a huge grid up front.
_FIXED_CHUNK_STEPS = 1024
_MAX_ROOT_ITERS = 200
# Each accepted step's dense output is screened for the first time event_fn reaches zero (not only
# at the step's end, where an earlier root in the step, or two close roots, would be passed over):
# looked at in the step's middle, then, unless clearly positive there, at this many equal intervals
# (even, so the middle's value is reused).
_SCREEN = 6
# A dip of event_fn within this many units of round-off (of the largest |G| sampled in the step)
# of zero touches it: an event, though no sign change is seen.
_TOUCH_ROUNDOFF = 8
# A sampled low of event_fn is searched for a zero until what is left of it is too narrow to reach
# zero at this many times the steepest slope the samples around it show.
_DIP_SLOPE_MARGIN = 2.0

_NO_SECOND_ORDER = ("the event time and state have first derivatives only (the implicit-function "
                    "gradient is not itself differentiable): do not use create_graph=True / Hessians "
                    "through odeint_event or odeint(..., event_fn=...).")


def odeint_until_event(func: Callable[..., Any], y0: State, t: torch.Tensor | Sequence[float], *,
                       event_fn: Callable[..., torch.Tensor], rtol: float = 1e-7, atol: float = 1e-9,
                       method: Any = None, options: dict[str, Any] | None = None, sensitivity: Any = None,
                       stats: SolveStats | None = None, backend: str = "torch",
                       adjoint_params: Iterable[torch.Tensor] | None = None, adjoint_rtol: float | None = None,
                       adjoint_atol: float | None = None, adjoint_method: Any = None,
                       adjoint_options: dict[str, Any] | None = None) -> tuple[torch.Tensor, State]:
    """``odeint(func, y0, t, event_fn=...)``: see :func:`pyode_bridge.odeint`.

    ``t`` holds two times: ``t[0]`` is the start, ``t[1]`` only sets the direction (the solve runs
    until the event, possibly past ``t[1]``). Returns ``(event_t (0-d), solution (2, *S))``.
    """
    if not get_backend(backend).finds_events:
        raise ValueError("event_fn is supported on the torch backend only (the event search reads "
                         "the solver's dense output step by step); use backend='torch' for event "
                         "handling")
    if not callable(event_fn):
        raise ValueError(f"event_fn must be a callable event_fn(t, y) -> Tensor, got "
                         f"{type(event_fn).__name__}")
    prep = prepare(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, sensitivity=sensitivity,
                   stats=stats, backend=backend, adjoint_params=adjoint_params, defer_params=False)
    spec, ts, config, stats = prep.spec, prep.t_eval, prep.config, prep.stats
    if len(ts) != 2:
        raise ValueError(f"with event_fn, t must hold exactly 2 times [t0, t1] (t0 the start; t1 only "
                         f"sets the direction, the solve runs until the event), got len(t)={len(ts)}; "
                         "or call pyode_bridge.odeint_event(func, y0, t0, event_fn=...)")
    t_start, direction = ts[0], (1.0 if ts[1] > ts[0] else -1.0)
    tab = config.method
    if not config.adaptive:
        if config.time.grid is not None or config.time.step_size is None:
            raise ValueError(f"event handling with the fixed-step method {tab.name!r} needs "
                             "options={'step_size': h} (the search steps t0 + k h until the event; "
                             "a grid or the times t cannot be used), as in torchdiffeq")

    grad_on = torch.is_grad_enabled()
    t_tensor = t if isinstance(t, torch.Tensor) else None
    t_dtype = t_tensor.dtype if t_tensor is not None else spec.dtype
    t0_grad, needs_dY = prep.t_grad, prep.grad_needed
    y0_flat = spec.flatten(y0)
    field = prep.field()
    ev = _EventFn(event_fn, spec, config.time.dtype)

    # backprop differentiates through the search itself (with grad on, like odeint's backprop, so
    # tensors that find_parameters cannot see still get their gradient); other methods re-solve.
    backprop = prep.backend.through_autograd(prep.sensitivity)
    through_search = grad_on and backprop and not isinstance(tab, ScipyMethod)
    # scipy is forward only: odeint's own solve decides (and its backward says so).
    resolve_always = grad_on and backprop and isinstance(tab, ScipyMethod)
    y_start = y0_flat
    if through_search and t0_grad:
        assert t_tensor is not None  # t0_grad: t is a tensor that requires grad
        y_start = StartTime.apply(field, y0_flat, t_tensor[0])
    rhs = prep.rhs(context="forward solve (event search)")
    with torch.set_grad_enabled(through_search):
        found = _search(rhs, y_start if through_search else y0_flat.detach(), t_start,
                        abs(ts[1] - ts[0]), direction, config, ev, stats)
    t_e, k, y_e = found.t, found.component, found.y
    stats.nfe_forward += rhs.nfe

    # Y: the state at the event time held fixed, carrying dY/dp (value: the search's y_e).
    if t_e == t_start:
        Y = StartTime.apply(field, y0_flat, t_tensor[0]) if t0_grad and t_tensor is not None else y0_flat
    elif through_search and (y_e.requires_grad or not needs_dY):
        Y = y_e
    elif needs_dY or resolve_always:
        Y = y_e.detach() + _resolve_gradient(func, y0, t_tensor, t_start, t_e, spec, stats, rtol=rtol,
                                             atol=atol, method=method, options=options,
                                             sensitivity=sensitivity, adjoint_params=adjoint_params,
                                             adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol,
                                             adjoint_method=adjoint_method,
                                             adjoint_options=adjoint_options)
    else:
        Y = y_e.detach()

    t_e_tensor = torch.tensor(t_e, dtype=t_dtype, device=spec.device)
    t_out, y_out = t_e_tensor, Y
    if grad_on:
        g_live = ev.values(t_e, Y)[k]  # carries dg/dY . dY/dp + dg/dp(event_fn's own tensors)
        if g_live.requires_grad or Y.requires_grad:
            t_out, y_out = _implicit_gradient(ev, field, t_e, t_e_tensor, Y, g_live, k, found.slope,
                                              stats, found.touch)
    solution = torch.stack([y0_flat, y_out.to(y0_flat.dtype)])
    return t_out, spec.unflatten_time(solution)


class _EventFn:
    """``event_fn`` on flat states: its components as a flat tensor, checked, and the scalar the
    search follows, ``G = min_k sign_k * c_k``, positive until the first component changes sign."""

    def __init__(self, event_fn, spec: StateSpec, time_dtype):
        self.event_fn, self.spec, self.time_dtype = event_fn, spec, time_dtype
        self.signs = torch.empty(0)  # each component's sign at the start, set by start()
        self.eps = torch.finfo(spec.dtype).eps

    def values(self, t, y: torch.Tensor) -> torch.Tensor:
        """All components at ``(t, y)`` (``t`` a float or a 0-d tensor, ``y`` flat), shape ``(K,)``;
        differentiable in ``y`` (and in a tensor ``t``)."""
        tt = t if isinstance(t, torch.Tensor) else torch.full((), t, dtype=self.time_dtype, device=y.device)
        t = float(tt.detach())
        try:
            out = self.event_fn(tt, self.spec.unflatten(y))
        except Exception as e:
            add_note(e, f"raised by event_fn at t={t:.6g}")
            raise
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"event_fn returned {type(out).__name__} at t={t:.6g}; it must return a "
                             "tensor, e.g. return y[..., 0] - 1.0 (or torch.stack of several "
                             "quantities, each an event)")
        if out.is_complex():
            raise ValueError(f"event_fn returned a complex tensor at t={t:.6g}; return a real one, "
                             "e.g. its .real part")
        if not out.is_floating_point():
            raise ValueError(f"event_fn returned dtype {out.dtype} at t={t:.6g}; return a floating "
                             "tensor (compute it from y, or cast with .to(y.dtype))")
        if out.numel() == 0:
            raise ValueError(f"event_fn returned an empty tensor (shape {tuple(out.shape)}) at "
                             f"t={t:.6g}; return at least one value whose zero is the event")
        return out.reshape(-1)

    def start(self, t: float, y: torch.Tensor) -> float:
        """Record each component's sign at the start; returns ``G`` there (0 if one is zero)."""
        with torch.no_grad():
            c = self.values(t, y.detach())
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"event_fn is NaN/Inf at the start t={t:.6g} ({c.tolist()[:8]}); it must "
                             "be finite on the trajectory")
        self.signs = torch.sign(c)
        return float((self.signs * c).min())

    def G(self, t: float, y: torch.Tensor) -> float:
        with torch.no_grad():
            c = self.values(t, y.detach())
            g = float((self.signs * c).min())
        if math.isnan(g) or (math.isinf(g) and not bool(torch.isfinite(c).all())):
            raise SolverError(f"event_fn returned NaN/Inf at t={t:.6g} during the event search; it "
                              "must be finite along the trajectory (check event_fn, or func if the "
                              "state itself became NaN/Inf)")
        return g

    def crossed(self, t: float, y: torch.Tensor) -> int:
        """The component that has changed sign at ``(t, y)`` (the smallest ``sign_k * c_k``)."""
        with torch.no_grad():
            return int((self.signs * self.values(t, y.detach())).argmin())


class _Found:
    """The event: time, the component that crossed, the state (on the dense output), that
    component's mean rate of change over the step where it crossed (None for an event at t0), and
    whether event_fn only touched zero (to round-off) without changing sign."""

    def __init__(self, t: float, component: int, y: torch.Tensor, slope: float | None = None,
                 touch: bool = False):
        self.t, self.component, self.y, self.slope, self.touch = t, component, y, slope, touch


class _Watch:
    """The ``on_step`` callback of the search: screens each accepted step for the first time ``G``
    reaches zero (:func:`first_zero` on the step's dense output); once found, it records the bracket
    and stops the solve."""

    def __init__(self, ev: _EventFn, g0: float, cap: int, no_event: Callable):
        self.ev, self.g_prev, self.cap, self.no_event = ev, g0, cap, no_event
        self.steps = 0
        self.hs: list[float] = []  # the last two accepted step sizes: the first step of the next horizon
        self.found: tuple | None = None
        self.prev: tuple | None = None  # the previous step and its last screened (t, G): a dip across their border

    def __call__(self, step) -> bool:
        self.steps += 1
        self.hs = (self.hs + [abs(step.h)])[-2:]
        g1 = self.ev.G(step.t1, step.y1)
        prev, before = self.prev if self.prev is not None else (None, None)
        forward = step.h > 0

        def on(s):  # the step holding time s (the previous one before this step's start)
            return prev if prev is not None and (s < step.t0 if forward else s > step.t0) else step

        # Evaluated in the search's grad mode, never under no_grad: a dense step computes some parts
        # lazily and caches them (a Hermite step's end derivative, dopri8's extra stages), and a
        # part cached without its graph would silently drop from the gradient of the event state.
        screen = _screen(self.ev, step)
        bracket = first_zero(lambda s: self.ev.G(s, on(s).evaluate(s)), step.t0, self.g_prev, step.t1, g1,
                             screen=screen, eps=self.ev.eps, before=before)
        if bracket is None:
            self.g_prev = g1
            self.prev = (step, screen.last) if screen.last is not None else None
            if self.steps >= self.cap:
                raise self.no_event(step.t1, g1, self.steps)
            return False
        self.found = (*bracket, on(bracket[0]))  # (ta, tb, touch, step)
        return True


def _screen(ev: _EventFn, step) -> "_Screen":
    """The screen of ``step``'s dense output. Where that costs evaluations of ``func`` (dopri8's
    extra stages, not yet computed), the coarse look uses the cubic Hermite of the step's FSAL end
    derivatives instead, and the step's own dense output is evaluated only if that look finds
    something (or, with no FSAL derivative, only if the step's end has reached zero)."""
    tab = getattr(step, "tableau", None)
    if tab is not None and tab.dense_stages and not step.dense_ready:
        cheap = HermiteDenseStep(step.t0, step.h, step.y0, step.y1, step.ks[0], step.ks[-1]) if tab.fsal else None
        return _Screen(ev, step, cheap, has_cheap=True)
    return _Screen(ev, step)


class _Screen:
    """``G`` at times inside a dense step, a batch at a time (one evaluation of the dense output
    each). ``coarse(ts)`` may answer from a cheaper approximation (None: no look is affordable);
    ``last`` keeps the last ``(t, G)`` screened, for a dip across the border with the next step."""

    def __init__(self, ev: _EventFn, dense, cheap=None, has_cheap: bool = False):
        self.ev, self.dense, self.cheap, self.has_cheap = ev, dense, cheap, has_cheap
        self.last: tuple[float, float] | None = None

    def _on(self, dense, ts):
        gs = [self.ev.G(t, y) for t, y in zip(ts, dense.evaluate_many(ts))]
        self.last = (ts[-1], gs[-1])
        return gs

    def __call__(self, ts):
        return self._on(self.dense, ts)

    def coarse(self, ts):
        if not self.has_cheap:
            return self(ts)
        return None if self.cheap is None else self._on(self.cheap, ts)


def _local_min(gs, j: int) -> bool:
    return gs[j] < gs[j - 1] and gs[j] <= gs[j + 1]


def _worth_a_closer_look(gs, before, touch: float) -> bool:
    """From ``G`` at the step's start, middle and end (``gs``): whether it may reach zero inside the
    step. It may where a value is (nearly) zero, where the middle one is the lowest (or the start
    is, below the previous step's last ``before``), or where the parabola through the three bottoms
    out inside the step below the least of them."""
    g0, gm, g1 = gs
    if min(gs) <= touch or gm < g0 and gm <= g1:
        return True
    if before is not None and before[1] > g0 <= gm:
        return True
    curv = 2.0 * (g0 - 2.0 * gm + g1)  # y(x) = g0 + slope x + curv x^2 on x in [0, 1]
    if curv <= 0.0:
        return False
    slope = g1 - g0 - curv
    x = -slope / (2.0 * curv)
    return 0.0 < x < 1.0 and g0 + 0.5 * slope * x < min(gs)


# The root search below is written once, as generators that ask for values of ``G`` rather than
# call it: each yields ``(kind, times)`` and is sent back ``G`` at those times (a list), ``kind``
# saying what the caller may answer from: "coarse" (the first look into a step: a cheaper
# approximation may answer, or None where none is affordable), "screen" (the step's samples) or
# "point" (``G`` itself). :func:`answer` drives one search with a scalar ``G`` (the joint search);
# per-sample events drive one search per batch row in lockstep, each round one batched evaluation
# of ``event_fn`` (:mod:`pyode_bridge._per_sample_events`).
Request = tuple[str, list[float]]
Search = Generator[Request, "list[float] | None", _T]


def answer(search: "Search[_T]", G: Callable[[float], float], screen: "_Screen | None" = None) -> _T:
    """Run ``search`` to its result, answering its requests with ``G`` (or ``screen``'s values)."""
    reply: list[float] | None = None
    try:
        while True:
            kind, ts = search.send(reply)
            if screen is not None and kind == "coarse":
                reply = screen.coarse(ts)
            elif screen is not None and kind == "screen":
                reply = screen(ts)
            else:
                reply = [G(t) for t in ts]
    except StopIteration as done:
        return done.value


def first_zero(G: Callable[[float], float], a: float, ga: float, b: float, gb: float, *,
               screen: "_Screen | None" = None, eps: float = 2.0 ** -52, before=None):
    """The first time in ``[a, b]`` at which ``G`` reaches zero: :func:`first_zero_search` driven
    with ``G`` (``screen``: the step's dense output, see :func:`_screen`)."""
    reuse = screen is not None and not screen.has_cheap
    return answer(first_zero_search(a, ga, b, gb, eps=eps, before=before, reuse_coarse=reuse), G, screen)


def first_zero_search(a: float, ga: float, b: float, gb: float, *, eps: float = 2.0 ** -52, before=None,
                      reuse_coarse: bool = False) -> "Search[tuple[float, float, bool] | None]":
    """The first time in ``[a, b]`` at which ``G`` reaches zero (``G(a) = ga > 0``, ``G(b) = gb``;
    ``a`` may be greater than ``b``), as ``(ta, tb, touch)``: a bracket from :func:`find_root_search`, or
    ``(t, t, True)`` for a touch (below), or None where it stays positive. A search (see
    :func:`answer`).

    ``G`` is looked at first in the middle of ``[a, b]`` (a "coarse" request).
    Unless it is then clearly positive throughout (:func:`_worth_a_closer_look`), it is
    sampled at ``_SCREEN - 1`` equally spaced times: the bracket is the first sample interval where
    it falls to zero or below, so a root before a later one, or before ``b``, is not passed over.
    ``reuse_coarse``: the coarse answer was ``G`` itself, so the middle is not asked for again.
    Between samples it may dip to zero and back (two close roots, or a touch without a sign
    change): at a sample below its neighbours, the dip is minimised (:func:`_dip_search`); it
    counts if ``G`` reaches zero there, or comes within round-off of it (``_TOUCH_ROUNDOFF * eps``
    times the largest ``|G|`` sampled), the touch then being the event. ``before``: the last
    ``(t, G(t))`` screened before ``a`` (``G`` is defined there too), so that a dip across ``a``
    is seen. A dip that neither the coarse look nor the samples (spacing ``|b - a| / _SCREEN``)
    show can still be missed."""
    if not math.isfinite(b - a):  # a step run off to infinity (the state stopped moving)
        if gb > 0.0:
            return None
        ta, tb = yield from find_root_search(a, ga, b, gb)
        return ta, tb, False
    ts = [a + (b - a) * (i / _SCREEN) for i in range(1, _SCREEN)]
    half = _SCREEN // 2
    look = [ts[half - 1]]
    g_look = yield ("coarse", look)
    scale = max((abs(g) for g in [ga, gb, *(g_look or [])] if math.isfinite(g)), default=1.0)
    touch = _TOUCH_ROUNDOFF * eps * scale
    if gb > touch and (g_look is None or not _worth_a_closer_look([ga, *g_look, gb], before, touch)):
        return None
    if not reuse_coarse or g_look is None:
        inner = yield ("screen", ts)
    else:  # reuse the coarse look's values
        more = iter((yield ("screen", [t for i, t in enumerate(ts, 1) if i != half])) or [])
        inner = [g_look[0] if i == half else next(more) for i in range(1, _SCREEN)]
    assert inner is not None  # only a coarse look may go unanswered
    tt, gs = [a, *ts, b], [ga, *inner, gb]
    finite = [abs(g) for g in gs if math.isfinite(g)]
    touch = _TOUCH_ROUNDOFF * eps * (max(finite) if finite else 1.0)
    k0 = 0
    if before is not None:
        tt, gs, k0 = [before[0], *tt], [before[1], *gs], 1
    for i in range(k0, len(tt)):
        if i > k0 and gs[i] <= 0.0:
            ta, tb = yield from find_root_search(tt[i - 1], gs[i - 1], tt[i], gs[i])
            return ta, tb, False
        if i >= 1 and i + 1 < len(tt) and gs[i + 1] > 0.0 and _local_min(gs, i):
            dip = yield from _dip_search((tt[i - 1], gs[i - 1]), (tt[i], gs[i]), (tt[i + 1], gs[i + 1]),
                                         touch, eps)
            if dip is not None:
                t_m, g_m = dip
                if g_m > 0.0:  # within round-off of zero: the touch is the event
                    return t_m, t_m, True
                ta, tb = yield from find_root_search(tt[i - 1], gs[i - 1], t_m, g_m)
                return ta, tb, False
    return None


def _dip_search(left, low, right, touch: float, eps: float = 2.0 ** -52) -> "Search[tuple[float, float] | None]":
    """Where ``G`` comes to zero, or within ``touch`` of it, between the samples ``left`` and
    ``right`` (``(t, G(t))`` pairs) around the lower sample ``low``: ``(t, G(t))``, or None. A
    search (see :func:`answer`).

    Golden-section search for the low. It gives up once the lowest value found exceeds what ``G``
    could lose over the remaining bracket at ``_DIP_SLOPE_MARGIN`` times the steepest slope among
    the three samples: a smooth low well above zero costs a few evaluations, while a kink
    (``|y - c|``) or a double root is followed down to round-off, of ``G`` or of the time
    ``event_fn`` sees (``eps``, its dtype's, relative to ``t``: a float32 ``t`` moves ``G`` in
    steps far coarser than the search's float64 times); a low still not ruled out when the bracket
    has shrunk to adjacent floats is returned."""
    (tl, gl), (m, gm), (tr, gr) = left, low, right
    # Samples can coincide in a step one float wide (a fixed grid t0 + k h passing a jump_t by an ulp).
    steep = max(abs(gm - gl) / abs(m - tl) if m != tl else 0.0, abs(gr - gm) / abs(tr - m) if tr != m else 0.0)
    lo, hi = min(tl, tr), max(tl, tr)
    t_roundoff = eps * max(abs(lo), abs(hi))
    best_t, best_g = m, gm
    invphi = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - invphi * (hi - lo), lo + invphi * (hi - lo)
    g1, g2 = (yield ("point", [x1, x2])) or []
    for _ in range(_MAX_ROOT_ITERS):
        # The earliest of equal lows: the dip is the first time G gets there.
        for x, g in sorted(((x1, g1), (x2, g2)), key=lambda p: p[0] * (1.0 if tr > tl else -1.0)):
            if g < best_g:
                best_t, best_g = x, g
        if best_g <= touch:
            return best_t, best_g
        if best_g > _DIP_SLOPE_MARGIN * steep * (hi - lo + t_roundoff):
            return None
        if g1 <= g2:
            hi, x2, g2 = x2, x1, g1
            x1 = hi - invphi * (hi - lo)
            if not lo < x1 < x2:
                break
            (g1,) = (yield ("point", [x1])) or []
        else:
            lo, x1, g1 = x1, x2, g2
            x2 = lo + invphi * (hi - lo)
            if not x1 < x2 < hi:
                break
            (g2,) = (yield ("point", [x2])) or []
    # The low is pinned to adjacent float times and G could still reach zero between them: a touch
    # to the time's round-off. (G's own round-off, ``touch``, scales with the step's values and can
    # lie far below what a time's last bit moves G by: |t - c| over a short step late in time.)
    return best_t, best_g


def find_root_search(a: float, ga: float, b: float, gb: float) -> "Search[tuple[float, float]]":
    """Bracket the first arrival of ``G`` at zero between ``a`` (``G(a) = ga > 0``) and ``b``
    (``gb <= 0``) to adjacent float64 times: Illinois' modified regula falsi, bisecting whenever it
    fails to halve the bracket in two iterations. Returns ``(ta, tb)`` with ``G(ta) > 0 >= G(tb)``
    and no float strictly between, or ``(tb, tb)`` where ``G(tb)`` is exactly zero (``G`` reaches
    zero there). A zero inside the bracket, or at its end, narrows it as a negative value does, so
    a root before it is not lost. ``a`` may be greater than ``b``. A search (see :func:`answer`)."""
    side = 0
    width_before = [abs(b - a)] * 2
    b_zero = gb == 0.0
    for _ in range(_MAX_ROOT_ITERS):
        mid = a + 0.5 * (b - a)
        if mid == a or mid == b:
            break
        if abs(b - a) > 0.5 * width_before[0] or gb == 0.0:
            t = mid  # the secant has stalled on one side, or has no slope to follow: bisect
        else:
            t = b - gb * (b - a) / (gb - ga)
            if not (min(a, b) < t < max(a, b)):
                t = mid
        width_before = [width_before[1], abs(b - a)]
        (gt,) = (yield ("point", [t])) or []
        if gt > 0:
            a, ga = t, gt
            if side == 1:
                gb *= 0.5  # Illinois: the same end moved twice, halve the other's weight
            side = 1
        else:
            b, gb, b_zero = t, gt, gt == 0.0
            if side == -1:
                ga *= 0.5
            side = -1
    return (b, b) if b_zero else (a, b)


def _search(rhs, y0, t0: float, span0: float, direction: float, config, ev: _EventFn,
            stats: SolveStats) -> _Found:
    """Step from ``t0`` until the event; returns its time, component and state (on the step's dense
    output, differentiable when grad is enabled)."""
    tab = config.method
    cap = config.control.max_num_steps
    g0 = ev.start(t0, y0)
    if g0 <= 0.0:  # a component is exactly zero at t0: the event is there (as torchdiffeq)
        return _Found(t0, ev.crossed(t0, y0), y0)

    def no_event(t_reached, g_reached, steps):
        return SolverError(
            f"event search with method '{tab.name}': no event after {steps} accepted steps from "
            f"t={t0:.6g} to t={t_reached:.6g} (max_num_steps={cap}): event_fn kept the sign it had "
            f"at the start (min over components of sign * value went from {g0:.3g} to "
            f"{g_reached:.3g}). The solve runs until event_fn changes sign; check that it does so "
            "after t0 in this direction of time (reverse_time=True, or a decreasing t, integrates "
            "backwards), or allow more steps with options={'max_num_steps': ...}.")

    watch = _Watch(ev, g0, cap, no_event)
    a, ya, span, chunk = t0, y0, span0, _FIXED_CHUNK_STEPS
    cfg = config
    while watch.found is None:
        if config.adaptive:
            b = a + direction * span
            span *= 2.0  # reaches inf (never an OverflowError) if no event ever comes
        else:
            b = a + direction * min(cap - watch.steps, chunk) * config.time.step_size
            chunk *= 2
        if not math.isfinite(b):
            raise no_event(a, watch.g_prev, watch.steps)
        res = integrate(rhs, ya, [a, b], cfg, on_step=watch, context=rhs.context)
        stats.steps_forward += res.steps
        stats.steps_rejected += res.rejected
        if watch.found is None:
            a, ya = b, res.ys[-1]
            if config.adaptive and watch.hs:
                # Continue with the step size reached rather than a fresh initial-step estimate.
                cfg = config.with_control(first_step=max(watch.hs))
    ta, tb, touch, step = watch.found
    k = ev.crossed(tb, step.evaluate(tb))
    with torch.no_grad():
        slope = float(ev.values(step.t1, step.y1.detach())[k] - ev.values(step.t0, step.y0.detach())[k]) / step.h
    # The time on the start side of a crossing: event_fn still has its initial sign there, so a
    # solve restarted from the event state does not see the same event again at once (where
    # event_fn is exactly zero at tb, or touches zero, ta is that time itself).
    return _Found(ta, k, step.evaluate(ta), slope, touch)


def _resolve_gradient(func, y0, t_tensor, t_start, t_e, spec, stats, **kwargs) -> torch.Tensor:
    """``Y - Y.detach()``: zero, carrying ``dY/dp`` of a solve from ``t0`` to the fixed ``t_e`` with
    the chosen gradient method. Its forward counters are added to ``stats``."""
    t0 = (t_tensor[0].to(torch.float64) if t_tensor is not None
          else torch.tensor(t_start, dtype=torch.float64, device=spec.device))
    t_re = torch.stack([t0, torch.tensor(t_e, dtype=torch.float64, device=t0.device)])
    # solve resets the stats it is given: keep the search's counters and add them back.
    search = (stats.nfe_forward, stats.steps_forward, stats.steps_rejected)
    ys = solve(func, y0, t_re, stats=stats, **kwargs)
    stats.nfe_forward += search[0]
    stats.steps_forward += search[1]
    stats.steps_rejected += search[2]
    Y = spec.flatten_time(ys)[1]
    return Y - Y.detach()


class _EventOutputs(torch.autograd.Function):
    """Identity on ``(t_e, y_e)`` whose backward raises ``error`` (a tangential event) if set, and
    otherwise refuses to be differentiated again (the implicit gradient is first order only)."""

    @staticmethod
    def forward(ctx, error, t_pre, y_pre):
        ctx.error = error
        ctx.save_for_backward(t_pre, y_pre)
        return t_pre.clone(), y_pre.clone()

    @staticmethod
    def backward(ctx, grad_t, grad_y):
        if ctx.error is not None:
            raise SolverError(ctx.error)
        if torch.is_grad_enabled():
            grad_t, grad_y = first_order_only(_NO_SECOND_ORDER, [grad_t, grad_y],
                                              [grad_t, grad_y, *ctx.saved_tensors])
        return None, grad_t, grad_y


def _implicit_gradient(ev: _EventFn, field, t_e: float, t_e_tensor, Y, g_live, k: int, slope, stats,
                       touch: bool = False):
    """``(t_e, y_e)`` with the implicit-function gradient attached (values unchanged).

    The event is tangential (no gradient) where ``D = dg/dt + dg/dy . f`` is lost in the round-off
    of its terms, or is tiny (``sqrt(eps)``) against ``slope``, the mean rate of change of ``g``
    over the step in which it crossed: ``g`` then crosses at one of its stationary points, e.g.
    ``(y - c)**3``, and the computed ``D`` is noise from the root's last bits."""
    with torch.enable_grad():
        tt = torch.tensor(t_e, dtype=ev.time_dtype, device=Y.device, requires_grad=True)
        yy = Y.detach().requires_grad_(True)
        c = ev.values(tt, yy)[k]
        g_t = g_y = None
        if c.requires_grad:
            g_t, g_y = torch.autograd.grad(c, (tt, yy), allow_unused=True)
    with torch.no_grad():
        f_e = field(torch.tensor(t_e, dtype=torch.float64, device=Y.device), Y.detach())
        stats.nfe_forward += 1
        zero = torch.zeros((), dtype=Y.dtype, device=Y.device)
        g_t = zero if g_t is None else g_t.to(Y.dtype)
        g_y = torch.zeros_like(Y) if g_y is None else g_y
        D = g_t + (g_y * f_e).sum()  # d/dt of g(t, y(t)) at the event
        scale = float(g_t.abs() + torch.linalg.vector_norm(g_y) * torch.linalg.vector_norm(f_e))
        d = float(D)
    eps = torch.finfo(Y.dtype).eps
    error = None
    if touch:
        # Its time moves with some inputs and ceases to exist under others (the dip no longer
        # reaching zero): no derivative to give.
        error = (f"the event at t={t_e:.6g} is tangential: event_fn touches zero there (to round-off) "
                 "without changing sign, so the event time has no gradient (a small change of the "
                 "inputs can make the event vanish). Use an event_fn that crosses zero "
                 "transversally, or compute the event under torch.no_grad() (or with detached "
                 "inputs) if you need no gradient.")
        D = torch.ones((), dtype=Y.dtype, device=Y.device)  # keeps the values finite; backward raises
    elif (not math.isfinite(d) or scale == 0.0 or abs(d) <= _TANGENTIAL_ROUNDOFF * eps * scale
            or (slope is not None and abs(d) <= math.sqrt(eps) * abs(slope))):
        rate = "" if slope is None else f", {slope:.3g} on average over the step where it crossed"
        error = (f"the event at t={t_e:.6g} is tangential: d/dt event_fn(t, y(t)) = {d:.3g} there "
                 f"(|dg/dt| + |dg/dy| |f| = {scale:.3g}{rate}), so the event time has no gradient: "
                 "the implicit function theorem divides by this derivative. Use an event_fn that "
                 "crosses zero transversally (e.g. y - c rather than (y - c)**3), or compute the "
                 "event under torch.no_grad() (or with detached inputs) if you need no gradient.")
        D = torch.ones((), dtype=Y.dtype, device=Y.device)  # keeps the values finite; backward raises
    t_pre = t_e_tensor - (g_live - g_live.detach()).to(t_e_tensor.dtype) / D.to(t_e_tensor.dtype)
    y_pre = Y + f_e * (t_pre - t_e_tensor).to(Y.dtype)
    return _EventOutputs.apply(error, t_pre, y_pre)
