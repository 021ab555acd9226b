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
using SciMLSensitivity: BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint, GaussAdjoint,
    ZygoteVJP
using PyodeBridge

pyexec(
    """
    class Linear:
        # du/dt = p * u componentwise, written against juliacall arrays (0-based indexing).
        def __init__(self):
            self.graphs = {}
            self.next = 0
            self.calls = 0

        def forward(self, du, u, p, t):
            self.calls += 1
            for i in range(len(u)):
                du[i] = p[i] * u[i]

        def forward_graph(self, du, u, p, t):
            self.forward(du, u, p, t)
            self.next += 1
            self.graphs[self.next] = ([float(x) for x in u], [float(x) for x in p])
            return self.next

        def pullback(self, token, lam, gu, gp):
            u, p = self.graphs.pop(token)
            for i in range(len(u)):
                gu[i] = p[i] * lam[i]
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
    return lin, PyRHS(lin.forward, lin.forward_graph, lin.pullback, lin.jac, lin.tgrad, dtype)
end

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
        @test make_alg("Tsit5") isa PyodeBridge.OrdinaryDiffEqTsit5.Tsit5
        @test make_alg("DP5") isa PyodeBridge.OrdinaryDiffEqLowOrderRK.DP5
        @test make_alg("RK4") isa PyodeBridge.OrdinaryDiffEqLowOrderRK.RK4
        @test make_alg("Euler") isa PyodeBridge.OrdinaryDiffEqLowOrderRK.Euler
        @test PyodeBridge._isimplicit(make_alg("Rodas5P"))
        @test !PyodeBridge._isimplicit(make_alg("Tsit5"))
        @test_throws ArgumentError make_alg("NotAMethod")
        @test_throws ArgumentError make_alg("Tsit5(); rm(\"x\")")
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
        _, rhs = linear_rhs()
        sol = first(forward_solve(rhs, U0, P, TS, "Tsit5"; kind, checkpointing = ckpt, TIGHT...))
        du0, dp = adjoint_solve(sol, TS, G, "Tsit5"; kind, checkpointing = ckpt, TIGHT...)
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
        rhs = PyRHS(bad, lin.forward_graph, lin.pullback, lin.jac, lin.tgrad, "float64")
        @test_throws PyException forward_solve(rhs, U0, P, TS, "Tsit5"; kind = "backsolve",
            TIGHT...)
    end
end
