"""Optional solver backends, one subpackage each (``backend="julia"``: :mod:`.julia`).

A backend is imported only when ``odeint(..., backend=...)`` selects it; importing this package
imports nothing else (in particular it never starts Julia).
"""
