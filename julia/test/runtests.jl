# Tests of the PyodeBridge Julia package on its own (no torch): a pure-Python right-hand side
# du/dt = p .* u, whose solution u(t) = u0 .* exp.(p .* t) gives exact values and gradients.
#
# Run either from Python, in the environment juliapkg installed (what pyode-bridge's pytest
# suite does):
#     python -c "import juliacall; juliacall.Main.include('julia/test/runtests.jl')"
# or from Julia in a project that has PyodeBridge developed:
#     julia --project=<that project> julia/test/runtests.jl
using Test
using PythonCall
using ChainRulesCore
using SciMLBase: SciMLBase
using SciMLSensitivity: BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint, GaussAdjoint,
    ZygoteVJP
using ADTypes: AutoFiniteDiff
using PyodeBridge
using PyodeBridge: OrdinaryDiffEqTsit5, OrdinaryDiffEqLowOrderRK, OrdinaryDiffEqRosenbrock

pyexec(
    """
    class Linear:
        # du/dt = p * u componentwise, written against juliacall arrays (0-based indexing).
        def __init__(self):
            self.graphs = {}
            self.next = 0
            self.calls = 0
            self.graph_calls = 0
            self.vjp_calls = []   # (wanted gu, wanted gp) per call

        def forward(self, du, u, p, t):
            self.calls += 1
            for i in range(len(u)):
                du[i] = p[i] * u[i]

        def forward_graph(self, du, u, p, t):
            self.graph_calls += 1
            self.forward(du, u, p, t)
            self.next += 1
            self.graphs[self.next] = ([float(x) for x in u], [float(x) for x in p])
            return self.next

        def pullback(self, token, lam, gu, gp):
            u, p = self.graphs.pop(token)
            for i in range(len(u)):
                gu[i] = p[i] * lam[i]
                gp[i] = u[i] * lam[i]

        def vjp(self, du, gu, gp, lam, u, p, t):
            self.vjp_calls.append((gu is not None, gp is not None))
            self.forward(du, u, p, t)
            for i in range(len(u)):
                if gu is not None:
                    gu[i] = p[i] * lam[i]
                if gp is not None:
                    gp[i] = u[i] * lam[i]

        def jac(self, J, u, p, t):
            for i in range(len(u)):
                for j in range(len(u)):
                    J[i, j] = p[i] if i == j else 0.0

        def tgrad(self, dT, u, p, t):
            for i in range(len(u)):
                dT[i] = 0.0
    """,
    @__MODULE__,
)

function linear_rhs(dtype = "float64")
    lin = pyeval("Linear()", @__MODULE__)
    return lin, PyRHS(lin.forward, lin.forward_graph, lin.pullback, lin.vjp, lin.jac, lin.tgrad,
        dtype)
end

calls(lin) = pyconvert(Vector{Tuple{Bool, Bool}}, lin.vjp_calls)
count_of(lin, name) = pyconvert(Int, getproperty(lin, name))

const U0 = [1.0, 2.0]
const P = [-0.5, 0.3]
const TS = [0.0, 0.25, 0.7, 1.0]
const G = [1.0 0.5 -2.0 1.0; 0.0 1.0 0.25 3.0]   # dL/du(ts[j]) = G[:, j]

exact(t) = U0 .* exp.(P .* t)
exact_du0() = [sum(G[i, j] * exp(P[i] * TS[j]) for j in eachindex(TS)) for i in 1:2]
exact_dp() = [sum(G[i, j] * U0[i] * TS[j] * exp(P[i] * TS[j]) for j in eachindex(TS)) for i in 1:2]

const TIGHT = (abstol = 1.0e-11, reltol = 1.0e-11, maxiters = 100_000)

@testset "PyodeBridge" begin
    @testset "algorithm names" begin
        @test make_alg("Tsit5") isa OrdinaryDiffEqTsit5.Tsit5
        @test make_alg("DP5") isa OrdinaryDiffEqLowOrderRK.DP5
        @test make_alg("RK4") isa OrdinaryDiffEqLowOrderRK.RK4
        @test make_alg("Euler") isa OrdinaryDiffEqLowOrderRK.Euler
        @test PyodeBridge._isimplicit(make_alg("Rodas5P"))
        @test make_alg("Rodas5P").autodiff isa AutoFiniteDiff
        @test !PyodeBridge._isimplicit(make_alg("Tsit5"))
        @test_throws ArgumentError make_alg("NotAMethod")
        @test_throws ArgumentError make_alg("Tsit5(); rm(\"x\")")
        # names that are not constructible without arguments: ArgumentError, not MethodError
        for name in ("AutoTsit5", "OrdinaryDiffEqAdaptiveAlgorithm", "AbstractODEAlgorithm")
            err = try
                make_alg(name)
                nothing
            catch e
                e
            end
            @test err isa ArgumentError
        end
    end

    @testset "algorithm objects (what diffeqpy's de.Vern7() hands over)" begin
        tsit = OrdinaryDiffEqTsit5.Tsit5()
        @test make_alg(tsit) === tsit
        fd = OrdinaryDiffEqRosenbrock.Rodas5P(autodiff = AutoFiniteDiff())
        @test make_alg(fd) === fd
        # ForwardDiff (the default of implicit methods) would push dual numbers into Python
        err = try
            make_alg(OrdinaryDiffEqRosenbrock.Rodas5P())
            nothing
        catch e
            e
        end
        @test err isa ArgumentError
        @test occursin("AutoFiniteDiff", sprint(showerror, err))
        @test_throws ArgumentError make_alg(42)
        @test_throws ArgumentError make_alg(BacksolveAdjoint())
    end

    @testset "fixed-step plans that would crash or mislead are refused" begin
        _, rhs = linear_rhs()
        # checkpointed interpolating/gauss re-solve checkpoint intervals without dt
        for kind in ("interpolating", "gauss")
            @test_throws ArgumentError forward_solve(rhs, U0, P, TS, "Euler"; kind,
                checkpointing = true, TIGHT..., adaptive = false, dt = 1.0e-3)
            @test_throws ArgumentError forward_solve(rhs, U0, P, TS, "RK4"; kind,
                checkpointing = true, TIGHT..., adaptive = false, dt = 1.0e-3)
        end
        # a fixed-step algorithm object without a step size
        @test_throws ArgumentError forward_solve(rhs, U0, P, TS, OrdinaryDiffEqLowOrderRK.Euler();
            kind = "backsolve", TIGHT...)
        # without checkpointing the same fixed-step solve is fine
        sol, Y, ok = forward_solve(rhs, U0, P, TS, "RK4"; kind = "interpolating", TIGHT...,
            adaptive = false, dt = 1.0e-3)
        @test ok
        @test Y[:, end] ≈ exact(TS[end]) rtol = 1.0e-8
    end

    @testset "sensitivity algorithms" begin
        @test make_sensealg("backsolve") isa BacksolveAdjoint
        @test make_sensealg("interpolating"; checkpointing = true).checkpointing
        @test make_sensealg("quadrature"; abstol = 1.0e-9, reltol = 1.0e-8).abstol == 1.0e-9
        @test make_sensealg("gauss") isa GaussAdjoint
        for kind in ("backsolve", "interpolating", "quadrature", "gauss")
            @test make_sensealg(kind).autojacvec isa ZygoteVJP
        end
        @test_throws ArgumentError make_sensealg("backprop")
    end

    @testset "rrule calls the Python pullback" begin
        lin, rhs = linear_rhs()
        u = [1.5, -2.0]
        du, back = ChainRulesCore.rrule(rhs, u, P, 0.1)
        @test du ≈ P .* u
        _, gu, gp, _ = back([2.0, 3.0])
        @test gu ≈ P .* [2.0, 3.0]
        @test gp ≈ u .* [2.0, 3.0]
        @test pyconvert(Int, pylen(lin.graphs)) == 0   # the pullback freed the kept graph
        @test rhs(u, P, 0.0) ≈ P .* u
    end

    @testset "vjp hooks: one Python call serves u and p when fused" begin
        lin, rhs = linear_rhs()
        f = PyodeBridge.ode_function(rhs, make_alg("Tsit5"))
        @test SciMLBase.has_vjp(f) && SciMLBase.has_vjp_p(f)
        u, λ, t = [1.5, -2.0], [2.0, 3.0], 0.1
        rhs.cache.fuse = true
        @test f.vjp(λ, u, P, t) ≈ P .* λ
        @test f.vjp_p(λ, u, P, t) ≈ u .* λ
        @test calls(lin) == [(true, true)]          # the second product came from the cache
        @test rhs(u, P, t) ≈ P .* u                  # and so did f(u, p, t)
        @test count_of(lin, :calls) == 1
        out = zeros(2)
        f.vjp_p(out, λ, u, P, t)                     # GaussAdjoint's in-place form
        @test out ≈ u .* λ
        @test length(calls(lin)) == 1
        # another point: a new call
        @test f.vjp([1.0, 1.0], u, P, t) ≈ P
        @test length(calls(lin)) == 2
        # unfused (gauss/quadrature): each product asks Python for its own gradient only
        PyodeBridge._invalidate!(rhs.cache)
        rhs.cache.fuse = false
        @test f.vjp(λ, u, P, t) ≈ P .* λ
        @test f.vjp_p(λ, [0.5, 0.5], P, t) ≈ [0.5, 0.5] .* λ
        @test calls(lin)[end - 1:end] == [(true, false), (false, true)]
    end

    @testset "forward solve: $method" for (method, kw) in (
            ("Tsit5", (;)), ("DP5", (;)), ("Rodas5P", (;)),
            ("RK4", (adaptive = false, dt = 1.0e-3)),
        )
        _, rhs = linear_rhs()
        sol, Y, ok, retcode, t_end, nf, naccept, nreject = forward_solve(
            rhs, U0, P, TS, method; kind = "backsolve", TIGHT..., kw...)
        @test ok && retcode == "Success"
        @test t_end == TS[end]
        @test nf > 0 && naccept > 0 && nreject >= 0
        for j in eachindex(TS)
            @test Y[:, j] ≈ exact(TS[j]) rtol = 1.0e-8
        end
    end

    @testset "float32 state" begin
        _, rhs = linear_rhs("float32")
        sol, Y, ok = forward_solve(rhs, Float32.(U0), Float32.(P), TS, "Tsit5";
            kind = "interpolating", abstol = 1.0e-6, reltol = 1.0e-6, maxiters = 10_000)
        @test ok
        @test eltype(Y) == Float32
        @test Y[:, end] ≈ exact(TS[end]) rtol = 1.0e-4
    end

    @testset "adjoint: $kind (checkpointing=$ckpt)" for (kind, ckpt) in (
            ("backsolve", true), ("interpolating", false), ("interpolating", true),
            ("quadrature", false), ("gauss", false), ("gauss", true),
        )
        lin, rhs = linear_rhs()
        sol = first(forward_solve(rhs, U0, P, TS, "Tsit5"; kind, checkpointing = ckpt, TIGHT...))
        du0, dp = adjoint_solve(sol, TS, G, "Tsit5"; kind, checkpointing = ckpt, TIGHT...)
        @test du0 ≈ exact_du0() rtol = 1.0e-6
        @test dp ≈ exact_dp() rtol = 1.0e-6
        # SciMLSensitivity used the vjp/vjp_p hooks, not Zygote through the rrule
        c = calls(lin)
        @test !isempty(c)
        @test count_of(lin, :graph_calls) == 0
        fused = kind in ("interpolating", "backsolve")
        @test all(==(fused ? (true, true) : (true, false)), filter(first, c))
        fused || @test (false, true) in c   # the quadrature asked for (df/dp)ᵀλ alone
    end

    @testset "adjoint with a fixed-step method (no checkpointing)" begin
        _, rhs = linear_rhs()
        kw = (adaptive = false, dt = 1.0e-3)
        sol = first(forward_solve(rhs, U0, P, TS, "RK4"; kind = "gauss", TIGHT..., kw...))
        du0, dp = adjoint_solve(sol, TS, G, "RK4"; kind = "gauss", TIGHT..., kw...)
        @test du0 ≈ exact_du0() rtol = 1.0e-6
        @test dp ≈ exact_dp() rtol = 1.0e-6
    end

    @testset "failed solve reports its return code" begin
        _, rhs = linear_rhs()
        _, _, ok, retcode, t_end = forward_solve(rhs, U0, P, TS, "Tsit5"; kind = "backsolve",
            abstol = 1.0e-12, reltol = 1.0e-12, maxiters = 3)
        @test !ok
        @test retcode != "Success"
        @test t_end < TS[end]
    end

    @testset "Python errors propagate" begin
        bad = pyeval("lambda du, u, p, t: 1 / 0", @__MODULE__)
        lin = pyeval("Linear()", @__MODULE__)
        rhs = PyRHS(bad, lin.forward_graph, lin.pullback, lin.vjp, lin.jac, lin.tgrad, "float64")
        @test_throws PyException forward_solve(rhs, U0, P, TS, "Tsit5"; kind = "backsolve",
            TIGHT...)
    end
end
