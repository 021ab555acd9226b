"""
    PyodeBridge

Julia half of pyode-bridge's `backend="julia"`: SciML ODE solves and adjoint sensitivities of a
right-hand side that lives in Python (a PyTorch module).

The right-hand side is a [`PyRHS`](@ref): an out-of-place callable `f(u, p, t)` whose
`ChainRulesCore.rrule` calls back into Python for one PyTorch forward with the graph kept and a
pullback returning `(df/du)ᵀλ` and `(df/dp)ᵀλ` together. SciMLSensitivity differentiates it with
`autojacvec = ZygoteVJP()`, which Zygote routes to that rrule. `p` is one flat parameter vector.

Python calls [`forward_solve`](@ref) and then, from `torch.autograd.Function.backward`,
[`adjoint_solve`](@ref) with the solution handle kept between the two.

Arrays cross without copies: CPU `Array`s reach Python as `juliacall.ArrayValue` (NumPy array
interface) and NumPy arrays reach Julia as `PyArray`. CUDA arrays go through DLPack, in the
`PyodeBridgeCUDAExt` extension (loaded when `CUDA` and `DLPack` are imported).
"""
module PyodeBridge

using ADTypes: AutoFiniteDiff
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

export PyRHS, forward_solve, adjoint_solve, make_alg, make_sensealg

"""Bumped whenever the Python side must change with this file (checked on load)."""
const API_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Array hand-off. Methods for CUDA arrays live in ext/PyodeBridgeCUDAExt.jl.
# ---------------------------------------------------------------------------------------------

"""
    to_python(x)

What a Python callback receives for the Julia array `x`: CPU arrays are passed as they are
(PythonCall wraps them as `juliacall.ArrayValue`, a zero-copy NumPy-compatible view);
CUDA arrays become a `torch.Tensor` sharing the memory (DLPack, in the CUDA extension).
"""
to_python(x::Array) = x

"""
    from_python(proto, x)

A Julia array owned by Julia, of the same kind as `proto` (`Vector{T}`, `CuVector{T}`), with the
contents of the Python array `x` (a NumPy array arriving as `PyArray`, or for CUDA a torch
tensor read through DLPack). Always copies: the solver must not hold memory owned by torch.
"""
from_python(proto::Array{T}, x) where {T} = Array{T}(x)

"""
    sync_device(proto)

Wait for queued device work before Python reads Julia arrays (no-op on the CPU; CUDA
synchronisation in the extension, because torch and CUDA.jl use different streams).
"""
sync_device(::Array) = nothing

"""
    cuda_proto(T)

A zero-length `CuVector{T}` (defined by the CUDA extension; errors when it is not loaded).
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
    PyRHS(forward, forward_graph, pullback, jac, tgrad, proto)

An out-of-place ODE right-hand side `f(u, p, t)` computed in Python.

- `forward(du, u, p, t)`: writes `f(u, p, t)` into `du` (no autograd graph).
- `forward_graph(du, u, p, t) -> token::Int`: the same, keeping the autograd graph under `token`.
- `pullback(token, λ, gu, gp)`: writes `(df/du)ᵀλ` into `gu` and `(df/dp)ᵀλ` into `gp` and frees
  the graph.
- `jac(J, u, p, t)`, `tgrad(dT, u, p, t)`: `df/du` and `df/dt` for implicit (stiff) methods.
- `proto`: a zero-length array of the state's kind (`Vector{Float64}`, `CuVector{Float32}`, ...).

Every array argument is allocated by Julia and handed over with [`to_python`](@ref); Python
writes its results into them, so nothing is copied on the way in and one copy (torch's result
into the Julia buffer) is made on the way out.
"""
struct PyRHS{A <: AbstractVector}
    forward::Py
    forward_graph::Py
    pullback::Py
    jac::Py
    tgrad::Py
    proto::A
end

function PyRHS(forward, forward_graph, pullback, jac, tgrad, dtype::AbstractString,
        device::AbstractString = "cpu")
    T = dtype == "float32" ? Float32 : dtype == "float64" ? Float64 :
        throw(ArgumentError("dtype must be \"float32\" or \"float64\", got $(repr(dtype))"))
    proto = device == "cpu" ? Vector{T}(undef, 0) :
        device == "cuda" ? cuda_proto(T) :
        throw(ArgumentError("device must be \"cpu\" or \"cuda\", got $(repr(device))"))
    return PyRHS(Py(forward), Py(forward_graph), Py(pullback), Py(jac), Py(tgrad), proto)
end

function (r::PyRHS)(u, p, t)
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    du = similar(r.proto, length(uu))
    sync_device(r.proto)
    r.forward(to_python(du), to_python(uu), to_python(pp), Float64(t))
    return du
end

function ChainRulesCore.rrule(r::PyRHS, u, p, t)
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    du = similar(r.proto, length(uu))
    sync_device(r.proto)
    token = pyconvert(Int, r.forward_graph(to_python(du), to_python(uu), to_python(pp), Float64(t)))
    function pyrhs_pullback(Δ)
        λ = _dense(r.proto, unthunk(Δ))
        if λ === nothing  # a zero cotangent: still release the graph kept in Python
            λ = fill!(similar(r.proto, length(uu)), 0)
        end
        gu = similar(r.proto, length(uu))
        gp = similar(r.proto, length(pp))
        sync_device(r.proto)
        r.pullback(token, to_python(λ), to_python(gu), to_python(gp))
        return NoTangent(), gu, gp, NoTangent()
    end
    return du, pyrhs_pullback
end

"""`df/du` of a [`PyRHS`](@ref), out of place, for `ODEFunction(...; jac)`."""
struct PyJac{R <: PyRHS}
    rhs::R
end
function (j::PyJac)(u, p, t)
    r = j.rhs
    uu = _dense(r.proto, u)
    pp = _dense(r.proto, p)
    J = similar(r.proto, length(uu), length(uu))
    sync_device(r.proto)
    r.jac(to_python(J), to_python(uu), to_python(pp), Float64(t))
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
    sync_device(r.proto)
    r.tgrad(to_python(dT), to_python(uu), to_python(pp), Float64(t))
    return dT
end

# ---------------------------------------------------------------------------------------------
# Algorithms
# ---------------------------------------------------------------------------------------------

"""Modules searched, in order, for an algorithm name passed through from Python."""
const ALG_MODULES = (
    OrdinaryDiffEq, OrdinaryDiffEqTsit5, OrdinaryDiffEqLowOrderRK, OrdinaryDiffEqVerner,
    OrdinaryDiffEqRosenbrock, OrdinaryDiffEqBDF, OrdinaryDiffEqSDIRK,
)

"""
    make_alg(name)

The OrdinaryDiffEq algorithm called `name` (`"Tsit5"`, `"DP5"`, `"RK4"`, `"Rodas5P"`, ...),
constructed with its defaults. Implicit methods get `autodiff = AutoFiniteDiff()`: ForwardDiff
dual numbers cannot pass through a Python right-hand side (the Jacobian itself comes from torch
through `ODEFunction(...; jac, tgrad)`; finite differences only cover what remains, such as the
Jacobian of an adjoint solved with an implicit method).
"""
function make_alg(name::AbstractString)
    occursin(r"^[A-Za-z_][A-Za-z0-9_]*$", name) ||
        throw(ArgumentError("not an algorithm name: $(repr(name))"))
    sym = Symbol(name)
    for m in ALG_MODULES
        isdefined(m, sym) || continue
        T = getfield(m, sym)
        T isa Type && T <: SciMLBase.AbstractODEAlgorithm || continue
        alg = T()
        if _isimplicit(alg)
            try
                return T(; autodiff = AutoFiniteDiff())
            catch err
                err isa MethodError || rethrow()
            end
        end
        return alg
    end
    throw(ArgumentError("unknown OrdinaryDiffEq algorithm $(repr(name)); it was looked up in " *
        join(string.(nameof.(ALG_MODULES)), ", ")))
end

_isimplicit(alg) = alg isa OrdinaryDiffEqCore.OrdinaryDiffEqAlgorithm &&
    OrdinaryDiffEqCore.isimplicit(alg)

"""
    make_sensealg(kind; checkpointing, abstol, reltol)

`"backsolve"` → `BacksolveAdjoint`, `"interpolating"` → `InterpolatingAdjoint`,
`"quadrature"` → `QuadratureAdjoint` (its quadrature tolerances are `abstol`/`reltol`),
`"gauss"` → `GaussAdjoint`; always with `autojacvec = ZygoteVJP()` (an automatic choice
with a foreign call in the right-hand side has given all-zero gradients, SciMLSensitivity #334).
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
    forward_solve(rhs, u0, p, ts, alg_name; kind, checkpointing, abstol, reltol, maxiters,
                  dt=nothing, adaptive=nothing, tstops=nothing, dtmax=nothing)

Solve `du/dt = rhs(u, p, t)` from `u(ts[1]) = u0` and return
`(sol, Y, ok, retcode, t_reached, nf, naccept, nreject)` where `Y[:, j] = u(ts[j])` and
`ok = SciMLBase.successful_retcode(sol)` (`Y` is unset when not `ok`).

The saving policy is the one SciMLSensitivity's own rrule uses for `kind`: `backsolve` saves
only at `ts` (its checkpoints); checkpointed `interpolating`/`gauss` save `ts` plus the ends;
`interpolating`, `quadrature` and `gauss` otherwise keep the dense solution and read `Y` from
its interpolant.
"""
function forward_solve(rhs::PyRHS, u0, p, ts, alg_name::AbstractString;
        kind::AbstractString, checkpointing::Bool = false, abstol::Real, reltol::Real,
        maxiters::Integer, dt = nothing, adaptive = nothing, tstops = nothing, dtmax = nothing)
    u = from_python(rhs.proto, u0)
    pv = from_python(rhs.proto, p)
    tv = Vector{Float64}(ts)
    alg = make_alg(alg_name)
    f = if _isimplicit(alg)
        ODEFunction{false, SciMLBase.FullSpecialize}(rhs; jac = PyJac(rhs), tgrad = PyTgrad(rhs))
    else
        ODEFunction{false, SciMLBase.FullSpecialize}(rhs)
    end
    prob = ODEProblem(f, u, (tv[1], tv[end]), pv)
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
    return (sol, to_python(Y), ok, String(Symbol(sol.retcode)), Float64(sol.t[end]), _stat(s, :nf),
        _stat(s, :naccept), _stat(s, :nreject))
end

"""
    adjoint_solve(sol, ts, G, alg_name; kind, checkpointing, abstol, reltol, maxiters,
                  dt=nothing, adaptive=nothing, dtmax=nothing)

Gradients of `L` with `∂L/∂u(ts[j]) = G[:, j]` through the solve `sol`: returns `(du0, dp)`
from `adjoint_sensitivities(sol, alg; t = ts, dgdu_discrete, sensealg, abstol, reltol)`.
"""
function adjoint_solve(sol, ts, G, alg_name::AbstractString; kind::AbstractString,
        checkpointing::Bool = false, abstol::Real, reltol::Real, maxiters::Integer,
        dt = nothing, adaptive = nothing, dtmax = nothing)
    rhs = sol.prob.f.f
    rhs isa PyRHS || throw(ArgumentError("not a pyode-bridge solution"))
    tv = Vector{Float64}(ts)
    Gm = _matrix(rhs.proto, G)
    size(Gm) == (length(sol.prob.u0), length(tv)) ||
        throw(DimensionMismatch("G must be $(length(sol.prob.u0))×$(length(tv)), got $(size(Gm))"))
    dgdu(out, u, p, t, i) = (out .= view(Gm, :, i); nothing)
    sensealg = make_sensealg(kind; checkpointing, abstol, reltol)
    alg = make_alg(alg_name)
    kw = _solver_kwargs(; abstol, reltol, maxiters, dt, adaptive, tstops = nothing, dtmax)
    du0, dp = adjoint_sensitivities(sol, alg; t = tv, dgdu_discrete = dgdu, sensealg, kw...)
    gu = _dense(rhs.proto, du0)
    gp = dp === nothing ? similar(rhs.proto, 0) : _dense(rhs.proto, dp)
    sync_device(rhs.proto)
    return (to_python(gu), to_python(gp))
end

_matrix(proto::Array{T}, G) where {T} = Matrix{T}(G)
# CUDA: from_python copies into a CuArray of the same shape (see the extension).
_matrix(proto, G) = from_python(proto, G)

end # module PyodeBridge
