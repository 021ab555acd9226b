"""pyode_bridge.data: FFJORD toy densities, the CIFAR pickle-folder loader and the digits."""
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pyode_bridge.data import (
    CIFAR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    TOY_DATASETS,
    CIFARNotFoundError,
    Digits,
    augment_batch,
    load_digits,
    random_crop,
    random_hflip,
    read_cifar_pickle,
    sample_toy,
    write_fake_cifar,
)

# ----------------------------------------------------------------------------------- toy data


def test_toy_names_are_ffjords():
    assert set(TOY_DATASETS) == {"8gaussians", "2spirals", "pinwheel", "moons", "circles",
                                 "checkerboard", "swissroll", "rings"}


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_toy_shape_finite_exact_n(name, n):
    x = sample_toy(name, n, seed=1)
    assert x.shape == (n, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_seeding(name):
    a = sample_toy(name, 300, seed=5)
    assert torch.equal(a, sample_toy(name, 300, seed=5))
    assert not torch.allclose(a, sample_toy(name, 300, seed=6))
    # Generators of either library: same state, same points; the generator advances.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    b = sample_toy(name, 300, seed=g1)
    assert torch.equal(b, sample_toy(name, 300, seed=g2))
    assert not torch.allclose(b, sample_toy(name, 300, seed=g1))
    c = sample_toy(name, 300, seed=np.random.RandomState(4))
    assert torch.equal(c, sample_toy(name, 300, seed=np.random.RandomState(4)))
    assert sample_toy(name, 10, seed=0, dtype=torch.float64).dtype == torch.float64


def test_toy_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        sample_toy("9gaussians", 10)
    for name in TOY_DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError):
        sample_toy("moons", 0)


def test_8gaussians_clusters():
    n = 16000
    x = sample_toy("8gaussians", n, seed=0).double()
    # FFJORD: centres at radius 4 and std 0.5, everything divided by 1.414.
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centers = (4.0 / 1.414) * torch.stack([angles.cos(), angles.sin()], 1)
    d = torch.cdist(x, centers)
    nearest = d.argmin(1)
    counts = torch.bincount(nearest, minlength=8).double()
    # Equal weights: each count within 5 binomial standard deviations of n/8.
    sd = math.sqrt(n * (1 / 8) * (7 / 8))
    assert ((counts - n / 8).abs() < 5 * sd).all(), counts
    resid = x - centers[nearest]
    std = 0.5 / 1.414
    assert resid.mean(0).abs().max() < 0.02
    assert torch.allclose(resid.std(0), torch.full((2,), std, dtype=torch.float64), rtol=0.03)
    assert abs(x.norm(dim=1).mean().item() - 4.0 / 1.414) < 0.05


def test_checkerboard_alternating_squares():
    x = sample_toy("checkerboard", 8000, seed=0).double()
    assert (x >= -4).all() and (x < 4).all()
    cells = torch.floor(x / 2).long()              # 2x2 squares indexed -2..1 in each direction
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    # The 8 occupied squares of the 4x4 board are equally likely.
    idx = (cells[:, 0] + 2) * 4 + (cells[:, 1] + 2)
    counts = torch.bincount(idx, minlength=16).double()
    occupied = counts[counts > 0]
    assert len(occupied) == 8
    sd = math.sqrt(8000 * (1 / 8) * (7 / 8))
    assert ((occupied - 1000).abs() < 5 * sd).all()
    # Uniform inside a square.
    frac = x / 2 - torch.floor(x / 2)
    assert torch.allclose(frac.mean(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.02)


def test_rings_and_circles_radii():
    r = sample_toy("rings", 8000, seed=0).double().norm(dim=1)
    radii = torch.tensor([3.0, 2.25, 1.5, 0.75], dtype=torch.float64)
    dist = (r[:, None] - radii).abs()
    assert (dist.min(1).values < 0.4).float().mean() > 0.999          # noise std 0.08
    counts = torch.bincount(dist.argmin(1), minlength=4)
    assert (counts == 2000).all()                                        # equal rings, points on a grid
    # circles: radii 1 and 0.5 with noise 0.08, all times 3 (radial noise std 0.24).
    r = sample_toy("circles", 8000, seed=0).double().norm(dim=1)
    outer = r > 2.25
    assert abs(outer.sum().item() - 4000) < 60
    resid = torch.where(outer, r - 3.0, r - 1.5)
    assert abs(resid.std().item() - 0.24) < 0.02 and abs(resid.mean().item()) < 0.05


def test_pinwheel_and_spirals_shape():
    x = sample_toy("pinwheel", 10000, seed=0).double()
    r = x.norm(dim=1)
    # r = 2 * |features| with features ~ (N(1, 0.3), N(0, 0.1)).
    assert abs(r.mean().item() - 2.0 * 1.02) < 0.05
    assert x.mean(0).abs().max() < 0.05
    # Five arms: the angle histogram has five-fold symmetry (compare with a 72 degree rotation).
    ang = torch.atan2(x[:, 1], x[:, 0])
    h1 = torch.histc(torch.remainder(ang, 2 * math.pi), bins=20, min=0, max=2 * math.pi)
    h2 = torch.histc(torch.remainder(ang + 2 * math.pi / 5, 2 * math.pi), bins=20, min=0, max=2 * math.pi)
    assert ((h1 - h2).abs() / h1.clamp_min(1)).max() < 0.5
    s = sample_toy("2spirals", 10000, seed=0).double()
    assert s.mean(0).abs().max() < 0.05
    assert s.norm(dim=1).max() < (3 * math.pi + 1.0) / 3 + 0.6


@pytest.mark.parametrize("name", ["moons", "circles", "swissroll"])
def test_sklearn_free_generators_match_sklearn(name):
    """moons/circles/swissroll are written with numpy; their distribution matches FFJORD's
    scikit-learn based definition (means, stds and quartiles)."""
    sk = pytest.importorskip("sklearn.datasets")
    n = 40000
    ours = sample_toy(name, n, seed=0).double().numpy()
    if name == "moons":
        ref = sk.make_moons(n_samples=n, noise=0.1, random_state=1)[0] * 2 + np.array([-1, -0.2])
    elif name == "circles":
        ref = sk.make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=1)[0] * 3
    else:
        ref = sk.make_swiss_roll(n_samples=n, noise=1.0, random_state=1)[0][:, [0, 2]] / 5
    np.testing.assert_allclose(ours.mean(0), ref.mean(0), atol=0.04)
    np.testing.assert_allclose(ours.std(0), ref.std(0), rtol=0.03)
    np.testing.assert_allclose(np.quantile(ours, [0.25, 0.5, 0.75], axis=0),
                               np.quantile(ref, [0.25, 0.5, 0.75], axis=0), atol=0.06)


# -------------------------------------------------------------------------------------- CIFAR


def _read_pickle(path):
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


@pytest.fixture
def fake10(tmp_path):
    return write_fake_cifar(tmp_path, num_classes=10, n_train=23, n_test=11, seed=0)


def _expected(folder, files, key):
    ds = [_read_pickle(folder / f) for f in files]
    data = np.concatenate([d[b"data"] for d in ds]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(d[key]) for d in ds])
    return torch.from_numpy(data), torch.from_numpy(labels)


def test_fake_cifar10_format(fake10):
    assert fake10.name == "cifar-10-batches-py"
    names = sorted(p.name for p in fake10.iterdir())
    assert names == sorted([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    d = _read_pickle(fake10 / "data_batch_1")
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape[1] == 3072
    assert isinstance(d[b"labels"], list)
    assert sum(len(_read_pickle(fake10 / f"data_batch_{i}")[b"labels"]) for i in range(1, 6)) == 23


@pytest.mark.parametrize("use_parent", [True, False])
def test_cifar10_load(fake10, use_parent):
    root = fake10.parent if use_parent else fake10
    train = CIFAR(root, train=True, augment=False, normalize=False)
    test = CIFAR(root, train=False, augment=False, normalize=False)
    assert len(train) == 23 and len(test) == 11
    assert train.classes == [f"class{i}" for i in range(10)]
    raw, labels = _expected(fake10, [f"data_batch_{i}" for i in range(1, 6)], b"labels")
    for i in range(len(train)):
        img, lab = train[i]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert lab == int(labels[i])
        assert torch.equal(torch.round(img * 255).to(torch.uint8), raw[i])
    raw_t, labels_t = _expected(fake10, ["test_batch"], b"labels")
    x, y = test.tensors()
    assert x.shape == (11, 3, 32, 32) and torch.equal(y, labels_t)
    assert torch.equal(torch.round(x * 255).to(torch.uint8), raw_t)
    assert not CIFAR(root, train=False).augment and CIFAR(root, train=True).augment


def test_cifar10_normalisation(fake10):
    plain = CIFAR(fake10, augment=False, normalize=False)
    norm = CIFAR(fake10, augment=False)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    for i in (0, 5, 22):
        torch.testing.assert_close(norm[i][0], (plain[i][0] - mean) / std)
        torch.testing.assert_close(norm.denormalize(norm[i][0]), plain[i][0])
    # Channel statistics: mean of the normalised data = (mean of raw/255 - mu) / sigma, and the
    # spread scales by 1/sigma.
    xn, _ = norm.tensors()
    xp, _ = plain.tensors()
    torch.testing.assert_close(xn.mean((0, 2, 3)), (xp.mean((0, 2, 3)) - mean.view(3)) / std.view(3))
    torch.testing.assert_close(xn.std((0, 2, 3)), xp.std((0, 2, 3)) / std.view(3))
    # Custom statistics.
    custom = CIFAR(fake10, augment=False, normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    torch.testing.assert_close(custom[0][0], (plain[0][0] - 0.5) / 0.25)


def _matches_shift_flip(aug, orig, pad=4):
    """(dy, dx, flipped) such that aug is orig shifted by (dy, dx) with zero fill and maybe
    flipped, or None."""
    H, W = orig.shape[-2:]
    padded = torch.nn.functional.pad(orig, (pad, pad, pad, pad))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy:dy + H, dx:dx + W]
            for flipped in (False, True):
                if torch.equal(aug, window.flip(-1) if flipped else window):
                    return dy, dx, flipped
    return None


def test_cifar_augmentation_is_crop_and_flip(fake10):
    plain = CIFAR(fake10, augment=False, normalize=False)
    aug = CIFAR(fake10, augment=True, normalize=False, generator=torch.Generator().manual_seed(0))
    found, changed = [], 0
    for i in range(len(plain)):
        a, la = aug[i]
        o, lo = plain[i]
        assert la == lo and a.shape == o.shape
        m = _matches_shift_flip(a, o)
        assert m is not None, f"item {i} is not a padded crop / flip of the original"
        dy, dx, flipped = m
        # The crop keeps exactly the pixels of its window (pixels are never 0 in the fake data, so
        # zeros are padding): same multiset as the original's window.
        H, W = 32, 32
        ys, xs = slice(max(dy - 4, 0), min(dy - 4 + H, H)), slice(max(dx - 4, 0), min(dx - 4 + W, W))
        kept = a[a > 0].sort().values
        assert torch.equal(kept, o[:, ys, xs].reshape(-1).sort().values)
        changed += not torch.equal(a, o)
        found.append(m)
    assert changed >= len(plain) - 2                                   # P(identity) = 1/162
    assert len({m[:2] for m in found}) > 5 and {m[2] for m in found} == {False, True}
    # Reproducible with a seeded generator.
    def fresh(**kw):
        return CIFAR(fake10, augment=True, generator=torch.Generator().manual_seed(0), **kw)

    first, second = fresh(normalize=False), fresh(normalize=False)
    assert all(torch.equal(first[i][0], second[i][0]) for i in range(len(plain)))
    # Normalisation comes after augmentation (the padding is black, as in torchvision's recipe).
    augn, augp = fresh(), fresh(normalize=False)
    torch.testing.assert_close(augn.denormalize(augn[0][0]), augp[0][0])


def test_flip_and_crop_functions():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (6, 3, 32, 32), generator=g).to(torch.uint8)
    flipped = random_hflip(x, p=1.0)
    assert torch.equal(flipped, x.flip(-1))
    for i in range(6):       # a flip keeps the pixel multiset of every channel
        assert torch.equal(flipped[i].reshape(3, -1).sort(1).values, x[i].reshape(3, -1).sort(1).values)
    assert torch.equal(random_hflip(x, p=0.0), x)
    same = random_crop(x, padding=0, generator=g)
    assert torch.equal(same, x)
    crops = random_crop(x.double(), padding=4, generator=g)
    assert crops.shape == x.shape and crops.dtype == torch.float64
    for i in range(6):
        assert _matches_shift_flip(crops[i], x[i].double()) is not None
    single = augment_batch(x[0], generator=g)
    assert single.shape == (3, 32, 32)


def test_cifar_missing_files_named(tmp_path, fake10):
    (fake10 / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as info:
        CIFAR(fake10.parent, train=True)
    assert isinstance(info.value, CIFARNotFoundError)
    assert "data_batch_3" in str(info.value) and "data_batch_1" in str(info.value)
    assert str(fake10 / "data_batch_3") in str(info.value)
    CIFAR(fake10.parent, train=False)                     # the test split is still complete
    (fake10 / "batches.meta").unlink()
    with pytest.raises(CIFARNotFoundError, match="batches.meta"):
        CIFAR(fake10, train=False)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(CIFARNotFoundError, match="cifar-10-batches-py"):
        CIFAR(empty)
    with pytest.raises(CIFARNotFoundError, match="cifar-100-python"):
        CIFAR(tmp_path / "does-not-exist", num_classes=100)
    with pytest.raises(ValueError):
        CIFAR(fake10.parent, num_classes=20)


def test_cifar_not_a_batch(fake10):
    with open(fake10 / "test_batch", "wb") as fh:
        pickle.dump({b"something": 1}, fh)
    with pytest.raises(ValueError, match="not a CIFAR batch"):
        CIFAR(fake10, train=False)


def test_cifar_labels_beyond_int64_name_the_file(fake10):
    d = _read_pickle(fake10 / "test_batch")
    d[b"labels"] = [2**70] * len(d[b"labels"])
    with open(fake10 / "test_batch", "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch: 'labels' must be integers"):
        CIFAR(fake10, train=False)


class _Payload:
    """Unpickling this calls ``func(*args)``: what a tampered CIFAR file can make ``pickle.load`` do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_payloads(marker):
    return {"os.system": _Payload(os.system, f"touch '{marker}'"),
            "builtins.open": _Payload(open, str(marker), "w"),
            "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()")}


@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "builtins.exec"])
@pytest.mark.parametrize("victim", ["data_batch_1", "batches.meta"])
def test_cifar_refuses_a_pickle_that_would_run_code(tmp_path, kind, victim):
    folder = write_fake_cifar(tmp_path / "data", num_classes=10, n_train=10, n_test=5)
    marker = tmp_path / "pwned"
    d = _read_pickle(folder / victim)
    d[b"batch_label"] = _evil_payloads(marker)[kind]  # hidden in a field nobody reads; the data stay valid
    with open(folder / victim, "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    with pytest.raises(ValueError, match=rf"{victim}: refused to unpickle: it asks for the Python object "
                                         rf"\w+\.(system|open|exec), which a CIFAR file never contains") as e:
        CIFAR(folder, train=True)
    assert "could run code" in str(e.value)
    assert not marker.exists()  # refused before the payload was built, not after it ran


def test_cifar_refuses_object_arrays_and_foreign_codecs(tmp_path):
    path = tmp_path / "batch"
    with open(path, "wb") as fh:
        pickle.dump({b"data": np.array([1, "x"], dtype=object)}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"batch: refused to unpickle: it asks for a numpy array of dtype object"):
        read_cifar_pickle(path)
    # _codecs.encode is admitted for protocol 2's bytes only, i.e. with latin1.
    with open(path, "wb") as fh:
        fh.write(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(ValueError, match="refused to unpickle: it asks for _codecs.encode with str and encoding "
                                         "'zlib'"):
        read_cifar_pickle(path)
    with open(path, "wb") as fh:  # bytes(10**12) would allocate a terabyte
        pickle.dump({b"data": _Payload(bytes, 10**12)}, fh, protocol=2)
    with pytest.raises(ValueError, match=r"refused to unpickle: it asks for bytes\(1000000000000,\)"):
        read_cifar_pickle(path)


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text):
    return b"X" + struct.pack("<I", len(text)) + text.encode()


#: Pickle bodies (protocol 2 opcodes) that reach numpy's constructors around the dtype check:
#: numpy.ndarray called directly (an object array over the file's bytes, whose first element is a
#: pointer to 0x4141414141414141; or gigabytes that the file does not hold), _reconstruct with an
#: object dtype code or a huge shape, a dtype whose BUILD state sets the has-object flags, an array
#: of 2**24 x 3072 zero-byte items from no bytes (np.asarray(..., uint8) then takes 48 GiB), and a
#: BUILD that sets attributes of an admitted function (process-wide state).
_AROUND_THE_CHECK = {
    "ndarray_over_bytes": _global("numpy", "ndarray") + b"(K\x01\x85" + _str("O") + b"C\x08AAAAAAAAtR",
    "ndarray_uninitialised": _global("numpy", "ndarray") + b"(J\x00\x00\x00\x40\x85" + _str("u1") + b"tR",
    "reconstruct_object": _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
    + b"K\x03\x85C\x01O\x87R",
    "reconstruct_huge": _global("numpy._core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
    + b"J\x00\x00\x00\x40\x85C\x01b\x87R",
    "dtype_state_has_object": _global("numpy", "dtype") + _str("V8") + b"\x89\x88\x87R(K\x03" + _str("|")
    + b"NNNK\x08K\x01K?tb",
    "zero_itemsize_array": _global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray")
    + b"K\x00\x85C\x01b\x87R(K\x01J\x00\x00\x00\x01M\x00\x0c\x86" + _global("numpy", "dtype") + _str("V0")
    + b"\x89\x88\x87R\x89C\x00tb",
    "build_on_a_function": _global("_codecs", "encode") + b"N}" + _str("__defaults__") + _str("utf-8")
    + b"\x85s\x86b",
}


@pytest.mark.parametrize("case", sorted(_AROUND_THE_CHECK))
def test_cifar_refuses_numpy_objects_built_around_the_dtype_check(tmp_path, case):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02}C\x04data" + _AROUND_THE_CHECK[case] + b"s.")
    with pytest.raises(ValueError, match=r"data_batch_1: refused to unpickle: it "):
        read_cifar_pickle(path)


def test_cifar_damaged_pickle_names_the_file(tmp_path, fake10):
    blob = (fake10 / "test_batch").read_bytes()
    for cut in (1, len(blob) // 2, len(blob) - 1):
        (fake10 / "test_batch").write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=r"test_batch is not a readable CIFAR pickle \(corrupt or truncated"):
            CIFAR(fake10, train=False)
    with open(fake10 / "test_batch", "wb") as fh:
        pickle.dump([1, 2], fh)
    with pytest.raises(ValueError, match="test_batch is not a CIFAR file: it holds a list, not a dict"):
        CIFAR(fake10, train=False)


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the original CIFAR files: a byte string is a
    ``SHORT_BINSTRING`` / ``BINSTRING`` (Python 3 writes ``_codecs.encode`` calls instead), and
    numpy's reconstructor lives in ``numpy.core.multiarray`` (numpy 1.x)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            self.write(pickle.GLOBAL + b"numpy.core" + module[len("numpy._core"):].encode() + b"\n"
                       + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _write_format(path, obj, fmt):
    with open(path, "wb") as fh:
        if fmt == "python2":
            _Python2Pickler(fh, protocol=2).dump(obj)
        else:
            pickle.dump(obj, fh, protocol=int(fmt[-1]))


@pytest.mark.parametrize("fmt", ["python2", "protocol2", "protocol4", "protocol5"])
def test_cifar_reads_every_pickle_layout_of_the_format(tmp_path, fmt):
    folder = write_fake_cifar(tmp_path, num_classes=10, n_train=15, n_test=6, seed=4)
    expected = {name: _read_pickle(folder / name) for name in
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]}
    expected["batches.meta"][b"num_vis"] = np.int64(3072)  # a numpy scalar, as some re-packed copies have
    expected["test_batch"][b"batch_label"] = b""  # protocol 2 in Python 3 writes b"" as a call of bytes()
    for name, d in expected.items():
        _write_format(folder / name, d, fmt)
    raw = (folder / "data_batch_1").read_bytes()
    if fmt == "python2":
        assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    for name, d in expected.items():
        got = read_cifar_pickle(folder / name)
        assert set(got) == set(d), name
        for k, v in d.items():
            if isinstance(v, np.ndarray):
                assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
            else:
                assert got[k] == v and type(got[k]) is type(v), (name, k)
    train, test = CIFAR(folder, train=True, normalize=False), CIFAR(folder, train=False, normalize=False)
    x, y = _expected(folder, [f"data_batch_{i}" for i in range(1, 6)], b"labels")
    assert torch.equal(train.data, x) and torch.equal(train.targets, y)
    assert len(test) == 6 and train.classes == [f"class{i}" for i in range(10)]


def test_cifar100(tmp_path):
    folder = write_fake_cifar(tmp_path, num_classes=100, n_train=30, n_test=12, seed=3)
    assert folder.name == "cifar-100-python"
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    train = CIFAR(tmp_path, train=True, num_classes=100, augment=False, normalize=False)
    test = CIFAR(folder, train=False, num_classes=100, augment=False)
    assert len(train) == 30 and len(test) == 12 and len(train.classes) == 100
    raw, fine = _expected(folder, ["train"], b"fine_labels")
    x, y = train.tensors()
    assert torch.equal(y, fine) and torch.equal(torch.round(x * 255).to(torch.uint8), raw)
    assert int(y.max()) < 100
    torch.testing.assert_close(test.mean, torch.tensor(CIFAR100_MEAN))
    torch.testing.assert_close(test.std, torch.tensor(CIFAR100_STD))
    assert test[0][0].shape == (3, 32, 32)
    (folder / "train").unlink()
    with pytest.raises(CIFARNotFoundError, match="train"):
        CIFAR(tmp_path, train=True, num_classes=100)


def test_cifar_dataloader(fake10):
    ds = CIFAR(fake10, augment=True, generator=torch.Generator().manual_seed(0))
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)))
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,) and yb.dtype == torch.int64


# ------------------------------------------------------------------------------------- digits


def test_digits():
    pytest.importorskip("sklearn")
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() >= 0 and x.max() <= 1 and set(y.tolist()) == set(range(10))
    assert load_digits(flatten=True)[0].shape == (1797, 64)
    tr, te = Digits(train=True, seed=1), Digits(train=False, seed=1)
    assert len(tr) + len(te) == 1797 and len(te) == round(0.2 * 1797)
    img, lab = tr[0]
    assert img.shape == (1, 8, 8) and 0 <= lab < 10
    # The two parts are disjoint: no test image appears in the training part.
    train_rows = {tuple(r.tolist()) for r in tr.data.reshape(len(tr), -1)}
    test_rows = [tuple(r.tolist()) for r in te.data.reshape(len(te), -1)]
    dup_in_full = len({tuple(r.tolist()) for r in x.reshape(1797, -1)}) < 1797
    if not dup_in_full:
        assert not any(r in train_rows for r in test_rows)
    assert torch.equal(Digits(train=False, seed=1).targets, te.targets)
    normed = Digits(train=True, seed=1, normalize=True, flatten=True)
    assert normed.data.shape == (len(tr), 64)
    assert abs(normed.data.mean().item()) < 1e-5 and abs(normed.data.std().item() - 1) < 1e-4
