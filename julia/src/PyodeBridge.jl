"""
    PyodeBridge

Julia half of pyode-bridge's `backend="julia"`: SciML ODE solves and adjoint sensitivities of a
right-hand side that lives in Python (a PyTorch module).

The right-hand side is a [`PyRHS`](@ref): an out-of-place callable `f(u, p, t)` that calls back
into Python. Its `ODEFunction` carries `vjp`/`vjp_p` hooks ([`PyVJP`](@ref), [`PyVJPp`](@ref))
that SciMLSensitivity (>= 7.97) calls instead of differentiating `f` itself: each is one torch
forward plus one `torch.autograd.grad`, and when an adjoint asks for `(df/du)ᵀλ` and `(df/dp)ᵀλ`
at the same point, one torch VJP serves both. A `ChainRulesCore.rrule` on `PyRHS` remains as the
fallback for any path that differentiates `f` with Zygote. `p` is one flat parameter vector.

Python calls [`forward_solve`](@ref) and then, from `torch.autograd.Function.backward`,
[`adjoint_solve`](@ref) with the solution handle kept between the two.

Arrays cross without copies where the solver allows it: CPU `Array`s reach Python as
`juliacall.ArrayValue` (NumPy array interface) and NumPy arrays reach Julia as `PyArray`. CUDA
arrays (extension `PyodeBridgeCUDAExt`, loaded with CUDA.jl) reach torch as raw-pointer views
kept alive by per-solve storage that only this package touches (never a finalizer).

Nothing of this package has been run by its authors: the machines pyode-bridge is developed on
cannot install Julia. `test/runtests.jl` is what a machine with Julia runs first.
"""
module PyodeBridge

using ADTypes: ADTypes, AutoFiniteDiff
using ChainRulesCore: ChainRulesCore, NoTangent, unthunk
using PythonCall: Py, pyconvert
using SciMLBase: SciMLBase, ODEFunction, ODEProblem
using SciMLSensitivity: SciMLSensitivity, adjoint_sensitivities, BacksolveAdjoint,
    InterpolatingAdjoint, QuadratureAdjoint, GaussAdjoint, ZygoteVJP
import OrdinaryDiffEq
import OrdinaryDiffEqBDF
import OrdinaryDiffEqCore
import OrdinaryDiffEqLowOrderRK
import OrdinaryDiffEqRosenbrock
import OrdinaryDiffEqSDIRK
import OrdinaryDiffEqTsit5
import OrdinaryDiffEqVerner
import Zygote  # ZygoteVJP needs Zygote loaded; SciMLSensitivity depends on it, this makes it explicit

export PyRHS, PyVJP, PyVJPp, forward_solve, adjoint_solve, make_alg, make_sensealg

"""Bumped whenever the Python side must change with this file (checked on load)."""
const API_VERSION = 2

# ---------------------------------------------------------------------------------------------
# Array hand-off. Methods for CUDA arrays live in ext/PyodeBridgeCUDAExt.jl.
# ---------------------------------------------------------------------------------------------

"""
    to_python(rhs, x)

What a Python callback receives for the Julia array `x`: CPU arrays are passed as they are
(PythonCall wraps them as `juliacall.ArrayValue`, a zero-copy NumPy-compatible view that holds
its own reference to `x`). CUDA arrays become a torch tensor viewing the same memory (CUDA
extension); `x` is then kept in `rhs.shares` until the callback returns.
"""
to_python(rhs, x::Array) = x
to_python(rhs, ::Nothing) = nothing

"""
    from_python(proto, x)

A Julia array owned by Julia, of the same kind as `proto` (`Vector{T}`, `CuVector{T}`), with the
contents of the Python array `x` (a NumPy array arriving as `PyArray`; for CUDA a carrier with
the tensor's device pointer). Always copies: the solver must not hold memory owned by torch.
"""
from_python(proto::Array{T}, x) where {T} = Array{T}(x)

"""
    from_python_matrix(proto, x, n, m)

An `n × m` Julia matrix of `proto`'s kind from the Python array `x` (a `(m, n)` C-ordered tensor,
the same memory as Julia's column-major `n × m`). Copies, like [`from_python`](@ref).
"""
function from_python_matrix(proto::Array{T}, x, n::Integer, m::Integer) where {T}
    M = Matrix{T}(x)
    size(M) == (n, m) || throw(DimensionMismatch("expected a $n×$m matrix, got $(size(M))"))
    return M
end

"""
    sync_device(proto)

Wait for queued device work before Python reads Julia arrays (no-op on the CPU; CUDA
synchronisation in the extension, because torch and CUDA.jl use different streams).
"""
sync_device(::Array) = nothing

"""
    with_device(f, proto, device)

Run `f()` with the CUDA device `device` (0-based, torch's index) selected; CPU: just `f()`.
Every solve runs inside it, so that every Julia allocation and every wrapped torch pointer
belongs to the device of the tensors (`cuda:1` for DDP rank 1, ...).
"""
with_device(f, ::Array, device::Integer) = f()

"""
    cuda_proto(T, device)

A zero-length `CuVector{T}` on `device` (defined by the CUDA extension; errors when it is not
loaded).
"""
function cuda_proto end

"""`x` as a dense array of `proto`'s kind and element type; `x` itself when it already is one."""
_dense(proto::AbstractArray, x::AbstractArray) = x isa typeof(proto) ? x : _copyto(proto, x)
_dense(proto::AbstractArray, x::Number) = _copyto(proto, fill(x, 1))
_dense(proto::AbstractArray, ::ChainRulesCore.AbstractZero) = nothing

function _copyto(proto, x)
    y = similar(proto, length(x))
    y .= vec(x)
    return y
end

# ---------------------------------------------------------------------------------------------
# The right-hand side
# ---------------------------------------------------------------------------------------------

"""
    VJPCache

The last vector-Jacobian product computed in Python, keyed by copies of `(λ, u, p, t)`.

SciMLSensitivity asks for `(df/du)ᵀλ` (`vjp`) and then `(df/dp)ᵀλ` (`vjp_p`) at the same point
in two calls; with `fuse = true` (interpolating and backsolve adjoints, which need both at every
step) the first call computes both with one torch forward and backward and the second reads the
cache. With `fuse = false` (gauss and quadrature adjoints, whose adjoint ODE needs only `(df/du)ᵀλ`
and whose quadrature needs only `(df/dp)ᵀλ`, at different points) each call asks torch for one
gradient only. `du = f(u, p, t)` comes with every VJP and serves a plain evaluation at the same
point (BacksolveAdjoint re-evaluates `f` right after the VJP).
"""
mutable struct VJPCache{A}
    fuse::Bool
    valid::Bool
    t::Float64
    λ::A
    u::A
    p::A
    du::A
    gu::Union{Nothing, A}
    gp::Union{Nothing, A}
end
VJPCache(proto::A) where {A} = VJPCache{A}(false, false, NaN, proto, proto, proto, proto, nothing, nothing)

function _invalidate!(c::VJPCache)
    c.valid = false
    c.gu = c.gp = nothing
    return c
end

_same(a, b) = a === b || (length(a) == length(b) && a == b)
_hit(c::VJPCache, λ, u, p, t) = c.valid && c.t == t && _same(c.u, u) && _same(c.λ, λ) && _same(c.p, p)
_hit(c::VJPCache, u, p, t) = c.valid && c.t == t && _same(c.u, u) && _same(c.p, p)

"""
    PyRHS(forward, forward_graph, pullback, vjp, jac, tgrad, dtype, device="cpu", device_index=-1)

An out-of-place ODE right-hand side `f(u, p, t)` computed in Python.

- `forward(du, u, p, t)`: writes `f(u, p, t)` into `du` (no autograd graph).
- `forward_graph(du, u, p, t) -> token::Int`: the same, keeping the autograd graph under `token`
  (for the `rrule` fallback).
- `pullback(token, λ, gu, gp)`: writes `(df/du)ᵀλ` into `gu` and `(df/dp)ᵀλ` into `gp` and frees
  the graph.
- `vjp(du, gu, gp, λ, u, p, t)`: one torch forward and backward: `f` into `du`, `(df/du)ᵀλ` into
  `gu` and `(df/dp)ᵀλ` into `gp`; `gu` or `gp` is `nothing` when not wanted.
- `jac(J, u, p, t)`, `tgrad(dT, u, p, t)`: `df/du` and `df/dt` for implicit (stiff) methods.
- `dtype`: `"float32"` or `"float64"`; `device`: `"cpu"` or `"cuda"` with `device_index` torch's
  CUDA device index.

Every array argument is allocated by Julia and handed over with [`to_python`](@ref); Python
writes its results into them, so nothing is copied on the way in and one copy (torch's result
into the Julia buffer) is made on the way out.
"""
struct PyRHS{A <: AbstractVector}
    forward::Py
    forward_graph::Py
    pullback::Py
    vjp::Py
    jac::Py
    tgrad::Py
    proto::A
    device::Int
    shares::Vector{Any}
    cache::VJPCache{A}
end

function PyRHS(forward, forward_graph, pullback, vjp, jac, tgrad, dtype::AbstractString,
        device::AbstractString = "cpu", device_index::Integer = -1)
    T = dtype == "float32" ? Float32 : dtype == "float64" ? Float64 :
        throw(ArgumentError("dtype must be \"float32\" or \"float64\", got $(repr(dtype))"))
    proto = if device == "cpu"
        Vector{T}(undef, 0)
    elseif device == "cuda"
        device_index >= 0 || throw(ArgumentError("a CUDA right-hand side needs device_index >= 0"))
        cuda_proto(T, device_index)
    else
        throw(ArgumentError("device must be \"cpu\" or \"cuda\", got $(repr(device))"))
    end
    return PyRHS(Py(forward), Py(forward_graph), Py(pullback), Py(vjp), Py(jac), Py(tgrad),
        proto, Int(device_index), Any[], VJPCache(proto))
end

"""
    call_python(rhs, f, args...)

Call the Python callback `f` with `args` (Julia arrays handed over with [`to_python`](@ref)),
after waiting for queued device work; the arrays lent to Python are released when it returns.
"""
function call_python(r::PyRHS, f::Py, args...)
    sync_device(r.proto)
    try
        return f(map(a -> a isa AbstractArray || a === nothing ? to_python(r, a) : a, args)...)
    finally
        empty!(r.shares)
    end
end

function (r::PyRHS)(u, p, t)
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    c = r.cache
    _hit(c, uu, pp, Float64(t)) && return copy(c.du)
    du = similar(r.proto, length(uu))
    call_python(r, r.forward, du, uu, pp, Float64(t))
    return du
end

function ChainRulesCore.rrule(r::PyRHS, u, p, t)
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    du = similar(r.proto, length(uu))
    token = pyconvert(Int, call_python(r, r.forward_graph, du, uu, pp, Float64(t)))
    function pyrhs_pullback(Δ)
        λ = _dense(r.proto, unthunk(Δ))
        if λ === nothing  # a zero cotangent: still release the graph kept in Python
            λ = fill!(similar(r.proto, length(uu)), 0)
        end
        gu = similar(r.proto, length(uu))
        gp = similar(r.proto, length(pp))
        call_python(r, r.pullback, token, λ, gu, gp)
        return NoTangent(), gu, gp, NoTangent()
    end
    return du, pyrhs_pullback
end

"""
    vjp!(rhs, λ, u, p, t, want_u) -> (df/du)ᵀλ or (df/dp)ᵀλ

One of the two products at `(λ, u, p, t)`, from the cache when the other call already computed
it, else from one Python `vjp` call (computing both when `rhs.cache.fuse`).
"""
function vjp!(r::PyRHS, λ, u, p, t, want_u::Bool)
    λλ = _dense(r.proto, λ)
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    tt = Float64(t)
    c = r.cache
    if _hit(c, λλ, uu, pp, tt)
        g = want_u ? c.gu : c.gp
        g === nothing || return copy(g)
    end
    du = similar(r.proto, length(uu))
    gu = (c.fuse || want_u) ? similar(r.proto, length(uu)) : nothing
    gp = (c.fuse || !want_u) ? similar(r.proto, length(pp)) : nothing
    call_python(r, r.vjp, du, gu, gp, λλ, uu, pp, tt)
    # copies: the solver may reuse the buffers λ and u point into
    c.λ, c.u, c.p, c.t, c.du, c.gu, c.gp = copy(λλ), copy(uu), pp === c.p ? pp : copy(pp), tt, du, gu, gp
    c.valid = true
    return copy(want_u ? gu : gp)
end

"""`vjp` hook of the `ODEFunction`: `(df/du)ᵀλ`, out of place `(λ, u, p, t)` or into `out`."""
struct PyVJP{R <: PyRHS}
    rhs::R
end
(v::PyVJP)(λ, u, p, t) = vjp!(v.rhs, λ, u, p, t, true)
(v::PyVJP)(out, λ, u, p, t) = (copyto!(out, vjp!(v.rhs, λ, u, p, t, true)); out)

"""`vjp_p` hook of the `ODEFunction`: `(df/dp)ᵀλ`, out of place or into `out` (GaussAdjoint and
QuadratureAdjoint call the in-place form whatever the problem's `iip`)."""
struct PyVJPp{R <: PyRHS}
    rhs::R
end
(v::PyVJPp)(λ, u, p, t) = vjp!(v.rhs, λ, u, p, t, false)
(v::PyVJPp)(out, λ, u, p, t) = (copyto!(out, vjp!(v.rhs, λ, u, p, t, false)); out)

"""`df/du` of a [`PyRHS`](@ref), out of place, for `ODEFunction(...; jac)`."""
struct PyJac{R <: PyRHS}
    rhs::R
end
function (j::PyJac)(u, p, t)
    r = j.rhs
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    J = similar(r.proto, length(uu), length(uu))
    call_python(r, r.jac, J, uu, pp, Float64(t))
    return J
end

"""`df/dt` of a [`PyRHS`](@ref), out of place, for `ODEFunction(...; tgrad)`."""
struct PyTgrad{R <: PyRHS}
    rhs::R
end
function (g::PyTgrad)(u, p, t)
    r = g.rhs
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    dT = similar(r.proto, length(uu))
    call_python(r, r.tgrad, dT, uu, pp, Float64(t))
    return dT
end

"""
    ode_function(rhs, alg)

The `ODEFunction` of `rhs`: always with the `vjp`/`vjp_p` hooks, and for implicit `alg` with the
exact `jac` and `tgrad` from torch.
"""
function ode_function(rhs::PyRHS, alg)
    if _isimplicit(alg)
        return ODEFunction{false, SciMLBase.FullSpecialize}(rhs; vjp = PyVJP(rhs),
            vjp_p = PyVJPp(rhs), jac = PyJac(rhs), tgrad = PyTgrad(rhs))
    end
    return ODEFunction{false, SciMLBase.FullSpecialize}(rhs; vjp = PyVJP(rhs), vjp_p = PyVJPp(rhs))
end

# ---------------------------------------------------------------------------------------------
# Algorithms
# ---------------------------------------------------------------------------------------------

"""Modules searched, in order, for an algorithm name passed through from Python."""
const ALG_MODULES = (
    OrdinaryDiffEq, OrdinaryDiffEqTsit5, OrdinaryDiffEqLowOrderRK, OrdinaryDiffEqVerner,
    OrdinaryDiffEqRosenbrock, OrdinaryDiffEqBDF, OrdinaryDiffEqSDIRK,
)

_isimplicit(alg) = alg isa OrdinaryDiffEqCore.OrdinaryDiffEqAlgorithm &&
    OrdinaryDiffEqCore.isimplicit(alg)

_finite_diff(ad::AutoFiniteDiff) = true
_finite_diff(ad::ADTypes.AutoSparse) = _finite_diff(ADTypes.dense_ad(ad))
_finite_diff(ad) = false

"""Names of the parts of `alg` that would differentiate the Python right-hand side with an AD
package (ForwardDiff dual numbers by default) instead of finite differences."""
function _ad_parts(alg)
    parts = alg isa OrdinaryDiffEqCore.CompositeAlgorithm ? alg.algs : (alg,)
    bad = String[]
    for a in parts
        uses_ad = hasfield(typeof(a), :autodiff) ? !_finite_diff(getfield(a, :autodiff)) :
            SciMLBase.forwarddiffs_model(a) === true
        uses_ad && push!(bad, string(nameof(typeof(a))))
    end
    return bad
end

"""
    check_alg(alg) -> alg

`alg` if the julia backend can solve with it: an ODE algorithm that never pushes AD numbers
(ForwardDiff duals) through the Python right-hand side; an `ArgumentError` naming the fix
otherwise.
"""
function check_alg(alg)
    alg isa SciMLBase.AbstractODEAlgorithm || throw(ArgumentError(
        "method must be an ODE algorithm (an OrdinaryDiffEq name such as \"Vern7\", or an " *
        "algorithm object such as diffeqpy's de.Vern7()), got a $(typeof(alg))"))
    bad = _ad_parts(alg)
    isempty(bad) || throw(ArgumentError(
        "$(join(bad, ", ")) would differentiate the Python right-hand side with automatic " *
        "differentiation (ForwardDiff dual numbers), which cannot pass through torch. Build it " *
        "with finite differences: $(first(bad))(autodiff = AutoFiniteDiff()) (diffeqpy: " *
        "de.$(first(bad))(autodiff=de.AutoFiniteDiff())), or pass its name as a string, which " *
        "does this for you. The Jacobian of the forward solve comes from torch either way " *
        "(ODEFunction jac/tgrad); finite differences only cover the rest, such as the Jacobian " *
        "of an adjoint solved with an implicit method."))
    return alg
end

"""
    make_alg(name)
    make_alg(alg)

The OrdinaryDiffEq algorithm called `name` (`"Tsit5"`, `"DP5"`, `"RK4"`, `"Rodas5P"`, ...),
constructed with its defaults; implicit methods get `autodiff = AutoFiniteDiff()` (ForwardDiff
dual numbers cannot pass through a Python right-hand side). An algorithm object (e.g. from
diffeqpy) is checked with [`check_alg`](@ref) and returned as it is. Anything else, including a
name that is not an algorithm type constructible without arguments, is an `ArgumentError`.
"""
function make_alg(name::AbstractString)
    occursin(r"^[A-Za-z_][A-Za-z0-9_]*$", name) ||
        throw(ArgumentError("not an algorithm name: $(repr(name))"))
    sym = Symbol(name)
    for m in ALG_MODULES
        isdefined(m, sym) || continue
        T = getfield(m, sym)
        if !(T isa Type && T <: SciMLBase.AbstractODEAlgorithm)
            T isa Function && throw(ArgumentError(
                "$name is a function that needs arguments (e.g. AutoTsit5(stiff_alg)), not an " *
                "algorithm type: build the algorithm in Julia, e.g. with diffeqpy " *
                "(de.$name(...)), and pass that object as method="))
            continue
        end
        # guard before constructing: abstract types and types without a zero-argument
        # constructor (CompositeAlgorithm, ...) would raise a MethodError
        (isabstracttype(T) || !hasmethod(T, Tuple{})) && throw(ArgumentError(
            "$name cannot be constructed from its name alone (it is abstract or needs " *
            "arguments): build it in Julia, e.g. with diffeqpy, and pass that object as method="))
        alg = T()
        if _isimplicit(alg)
            try
                alg = T(; autodiff = AutoFiniteDiff())
            catch err
                err isa MethodError || rethrow()  # no autodiff keyword: check_alg decides
            end
        end
        return check_alg(alg)
    end
    throw(ArgumentError("unknown OrdinaryDiffEq algorithm $(repr(name)); it was looked up in " *
        join(string.(nameof.(ALG_MODULES)), ", ")))
end
make_alg(alg) = check_alg(alg)

"""
    make_sensealg(kind; checkpointing, abstol, reltol)

`"backsolve"` → `BacksolveAdjoint`, `"interpolating"` → `InterpolatingAdjoint`,
`"quadrature"` → `QuadratureAdjoint` (its quadrature tolerances are `abstol`/`reltol`),
`"gauss"` → `GaussAdjoint`; always with `autojacvec = ZygoteVJP()` (an automatic choice
with a foreign call in the right-hand side has given all-zero gradients, SciMLSensitivity #334;
the `vjp`/`vjp_p` hooks of the `ODEFunction` take precedence over it where SciMLSensitivity
consults them).
"""
function make_sensealg(kind::AbstractString; checkpointing::Bool = false,
        abstol::Real = 1.0e-6, reltol::Real = 1.0e-3)
    vjp = ZygoteVJP()
    kind == "backsolve" && return BacksolveAdjoint(; autojacvec = vjp, checkpointing)
    kind == "interpolating" && return InterpolatingAdjoint(; autojacvec = vjp, checkpointing)
    kind == "quadrature" && return QuadratureAdjoint(; autojacvec = vjp,
        abstol = Float64(abstol), reltol = Float64(reltol))
    kind == "gauss" && return GaussAdjoint(; autojacvec = vjp, checkpointing)
    throw(ArgumentError("unknown sensitivity $(repr(kind)); use backsolve, interpolating, " *
        "quadrature or gauss"))
end

"""Whether the forward solution of `kind` must be dense (every step, interpolable)."""
needs_dense(kind::AbstractString, checkpointing::Bool) =
    kind in ("quadrature", "gauss") || (kind == "interpolating" && !checkpointing)

"""
    check_plan(alg, kind, checkpointing, adaptive, dt)

Refuse what would crash or give the gradient of another discretisation: a fixed-step solve
without `dt`, and a fixed-step forward with checkpointed interpolating/gauss adjoints (their
backward pass re-solves each checkpoint interval with the forward's algorithm and tolerances
only, without `dt`: "Fixed timestep methods require a choice of dt" for Euler, an adaptive
re-solve for RK4/Midpoint).
"""
function check_plan(alg, kind::AbstractString, checkpointing::Bool, adaptive, dt)
    name = string(nameof(typeof(alg)))
    fixed = adaptive === false || !SciMLBase.isadaptive(alg)
    fixed && dt === nothing && throw(ArgumentError(
        "$name steps with a fixed step size: pass options={'step_size': h}"))
    if fixed && checkpointing && kind in ("interpolating", "gauss")
        throw(ArgumentError(
            "a fixed-step forward solve ($name) cannot be used with checkpointed $kind " *
            "adjoints: SciMLSensitivity re-solves each checkpoint interval without the step " *
            "size. Use $kind without checkpointing, \"quadrature\" or \"backsolve\", or an " *
            "adaptive method"))
    end
    return nothing
end

_floats(x) = x === nothing ? nothing : Vector{Float64}(x)

function _solver_kwargs(; abstol, reltol, maxiters, dt, adaptive, tstops, dtmax)
    kw = Pair{Symbol, Any}[:abstol => abstol, :reltol => reltol, :maxiters => maxiters]
    adaptive === nothing || push!(kw, :adaptive => adaptive)
    dt === nothing || push!(kw, :dt => dt)
    dtmax === nothing || push!(kw, :dtmax => dtmax)
    tstops === nothing || push!(kw, :tstops => _floats(tstops))
    return (; kw...)
end

_stat(s, name) = s === nothing ? -1 : Int(getfield(s, name))

# ---------------------------------------------------------------------------------------------
# Forward solve and adjoint
# ---------------------------------------------------------------------------------------------

"""
    forward_solve(rhs, u0, p, ts, alg; kind, checkpointing, abstol, reltol, maxiters,
                  dt=nothing, adaptive=nothing, tstops=nothing, dtmax=nothing)

Solve `du/dt = rhs(u, p, t)` from `u(ts[1]) = u0` and return
`(sol, Y, ok, retcode, t_reached, nf, naccept, nreject)` where `Y[:, j] = u(ts[j])` and
`ok = SciMLBase.successful_retcode(sol)` (`Y` is unset when not `ok`). `alg` is an algorithm
name or object (see [`make_alg`](@ref)).

The saving policy is the one SciMLSensitivity's own rrule uses for `kind`: `backsolve` saves
only at `ts` (its checkpoints); checkpointed `interpolating`/`gauss` save `ts` plus the ends;
`interpolating`, `quadrature` and `gauss` otherwise keep the dense solution and read `Y` from
its interpolant.
"""
function forward_solve(rhs::PyRHS, u0, p, ts, alg_spec;
        kind::AbstractString, checkpointing::Bool = false, abstol::Real, reltol::Real,
        maxiters::Integer, dt = nothing, adaptive = nothing, tstops = nothing, dtmax = nothing)
    alg = make_alg(alg_spec)
    check_plan(alg, kind, checkpointing, adaptive, dt)
    return with_device(rhs.proto, rhs.device) do
        _invalidate!(rhs.cache)
        u = from_python(rhs.proto, u0)
        pv = from_python(rhs.proto, p)
        tv = Vector{Float64}(ts)
        prob = ODEProblem(ode_function(rhs, alg), u, (tv[1], tv[end]), pv)
        kw = _solver_kwargs(; abstol, reltol, maxiters, dt, adaptive, tstops, dtmax)
        sol = if needs_dense(kind, checkpointing)
            OrdinaryDiffEq.solve(prob, alg; save_start = true, save_end = true, kw...)
        else
            OrdinaryDiffEq.solve(prob, alg; saveat = tv, save_start = true, save_end = true, kw...)
        end
        ok = SciMLBase.successful_retcode(sol)
        Y = similar(rhs.proto, length(u), length(tv))
        if ok
            if !needs_dense(kind, checkpointing) && length(sol.t) == length(tv) && sol.t == tv
                for j in eachindex(tv)
                    Y[:, j] .= sol.u[j]
                end
            else
                for j in eachindex(tv)
                    Y[:, j] .= sol(tv[j])
                end
            end
        end
        sync_device(rhs.proto)
        s = sol.stats
        # Y stays in rhs.shares until the next call into Python; the Python side copies it at once
        (sol, to_python(rhs, Y), ok, String(Symbol(sol.retcode)), Float64(sol.t[end]),
            _stat(s, :nf), _stat(s, :naccept), _stat(s, :nreject))
    end
end

"""
    adjoint_solve(sol, ts, G, alg; kind, checkpointing, abstol, reltol, maxiters,
                  dt=nothing, adaptive=nothing, dtmax=nothing)

Gradients of `L` with `∂L/∂u(ts[j]) = G[:, j]` through the solve `sol`: returns `(du0, dp)`
from `adjoint_sensitivities(sol, alg; t = ts, dgdu_discrete, sensealg, abstol, reltol)`.
`G` is the `(length(ts), N)` C-ordered array of output gradients (Julia's `N × length(ts)`).
"""
function adjoint_solve(sol, ts, G, alg_spec; kind::AbstractString,
        checkpointing::Bool = false, abstol::Real, reltol::Real, maxiters::Integer,
        dt = nothing, adaptive = nothing, dtmax = nothing)
    rhs = sol.prob.f.f
    rhs isa PyRHS || throw(ArgumentError("not a pyode-bridge solution"))
    alg = make_alg(alg_spec)
    return with_device(rhs.proto, rhs.device) do
        tv = Vector{Float64}(ts)
        Gm = from_python_matrix(rhs.proto, G, length(sol.prob.u0), length(tv))
        dgdu(out, u, p, t, i) = (out .= view(Gm, :, i); nothing)
        sensealg = make_sensealg(kind; checkpointing, abstol, reltol)
        kw = _solver_kwargs(; abstol, reltol, maxiters, dt, adaptive, tstops = nothing, dtmax)
        _invalidate!(rhs.cache)
        rhs.cache.fuse = kind in ("interpolating", "backsolve")
        du0, dp = try
            adjoint_sensitivities(sol, alg; t = tv, dgdu_discrete = dgdu, sensealg, kw...)
        finally
            _invalidate!(rhs.cache)
        end
        gu = _dense(rhs.proto, du0)
        gp = dp === nothing ? similar(rhs.proto, 0) : _dense(rhs.proto, dp)
        sync_device(rhs.proto)
        (to_python(rhs, gu), to_python(rhs, gp))
    end
end

end # module PyodeBridge
