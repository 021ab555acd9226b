"""Exceptions raised by pyode-bridge."""

__all__ = ["SolverError", "BackendUnavailableError"]


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
