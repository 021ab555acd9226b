"""Smoke tests of the example scripts: each ``main(argv)`` on tiny problems, with sanity checks of the
numbers they produce, and the bit-identical resume of ``train_cifar.py`` after a simulated kill."""
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import pyode_bridge as pob
from pyode_bridge.data import write_fake_cifar
from pyode_bridge.utils import load_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import compare_sensitivities  # noqa: E402
import irregular_spirals  # noqa: E402
import train_cifar  # noqa: E402
import train_cnf_toy  # noqa: E402

# Shared machine: one thread is fastest for these tiny problems (conftest sets it too).
QUIET = ["--no-progress", "--threads", "1"]


@pytest.mark.parametrize("argv", [
    (compare_sensitivities, []), (compare_sensitivities, ["compare"]), (compare_sensitivities, ["anode"]),
    (compare_sensitivities, ["fig2"]), (compare_sensitivities, ["all"]), (train_cnf_toy, []), (train_cifar, []),
    (irregular_spirals, []),
], ids=lambda a: a[0].__name__ + "".join(f"-{x}" for x in a[1]))
def test_help(argv, capsys):
    module, sub = argv
    with pytest.raises(SystemExit) as e:
        module.main(sub + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if sub or module is not compare_sensitivities:  # the top level lists the sub-commands instead
        assert "--seed" in out and "--device" in out and "--out" in out


def _rows(result):
    return {r["method"]: r for r in result["rows"]}


def test_compare_mlp_every_method(tmp_path):
    res = compare_sensitivities.main(["compare", "--model", "mlp", "--batch", "4", "--hidden", "8", "--repeats", "1",
                                      "--out", str(tmp_path)] + QUIET)
    rows = _rows(res)
    assert set(rows) == set(compare_sensitivities.DEFAULT_METHODS)
    assert all(r["status"] == "ok" for r in rows.values())
    # checkpointed is the exact gradient of the discrete solve: backprop agrees to round-off (float64).
    assert rows["backprop"]["rel_err_vs_checkpointed"] < 1e-9
    for m in ("interpolated:16", "interpolating", "backsolve"):
        assert 0 < rows[m]["rel_err_vs_checkpointed"] < 1e-3, m
    assert rows["backprop"]["nfe_backward"] == 0 and rows["backsolve"]["nfe_backward"] > 0
    assert rows["checkpointed"]["kept_bytes"] < rows["backprop"]["kept_bytes"]
    assert rows["backsolve"]["kept_bytes"] < rows["backprop"]["kept_bytes"]
    assert all(r["time_iter_s"] > 0 for r in rows.values())
    for ext in ("json", "csv", "png", "txt"):
        assert (tmp_path / f"compare_mlp.{ext}").stat().st_size > 0
    assert json.loads((tmp_path / "compare_mlp.json").read_text())["model"] == "mlp"


@pytest.mark.parametrize("model,sizes", [("conv", ["--batch", "2", "--channels", "2", "--size", "4"]),
                                         ("cnf", ["--batch", "10", "--hidden", "8"])])
def test_compare_conv_and_cnf(tmp_path, model, sizes):
    res = compare_sensitivities.main(["compare", "--model", model, "--repeats", "1", "--out", str(tmp_path),
                                      "--methods", "backprop", "checkpointed", "backsolve"] + sizes + QUIET)
    rows = _rows(res)
    assert rows["backprop"]["rel_err_vs_checkpointed"] < 1e-9
    assert rows["backsolve"]["rel_err_vs_checkpointed"] < 0.5
    assert (tmp_path / f"compare_{model}.png").is_file()


def test_anode_backsolve_is_wrong_and_checkpointed_exact(tmp_path):
    res = compare_sensitivities.main(["anode", "--channels", "2", "--size", "4", "--batch", "2", "--scales", "10",
                                      "--settings", "rk4", "--out", str(tmp_path)] + QUIET)
    s = res["summary"]
    assert s["checkpointed_vs_backprop_max_rel_err"] < 1e-10
    assert s["backsolve_max_rel_err"] > 0.5  # the reverse solve of z is unstable: a wrong gradient
    assert s["backsolve_guard_warned"] == 1
    raised = [r for r in res["rows"] if r["method"] == "backsolve:raise"]
    assert raised and raised[0]["status"] == "raised" and "SolverError" in raised[0]["error"]
    for ext in ("json", "csv", "png"):
        assert (tmp_path / f"anode.{ext}").is_file()


def test_fig2_error_falls_with_tolerance(tmp_path):
    # Too few nodes for the tolerance is the figure's point: the guard must say so.
    with pytest.warns(pob.AccuracyWarning, match="Chebyshev interpolant"):
        res = compare_sensitivities.main(["fig2", "--nodes", "8", "32", "--tols", "1e-3", "1e-6", "--T", "4",
                                          "--outputs", "3", "--fit-steps", "100", "--out", str(tmp_path)] + QUIET)
    err = {(r["tol"], r["nodes"]): r["rel_l1_err"] for r in res["rows"]}
    assert len(err) == 4
    assert err[(1e-6, 32)] < err[(1e-3, 32)] / 10
    assert err[(1e-6, 32)] < err[(1e-6, 8)]  # enough nodes matter once the solver is accurate
    floor = {f["tol"]: f["rel_l1_err"] for f in res["backprop_at_tol"]}
    assert floor[1e-6] < floor[1e-3]
    for ext in ("json", "csv", "png"):
        assert (tmp_path / f"fig2.{ext}").is_file()


@pytest.mark.parametrize("mode", irregular_spirals.MODES)
def test_irregular_spirals_modes_equal_one_solve_per_series(tmp_path, mode):
    t, x = irregular_spirals.spirals(5, 6, 4.0, 0.0, torch.Generator().manual_seed(0))
    t, x = t.double(), x.double()
    model = irregular_spirals.LatentODE(tol=1e-9, mode=mode).double()
    with torch.no_grad():
        pred = model(t, x)
        z0 = model.encoder(torch.cat([x[:, :3].flatten(1), t[:, :3]], dim=1))
        for b in range(5):  # each series alone on its own times: what per-sample solving computes
            own = model.decoder(pob.odeint(model.dynamics, z0[b], t[b], rtol=1e-9, atol=1e-9))
            torch.testing.assert_close(pred[b], own, rtol=1e-6, atol=1e-7)
    res = irregular_spirals.main(["--quick", "--iters", "15", "--mode", mode, "--out", str(tmp_path)] + QUIET)
    assert [r["mode"] for r in res] == [mode] and res[0]["kept_bytes"] > 0
    assert res[0]["loss_last"] < res[0]["loss_first"]


CNF_TINY = ["--hidden", "8", "8", "--batch", "20", "--test-size", "50", "--grid", "16", "--samples", "50"] + QUIET


def test_train_cnf_toy_single(tmp_path):
    res = train_cnf_toy.main(["--data", "pinwheel", "--sensitivity", "interpolated:8", "--iters", "3",
                              "--eval-every", "2", "--out", str(tmp_path)] + CNF_TINY)
    assert res["status"] == "ok" and res["iters_done"] == 3
    assert [h["iter"] for h in res["history"]] == [0, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["test_loss"])) for h in res["history"])
    assert res["nfe_forward"] > 0 and res["nfe_backward"] > 0
    for name in ("cnf_pinwheel.png", "history.csv", "results.json", "model.pt"):
        assert (tmp_path / name).stat().st_size > 0


def test_train_cnf_toy_compare(tmp_path):
    res = train_cnf_toy.main(["--compare", "--nodes", "4", "8", "--iters", "2", "--eval-every", "2",
                              "--out", str(tmp_path)] + CNF_TINY)
    runs = res["runs"]
    assert [r["method"] for r in runs] == ["backsolve", "interpolated:4", "interpolated:8"]
    assert all(r["status"] == "ok" and r["nfe_total"] > 0 for r in runs)
    # Same seed, same initialisation: identical test loss before training.
    assert len({r["history"][0]["test_loss"] for r in runs}) == 1
    for name in ("compare.png", "compare.csv", "compare.json", "compare_history.csv"):
        assert (tmp_path / name).is_file()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"), n_train=30, n_test=10)


def _cifar_args(root, out, *extra):
    return ["--data", str(root), "--model", "odenet", "--width", "4", "--epochs", "2", "--batch-size", "10",
            "--tol", "1e-3", "--ckpt-every", "2", "--test-batch-size", "10", "--out", str(out), *extra] + QUIET


def _state(path):
    return load_checkpoint(path)


def _without_times(history):
    return [{k: v for k, v in row.items() if k != "train_time_s"} for row in history]


def test_train_cifar_resume_mid_epoch_is_bit_identical(tmp_path, cifar_root):
    full = train_cifar.main(_cifar_args(cifar_root, tmp_path / "full"))
    assert not full["stopped"] and full["global_step"] == 6 and len(full["history"]) == 2
    # Killed after global step 5 (epoch 2, batch 2): the last checkpoint is from step 4.
    part = train_cifar.main(_cifar_args(cifar_root, tmp_path / "killed", "--stop-after-steps", "5"))
    assert part["stopped"] and part["global_step"] == 5 and len(part["history"]) == 1
    ck = _state(tmp_path / "killed" / "checkpoint.pt")
    assert (ck["epoch"], ck["global_step"], ck["batches_done"]) == (1, 4, 1)
    resumed = train_cifar.main(_cifar_args(cifar_root, tmp_path / "killed", "--resume"))
    assert resumed["global_step"] == 6
    assert _without_times(resumed["history"]) == _without_times(full["history"])
    a, b = _state(tmp_path / "full" / "checkpoint.pt"), _state(tmp_path / "killed" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]
    for name in ("metrics.csv", "metrics.json", "training.png"):
        assert (tmp_path / "killed" / name).is_file()
    hist = full["history"]
    assert all(0 <= h["test_acc"] <= 1 and h["nfe_forward"] > 0 and h["nfe_backward"] > 0 for h in hist)


def _assert_same_run(a_dir, b_dir, a, b):
    assert _without_times(a["history"]) == _without_times(b["history"])
    ca, cb = _state(a_dir / "checkpoint.pt"), _state(b_dir / "checkpoint.pt")
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])


def test_train_cifar_resume_is_bit_identical_for_a_model_that_draws_from_the_global_rng(
        tmp_path, cifar_root, monkeypatch):
    # Dropout on the input: one draw from torch's global generator per training batch. A resumed
    # epoch must not draw anything else from it (iter(DataLoader) used to draw a seed there).
    build_model = train_cifar.build_model
    masks = []

    def with_dropout(*args, **kwargs):
        model = build_model(*args, **kwargs)

        def drop(module, inputs):
            x = torch.nn.functional.dropout(inputs[0], 0.5, module.training)
            if module.training:
                masks.append((x == 0).sum().item())
            return (x,)

        model.register_forward_pre_hook(drop)
        return model

    monkeypatch.setattr(train_cifar, "build_model", with_dropout)
    full = train_cifar.main(_cifar_args(cifar_root, tmp_path / "full"))
    assert len(masks) == 6 and all(m > 0 for m in masks)
    part = train_cifar.main(_cifar_args(cifar_root, tmp_path / "killed", "--stop-after-steps", "5"))
    assert part["stopped"] and _state(tmp_path / "killed" / "checkpoint.pt")["batches_done"] == 1
    resumed = train_cifar.main(_cifar_args(cifar_root, tmp_path / "killed", "--resume"))
    assert resumed["global_step"] == 6
    _assert_same_run(tmp_path / "full", tmp_path / "killed", full, resumed)


def test_train_cifar_resume_on_another_training_set_is_a_one_line_exit(tmp_path, cifar_root):
    train_cifar.main(_cifar_args(cifar_root, tmp_path, "--stop-after-steps", "2"))
    other = write_fake_cifar(tmp_path / "other", n_train=60, n_test=10)
    with pytest.raises(SystemExit, match=r"^--resume: .*checkpoint.pt: the sampler state is of n=30, this sampler "
                                         r"has n=60"):
        train_cifar.main(_cifar_args(other, tmp_path, "--resume"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "one byte"])
def test_train_cifar_resume_on_a_damaged_checkpoint_is_a_one_line_exit(tmp_path, cifar_root, damage):
    train_cifar.main(_cifar_args(cifar_root, tmp_path, "--stop-after-steps", "2"))
    path = tmp_path / "checkpoint.pt"
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[len(blob) // 3] ^= 0x10
    path.write_bytes(bytes(blob[:len(blob) // 2] if damage == "truncate" else blob[:1] if damage == "one byte"
                           else blob))
    with pytest.raises(SystemExit) as e:
        train_cifar.main(_cifar_args(cifar_root, tmp_path, "--resume"))
    msg = str(e.value.code)
    assert msg.startswith(f"--resume: {path} is corrupt or truncated") and "weights_only=False" not in msg, msg


def test_train_cifar_refuses_a_checkpoint_of_other_settings(tmp_path, cifar_root):
    train_cifar.main(_cifar_args(cifar_root, tmp_path, "--stop-after-steps", "2"))
    with pytest.raises(SystemExit, match="batch_size"):
        train_cifar.main(_cifar_args(cifar_root, tmp_path, "--resume", "--batch-size", "5"))


@pytest.mark.parametrize("model,extra", [("resnet", ["--width", "4", "--stages", "2"]),
                                         ("sqnxt", ["--width-x", "0.125"])])
def test_train_cifar_anode_models(tmp_path, cifar_root, model, extra):
    res = train_cifar.main(["--data", str(cifar_root), "--model", model, "--epochs", "1", "--batch-size", "10",
                            "--limit-batches", "2", "--limit-test-batches", "1", "--out", str(tmp_path), *extra]
                           + QUIET)
    row = res["final"]
    assert row["lr"] == 0.1 and row["tol"] == 1e-3  # the ANODE recipe
    assert row["nfe_forward"] > 0 and row["nfe_backward"] > 0  # checkpointed recomputes in the backward
    assert res["global_step"] == 2 and (tmp_path / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------------------------
# The first run: documented commands parse, bad values are one-line usage errors, fake data learns.

ROOT = EXAMPLES.parent
SCRIPTS = {"compare_sensitivities": compare_sensitivities, "train_cifar": train_cifar,
           "train_cnf_toy": train_cnf_toy, "irregular_spirals": irregular_spirals}


def _documented_commands():
    """Every ``python examples/<script>.py ...`` in the README, the user guide and the scripts' own
    docstrings (which --help prints)."""
    texts = [(ROOT / "README.md").read_text(), (ROOT / "docs" / "index.md").read_text()]
    texts += [m.__doc__ for m in SCRIPTS.values()]
    found = []
    for text in texts:
        for m in re.finditer(r"python examples/(\w+)\.py([^`\n|#]*)", text):
            found.append((m.group(1), shlex.split(m.group(2))))
    return found


def test_documented_commands_parse():
    found = _documented_commands()
    assert len(found) >= 12 and {name for name, _ in found} == set(SCRIPTS)
    for name, argv in found:
        try:
            SCRIPTS[name].parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"documented command does not parse: {name}.py {' '.join(argv)}") from e


def test_top_level_help_of_compare_shows_the_default_sub_command(capsys):
    with pytest.raises(SystemExit):
        compare_sensitivities.main(["--help"])
    out = capsys.readouterr().out
    assert "{compare,anode,fig2,all}" in out and "--model {conv,mlp,cnf}" in out and "--methods" in out


@pytest.mark.parametrize("name,argv,flag", [
    ("compare_sensitivities", ["--methods", "backprop", "foo"], "--methods"),
    ("compare_sensitivities", ["compare", "--methods", "interpolated:x"], "--methods"),
    ("compare_sensitivities", ["--solver", "rk45"], "--solver"),
    ("compare_sensitivities", ["fig2", "--nodes", "0"], "--nodes"),
    ("train_cnf_toy", ["--sensitivity", "adjoint"], "--sensitivity"),
    ("train_cnf_toy", ["--compare", "--baseline", "backsolve:loud"], "--baseline"),
    ("train_cifar", ["--fake-data", "--sensitivity", "checkpointed:0"], "--sensitivity"),
    ("train_cifar", ["--fake-data", "--batch-size", "0"], "--batch-size"),
])
def test_bad_option_values_are_one_line_usage_errors(name, argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].main(argv + ["--out", str(tmp_path)] + QUIET)
    assert e.value.code == 2  # argparse's usage error, before anything runs
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: argument {flag}:" in err.splitlines()[-1], err
    assert not list(tmp_path.iterdir())


def test_missing_cifar_folder_names_the_flags_not_the_library_argument(tmp_path):
    for data in (tmp_path / "nowhere", tmp_path):  # no such folder; a folder without CIFAR in it
        with pytest.raises(SystemExit) as e:
            train_cifar.main(["--data", str(data), "--out", str(tmp_path / "out")] + QUIET)
        msg = str(e.value.code)
        assert f"--data {data}" in msg and "--fake-data" in msg and "root=" not in msg, msg
        assert "cifar-10-batches-py" in msg and "\n" not in msg


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def test_cifar_data_that_would_run_code_is_a_one_line_exit(tmp_path):
    import pickle

    folder = write_fake_cifar(tmp_path / "data", n_train=10, n_test=5)
    marker = tmp_path / "pwned"
    batch = train_cifar.read_cifar_pickle(folder / "data_batch_3")
    batch[b"batch_label"] = _System(f"touch '{marker}'")
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    with pytest.raises(SystemExit) as e:
        train_cifar.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")] + QUIET)
    msg = str(e.value.code)
    assert msg.startswith(f"--data {tmp_path / 'data'}: ") and "data_batch_3: refused to unpickle" in msg, msg
    assert "system" in msg and "\n" not in msg
    assert not marker.exists()


def test_fake_data_is_learnable(tmp_path):
    # Chance is 0.1: with the old random labels this stayed at 0.1 however long it trained.
    res = train_cifar.main(["--fake-data", "--width", "4", "--solver", "euler", "--steps", "1", "--lr", "0.1",
                            "--epochs", "3", "--batch-size", "50", "--limit-batches", "10",
                            "--limit-test-batches", "1", "--test-batch-size", "200", "--ckpt-every", "0",
                            "--out", str(tmp_path)] + QUIET)
    hist = res["history"]
    assert hist[-1]["test_acc"] > 0.4, hist  # 200 test images: 0.4 is > 9 standard errors above chance
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_fake_data_classes_are_separable_by_their_means(tmp_path):
    from pyode_bridge.data import CIFAR

    folder = train_cifar.write_learnable_fake_cifar(tmp_path, 10, n_train=100, n_test=50, seed=3)
    train = CIFAR(folder, train=True, augment=False, normalize=False)
    test = CIFAR(folder, train=False, augment=False, normalize=False)
    assert train.data.dtype == torch.uint8 and int(train.data.min()) >= 1  # 0 stays the crop padding
    # Colour alone (what survives crops and flips) tells the classes apart.
    colour = lambda x: x.float().mean((2, 3))
    means = torch.stack([colour(train.data[train.targets == c]).mean(0) for c in range(10)])
    nearest = torch.cdist(colour(test.data), means).argmin(1)
    assert (nearest == test.targets).float().mean() > 0.9


def test_fixed_step_solver_prints_and_uses_its_step(tmp_path, capsys):
    res = compare_sensitivities.main(["compare", "--model", "mlp", "--batch", "2", "--hidden", "4", "--solver", "rk4",
                                      "--step", "0.25", "--repeats", "1", "--methods", "backprop", "checkpointed",
                                      "--out", str(tmp_path)] + QUIET)
    assert "rk4 step 0.25" in res["description"] and "tol" not in res["description"]
    assert "rk4 step 0.25" in capsys.readouterr().out
    assert all(r["steps_forward"] == 4 for r in res["rows"])  # [0, 1] in steps of 0.25


def test_cnf_compare_names_any_baseline():
    # --baseline takes any gradient method; only backsolve is the paper's RDM.
    assert train_cnf_toy._paper_name("backsolve:raise") == "RDM (backsolve:raise)"
    assert train_cnf_toy._paper_name("interpolated:8") == "IRDM N=8"
    assert train_cnf_toy._paper_name("checkpointed") == "checkpointed"  # was an IndexError


def _cnf_args(out, *extra):
    return ["--data", "8gaussians", "--divergence", "hutchinson", "--sensitivity", "interpolated:4", "--iters", "6",
            "--eval-every", "2", "--ckpt-every", "2", "--solver", "rk4", "--step", "0.25", "--out", str(out),
            *extra] + CNF_TINY


def _without_walls(history):
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in history]


def test_train_cnf_toy_resume_with_hutchinson_noise_is_bit_identical(tmp_path):
    full = train_cnf_toy.main(_cnf_args(tmp_path / "full"))
    assert full["status"] == "ok" and full["iters_done"] == 6
    # Killed after iteration 5: the last checkpoint is from iteration 4.
    part = train_cnf_toy.main(_cnf_args(tmp_path / "killed", "--stop-after-steps", "5"))
    assert part["stopped"] and not (tmp_path / "killed" / "model.pt").exists()
    ck = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert ck["iter"] == 4 and [h["iter"] for h in ck["history"]] == [0, 2, 4]
    resumed = train_cnf_toy.main(_cnf_args(tmp_path / "killed", "--resume"))
    assert resumed["status"] == "ok" and not resumed["stopped"]
    assert _without_walls(resumed["history"]) == _without_walls(full["history"])
    for k in ("nfe_forward", "nfe_backward", "final_test_loss"):
        assert resumed[k] == full[k], k
    a, b = load_checkpoint(tmp_path / "full" / "model.pt"), load_checkpoint(tmp_path / "killed" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (load_checkpoint(tmp_path / run / "checkpoint.pt")["rng"] for run in ("full", "killed"))
    assert torch.equal(ca["torch"], cb["torch"])  # the Hutchinson noise's stream
    assert torch.equal(ca["generators"]["data"]["keys"], cb["generators"]["data"]["keys"])
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]


def test_train_cnf_toy_resume_refuses_damage_other_settings_and_compare(tmp_path, capsys):
    train_cnf_toy.main(_cnf_args(tmp_path, "--stop-after-steps", "2"))
    with pytest.raises(SystemExit, match=r"different settings: divergence='hutchinson' \(now 'exact'\)"):
        train_cnf_toy.main(_cnf_args(tmp_path, "--resume", "--divergence", "exact"))
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(SystemExit, match=rf"^--resume: {re.escape(str(path))} is corrupt or truncated"):
        train_cnf_toy.main(_cnf_args(tmp_path, "--resume"))
    with pytest.raises(SystemExit) as e:
        train_cnf_toy.main(["--compare", "--resume", "--out", str(tmp_path)] + QUIET)
    assert e.value.code == 2 and "--compare writes no checkpoints" in capsys.readouterr().err
