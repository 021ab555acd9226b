"""Exceptions raised by pyode-bridge."""

__all__ = ["SolverError", "BackendUnavailableError", "AccuracyWarning"]


class SolverError(RuntimeError):
    """A solve could not be completed: non-finite values, step-size underflow, too many steps,
    a right-hand side returning the wrong shape, or an unstable reverse solve.

    The message always names the time ``t`` at which it happened, the method and the direction
    (forward solve or backward pass), and what to change.
    """


class BackendUnavailableError(RuntimeError):
    """The requested backend (e.g. ``backend="julia"``) cannot be started on this machine.

    ``__cause__`` carries the underlying exception; the message lists the fixes.
    """


class AccuracyWarning(RuntimeWarning):
    """An answer was delivered, but a guard measured that it may be less accurate than the
    tolerances suggest: an interpolant of z that misses the dense output (``interpolated``,
    ``interpolating``), or a reverse solve that drifts from the forward one (``backsolve``).

    The message names the method, the interval and the measured figure, and what to change.
    Each guard's ``on_...="raise"`` turns it into a :class:`SolverError`; to make every guard loud
    at once, ``warnings.simplefilter("error", pob.AccuracyWarning)``. A subclass of
    ``RuntimeWarning``, so filters written for that still apply.
    """
