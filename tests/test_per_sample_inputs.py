"""Per-sample mode's inputs (issue 18): layers taking a (B,) t, the func probe and the option and
time validation the front door will call."""
import pytest
import torch

from pyode_bridge._validate import check_per_sample_func, check_sample_stops, check_sample_times, per_sample_options
from pyode_bridge.models.cnf import CNFDynamics, ConcatSquashMLP
from pyode_bridge.nn import ConcatConv2d, ConcatSquashLinear, ODEConvFunc

B = 4


def _times():
    return torch.tensor([0.0, 0.3, -1.2, 2.5], dtype=torch.float64)


def _rows_match_single_calls(layer, x):
    """Row b of layer(t, x) with t (B,) equals row b of layer(t[b], x) with a 0-d time."""
    t = _times()
    out = layer(t, x)
    for b in range(B):
        torch.testing.assert_close(out[b], layer(t[b], x)[b], rtol=1e-12, atol=1e-12)
    # Rows really see different times (a layer ignoring t would pass the loop above too).
    assert not torch.allclose(out[0], layer(t[1], x)[0])
    return out


@pytest.mark.parametrize("shape", [(B, 3), (B, 2, 3)])
def test_concat_squash_linear_per_row_time(shape):
    torch.manual_seed(0)
    _rows_match_single_calls(ConcatSquashLinear(3, 5).double(), torch.randn(*shape, dtype=torch.float64))


def test_concat_squash_linear_float64_time_float32_state():
    torch.manual_seed(0)
    layer, x = ConcatSquashLinear(3, 5), torch.randn(B, 3)
    assert layer(_times(), x).dtype == torch.float32
    torch.testing.assert_close(layer(_times(), x)[2], layer(_times()[2], x)[2])


def test_conv_layers_per_row_time():
    torch.manual_seed(0)
    x = torch.randn(B, 2, 5, 5, dtype=torch.float64)
    _rows_match_single_calls(ConcatConv2d(2, 3).double(), x)
    _rows_match_single_calls(ODEConvFunc(2, 3, time_dependent=True).double(), x)


def test_cnf_fields_per_row_time():
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, hidden=(8, 8)).double()
    z = torch.randn(B, 2, dtype=torch.float64)
    _rows_match_single_calls(net, z)
    dyn = CNFDynamics(net, "exact")
    t = _times()
    dz, dlogp = dyn(t, (z, torch.zeros(B, dtype=torch.float64)))
    assert dz.shape == (B, 2) and dlogp.shape == (B,)
    for b in range(B):
        dz_b, dlogp_b = dyn(t[b], (z, torch.zeros(B, dtype=torch.float64)))
        torch.testing.assert_close(dz[b], dz_b[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dlogp[b], dlogp_b[b], rtol=1e-12, atol=1e-12)


def test_layer_time_of_wrong_length_is_named():
    with pytest.raises(ValueError, match=r"t of shape \(3,\) for an input of shape \(4, 3\)"):
        ConcatSquashLinear(3, 5)(torch.zeros(3), torch.zeros(B, 3))


# --- the func probe --------------------------------------------------------------------------------


def test_func_probe_accepts_per_row_funcs():
    y0 = torch.randn(B, 3)
    check_per_sample_func(lambda t, y: -t[:, None] * y, y0, torch.zeros(B))
    check_per_sample_func(CNFDynamics(ConcatSquashMLP(3, (8,))), (y0, torch.zeros(B)), torch.ones(B))


@pytest.mark.parametrize("func, problem", [
    (lambda t, y: float(t) * y, "raised TypeError|raised RuntimeError|raised ValueError"),
    (lambda t, y: t * y, r"raised RuntimeError"),  # (B,) against (B, 3): no broadcast
    (lambda t, y: t[:, None, None] * y, r"returned shape \(4, 4, 3\), but y0 has shape \(4, 3\)"),
])
def test_func_probe_names_the_fix(func, problem):
    with pytest.raises(ValueError, match=problem) as info:
        check_per_sample_func(func, torch.randn(B, 3), torch.zeros(B))
    assert "in per-sample mode func receives t of shape (B,)" in str(info.value)


def test_func_probe_checks_tuple_structure():
    y0 = (torch.randn(B, 2), torch.zeros(B))
    with pytest.raises(ValueError, match=r"returned shape \(\(4, 2\), \(4, 4\)\)"):
        check_per_sample_func(lambda t, s: (s[0], t[:, None] * s[1]), y0, torch.zeros(B))
    with pytest.raises(ValueError, match=r"returned shape \(4, 2\)"):
        check_per_sample_func(lambda t, s: s[0], y0, torch.zeros(B))


# --- options -----------------------------------------------------------------------------------------


def test_options_defaults_and_implication():
    assert per_sample_options(None, 1) == ("joint", "raise", {})
    assert per_sample_options({"step_size": 0.1}, 2) == ("per_sample", "raise", {"step_size": 0.1})
    opts = {"step_control": "per_sample", "on_failure": "mask", "max_num_steps": 5}
    assert per_sample_options(opts, 1) == ("per_sample", "mask", {"max_num_steps": 5})
    assert "step_control" in opts  # the caller's dict is left alone


@pytest.mark.parametrize("options, t_dim, match", [
    ([("step_control", "per_sample")], 1, "options must be a dict"),
    ({"step_control": "row"}, 1, r"options\['step_control'\] must be 'joint' .* got 'row'"),
    ({"step_control": "joint"}, 2, r"a 2-D t .* options\['step_control'\] is 'joint'"),
    ({"on_failure": "skip", "step_control": "per_sample"}, 1, r"options\['on_failure'\] must be .* got 'skip'"),
    ({"on_failure": "mask"}, 1, r"'mask' .* needs per-sample control"),
])
def test_options_errors(options, t_dim, match):
    with pytest.raises(ValueError, match=match):
        per_sample_options(options, t_dim)


# --- 2-D t -------------------------------------------------------------------------------------------


def _t2():
    return torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.3, 2.0], [-1.0, 0.0, 0.1], [0.0, 1e-3, 5.0]])


def test_sample_times_accepted():
    t = _t2()
    assert check_sample_times(t, torch.zeros(B, 2), t.device) is t
    assert check_sample_times(-t, (torch.zeros(B, 2), torch.zeros(B)), t.device) is not None
    assert check_sample_times(t[:, :1], torch.zeros(B), t.device) is not None


def _bad(t, y0, match):
    with pytest.raises(ValueError, match=match):
        check_sample_times(t, y0, torch.device("cpu"))


def test_sample_times_errors():
    y0 = torch.zeros(B, 2)
    _bad([[0.0, 1.0]] * B, y0, "must be a tensor of shape")
    _bad(torch.zeros(B, 3, 1), y0, r"got shape \(4, 3, 1\)")
    _bad(torch.zeros(B, 0), y0, r"got shape \(4, 0\)")
    _bad(torch.zeros(B, 2, dtype=torch.long), y0, "floating-point")
    _bad(_t2()[:3], y0, "t has 3 rows but y0 has batch size 4")
    _bad(_t2(), (y0, torch.zeros(3)), r"y0\[1\] has shape \(3,\)")
    _bad(_t2(), torch.zeros(()), r"y0 has shape \(\)")
    t = _t2()
    t[2, 1] = float("nan")
    _bad(t, y0, r"t\[2, 1\] = nan")
    t = _t2()
    t[1, 2] = 0.3
    _bad(t, y0, r"t\[1, 1\] = t\[1, 2\] = 0.3")
    t = _t2()
    t[3, 2] = -1.0
    _bad(t, y0, r"row 3 turns at t\[3, 2\]")
    t = _t2()
    t[1] = t[1].flip(0)
    _bad(t, y0, "row 0 increases and row 1 does not")


# --- per-row stops -------------------------------------------------------------------------------


def test_sample_stops():
    shared = torch.tensor([0.5])
    assert check_sample_stops(None, shared, B) == (None, shared)
    step_t, jump_t = check_sample_stops(torch.rand(B, 2), torch.rand(B, 1) + 2, B)
    assert step_t.shape == (B, 2) and jump_t.dtype == torch.float64
    with pytest.raises(ValueError, match=r"options\['jump_t'\] per row must have shape \(B, K\) = \(4, K\)"):
        check_sample_stops(None, torch.rand(3, 2), B)
    bad = torch.rand(B, 2)
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"options\['step_t'\]\[1, 0\] is NaN or Inf"):
        check_sample_stops(bad, None, B)
    step_t = torch.rand(B, 2)
    jump_t = torch.full((B, 1), 7.0)
    jump_t[2, 0] = step_t[2, 1]
    with pytest.raises(ValueError, match="repeated elements between them .row 2"):
        check_sample_stops(step_t, jump_t, B)
    with pytest.raises(ValueError, match="repeated elements between them .row 0 has 0.5 twice"):
        check_sample_stops(torch.tensor([[0.5], [0.6], [0.7], [0.8]]), [0.5, 3.0], B)
    assert check_sample_stops(torch.tensor([[0.5], [0.6], [0.7], [0.8]]), [0.55, 3.0], B)[1] == [0.55, 3.0]
