"""Atomic checkpoints, RNG capture/restore and the resumable batch sampler (pyode_bridge.utils)."""
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from pyode_bridge.utils import (
    CheckpointError,
    ResumableBatchSampler,
    atomic_save,
    capture_rng_state,
    checkpoint,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
)


def test_atomic_save_round_trip_and_no_leftovers(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "hist": [{"a": 1.5}]}
    assert atomic_save(obj, path) == path
    back = load_checkpoint(path)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 7 and back["hist"] == [{"a": 1.5}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]
    assert path.stat().st_mode & 0o777 == 0o644
    atomic_save({"step": 8}, path)  # replacing an existing file
    assert load_checkpoint(path)["step"] == 8


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while writing")


def test_failed_save_keeps_the_old_checkpoint_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"step": 2, "bad": _Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_load_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")


def _draws(gen, np_gen):
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(),
            torch.rand(2, generator=gen).tolist(), np_gen.normal(size=3).tolist())


def test_rng_state_round_trip_through_a_file(tmp_path):
    gen, np_gen = torch.Generator().manual_seed(5), np.random.RandomState(4)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws(gen, np_gen)
    np_gen.normal()  # a cached Gaussian is part of numpy's state
    atomic_save({"rng": capture_rng_state({"g": gen, "data": np_gen})}, tmp_path / "rng.pt")
    expected = _draws(gen, np_gen)
    _draws(gen, np_gen)  # move every stream on
    state = load_checkpoint(tmp_path / "rng.pt")["rng"]  # weights_only=True must accept it
    restore_rng_state(state, {"g": gen, "data": np_gen})
    assert _draws(gen, np_gen) == expected
    with pytest.raises(KeyError, match="other"):
        restore_rng_state(state, {"other": torch.Generator()})


def _epochs(sampler, n_epochs):
    return [[b for b in sampler] for _ in range(n_epochs)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_resumes_mid_epoch_with_the_same_order(drop_last):
    ref = _epochs(ResumableBatchSampler(23, 5, torch.Generator().manual_seed(0), drop_last=drop_last), 3)
    assert len(ref[0]) == (4 if drop_last else 5)
    assert len({i for b in ref[0] for i in b}) == (20 if drop_last else 23)
    assert ref[0] != ref[1]  # a new permutation per epoch
    # Interrupted in epoch 2 after 2 batches; a fresh sampler (other seed) resumes from the state.
    s = ResumableBatchSampler(23, 5, torch.Generator().manual_seed(0), drop_last=drop_last)
    list(s)  # epoch 1, complete
    it = iter(s)
    got = [next(it), next(it)]
    state = s.state_dict(batches_done=2)
    r = ResumableBatchSampler(23, 5, torch.Generator().manual_seed(99), drop_last=drop_last)
    r.load_state_dict(state)
    assert got + list(r) == ref[1]
    assert list(r) == ref[2]
    # At an epoch boundary (batches_done=0) the resumed sampler starts the next epoch.
    b = ResumableBatchSampler(23, 5, torch.Generator().manual_seed(0), drop_last=drop_last)
    list(b)
    c = ResumableBatchSampler(23, 5, torch.Generator().manual_seed(7), drop_last=drop_last)
    c.load_state_dict(b.state_dict(0))
    assert list(c) == ref[1]


def test_sampler_refuses_the_state_of_another_data_set():
    a = ResumableBatchSampler(30, 10, generator=torch.Generator().manual_seed(0))
    epoch = list(a)
    a.generator.manual_seed(0)
    next(iter(a))
    state = a.state_dict(batches_done=1)
    with pytest.raises(ValueError, match="sampler state is of n=30, this sampler has n=60"):
        ResumableBatchSampler(60, 10, generator=torch.Generator()).load_state_dict(state)
    with pytest.raises(ValueError, match="sampler state is of batch_size=10, this sampler has batch_size=5"):
        ResumableBatchSampler(30, 5, generator=torch.Generator()).load_state_dict(state)
    same = ResumableBatchSampler(30, 10, generator=torch.Generator())
    same.load_state_dict(state)
    assert list(same) == epoch[1:]


def test_sampler_covers_every_index_once_per_epoch():
    s = ResumableBatchSampler(23, 5, torch.Generator().manual_seed(0))
    flat = [i for b in s for i in b]
    assert sorted(flat) == list(range(23)) and len(s) == 5
    assert [i for b in ResumableBatchSampler(7, 3, shuffle=False) for i in b] == list(range(7))
    with pytest.raises(ValueError):
        ResumableBatchSampler(5, 0)


def test_sampler_drives_a_dataloader():
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, idx):
            return torch.as_tensor(idx) * 10

    s = ResumableBatchSampler(10, 4, torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(Rows(), sampler=s, batch_size=None)
    batches = [b.tolist() for b in loader]
    assert sorted(v for b in batches for v in b) == list(range(0, 100, 10))
    assert [len(b) for b in batches] == [4, 4, 2]


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: every change to the file is detected, with the file's name.

def _realistic_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 12, "history": [{"loss": 0.5}],
            "rng": capture_rng_state({"g": torch.Generator().manual_seed(1)})}


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _corrupt_error(path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "weights_only=False" not in msg, msg
    return msg


def test_every_single_byte_flip_is_detected(tmp_path):
    path = tmp_path / "ck.pt"
    obj = _realistic_checkpoint()
    atomic_save(obj, path)
    _assert_same(load_checkpoint(path), obj)
    good = path.read_bytes()
    positions = np.unique(np.linspace(0, len(good) - 1, 40).astype(int))
    assert len(positions) == 40
    for pos in positions:
        for mask in (0x01, 0xFF):  # the smallest change and the largest one
            bad = bytearray(good)
            bad[pos] ^= mask
            path.write_bytes(bytes(bad))
            assert "corrupt or truncated" in _corrupt_error(path), (pos, mask)


def test_truncated_and_tiny_files_are_corrupt_or_truncated(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save(_realistic_checkpoint(), path)
    good = path.read_bytes()
    for n in (0, 1, 20, 66, 67, 68, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:n])
        assert "corrupt or truncated" in _corrupt_error(path), n
    path.write_bytes(good + b"\0")  # an extra byte is damage too
    assert "corrupt or truncated" in _corrupt_error(path)
    path.write_bytes(b"x")  # torch itself advises weights_only=False for this one
    assert "corrupt or truncated" in _corrupt_error(path)


def test_a_file_of_the_previous_format_loads_with_a_warning(tmp_path):
    path = tmp_path / "old.pt"
    obj = _realistic_checkpoint()
    torch.save(obj, path)  # what atomic_save wrote before checksums
    with pytest.warns(UserWarning, match="old.pt was written by an older atomic_save without a checksum"):
        _assert_same(load_checkpoint(path), obj)
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.warns(UserWarning, match="without a checksum"):
        assert "corrupt or truncated" in _corrupt_error(path)


def test_an_intact_file_with_refused_objects_says_so_without_unsafe_advice(tmp_path):
    import argparse

    path = tmp_path / "ck.pt"
    atomic_save({"args": argparse.Namespace(lr=0.1)}, path)
    msg = _corrupt_error(path)
    assert "argparse.Namespace" in msg and "intact" in msg and "corrupt" not in msg, msg


class _RunsCode:
    """Unpickling this calls ``os.system``: a tampered payload whose checksum was recomputed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_payload_that_would_run_code_is_refused_without_unsafe_advice(tmp_path):
    path, marker = tmp_path / "ck.pt", tmp_path / "pwned"
    atomic_save({"model": _RunsCode(marker)}, path)  # the checksum matches: it is not a signature
    msg = _corrupt_error(path)
    assert not marker.exists()
    assert f"{os.system.__module__}.system" in msg and "intact" in msg and "corrupt" not in msg, msg
    assert "weights_only` set to `False`" not in msg and "weights_only=False" not in msg, msg


# ---------------------------------------------------------------------------------------------
# Temporary files of killed saves.

_BLOCKED_SAVE = """
import collections, sys, time
from pathlib import Path
from pyode_bridge.utils import atomic_save

go = Path(sys.argv[2])

class WaitForGo:  # pickled in the middle of torch.save: the temporary file is open and partly written
    def __reduce__(self):
        while not go.exists():
            time.sleep(0.01)
        return collections.OrderedDict, ()

atomic_save({"step": 2, "big": bytes(100_000), "x": WaitForGo()}, sys.argv[1])
"""


#: The same writer with the process id of a process that has exited: what a writer in another pid
#: namespace (a container that shares this host name, e.g. another rank's) looks like from here.
_BLOCKED_SAVE_OTHER_PID_NAMESPACE = """
import os, subprocess, sys
gone = subprocess.Popen([sys.executable, "-c", ""])
gone.wait()
os.getpid = lambda: gone.pid
""" + _BLOCKED_SAVE


def _start_blocked_save(path, go, script=_BLOCKED_SAVE):
    import subprocess
    import sys
    import time

    before = set(path.parent.iterdir()) if path.parent.exists() else set()
    # The child imports this checkout's pyode_bridge, whatever is installed.
    root = str(Path(checkpoint.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(go)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        new = [p for p in path.parent.iterdir() if p not in before and p.name.endswith(".tmp")]
        if new:
            return proc, new[0]
        assert proc.poll() is None, "the writer exited early"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the writer never created its temporary file")


posix_only = pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX only")


@posix_only
@pytest.mark.parametrize("cleaner", ["save", "load"])
def test_a_killed_saves_temporary_file_is_removed_by_the_next_save_or_load(tmp_path, cleaner):
    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)
    proc, tmp = _start_blocked_save(path, tmp_path / "never")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.exists() and f".{checkpoint._HOST}.{proc.pid}." in tmp.name
    if cleaner == "save":
        atomic_save({"step": 3}, path)
    assert load_checkpoint(path)["step"] == (3 if cleaner == "save" else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


@posix_only
def test_a_temporary_file_being_written_by_another_process_is_kept(tmp_path):
    path = tmp_path / "ck.pt"
    go = tmp_path / "go"
    proc, tmp = _start_blocked_save(path, go)
    try:
        atomic_save({"step": 1}, path)  # e.g. another rank saving to the same folder meanwhile
        assert load_checkpoint(path)["step"] == 1
        assert remove_stale_temp_files(path) == []
        assert tmp.exists()
    finally:
        go.touch()
        assert proc.wait(timeout=120) == 0
    assert load_checkpoint(path)["step"] == 2  # the other writer finished its save intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "go"]


@posix_only
def test_a_live_writer_whose_process_id_is_not_ours_to_check_is_kept(tmp_path):
    path = tmp_path / "ck.pt"
    go = tmp_path / "go"
    proc, tmp = _start_blocked_save(path, go, _BLOCKED_SAVE_OTHER_PID_NAMESPACE)
    try:
        pid = int(tmp.name.split(".")[-3])
        assert pid != proc.pid and checkpoint._pid_alive(pid) is False  # by its name, its writer is dead
        assert remove_stale_temp_files(path) == []  # but it holds the file's lock: it is writing
        atomic_save({"step": 1}, path)
        assert tmp.exists()
    finally:
        go.touch()
        assert proc.wait(timeout=120) == 0  # its rename found its file
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "go"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_named_like_a_temporary_file_does_not_stall_the_clean_up(tmp_path):
    import threading

    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)
    os.mkfifo(tmp_path / f".ck.pt.{checkpoint._HOST}.{os.getpid()}.ab.tmp")  # never opened for writing
    got = []
    reader = threading.Thread(target=lambda: got.append(load_checkpoint(path)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert got == [{"step": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_stale_rules_for_writers_that_cannot_be_asked(tmp_path):
    import time

    path = tmp_path / "ck.pt"
    old = time.time() - checkpoint.STALE_AFTER_S - 60
    host, me, parent = checkpoint._HOST, os.getpid(), os.getppid()
    names = {  # name: (mtime or None for now, removed?)
        ".ck.pt.otherhost.123.0a1b.tmp": (old, True),        # another host: by age
        ".ck.pt.otherhost.124.0a1c.tmp": (None, False),
        ".ck.pt.abcd_123.tmp": (old, True),                  # the random names of the format before v2
        ".ck.pt.efgh_456.tmp": (None, False),
        f".ck.pt.{host}.{me}.0f.tmp": (None, True),          # this process id, not being written now:
                                                             # a restarted container's predecessor's
        f".ck.pt.{host}.{parent}.1f.tmp": (None, False),      # a live process of this host
        f".ck.pt.{host}.{parent}.2f.tmp": (old, True),        # ... which has not written it for hours
        ".other.pt.otherhost.1.0a.tmp": (old, False),        # another checkpoint's: not ours to judge
        "ck.pt.backup": (old, False),
    }
    for name, (mtime, _) in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    removed = remove_stale_temp_files(path)
    assert sorted(p.name for p in removed) == sorted(n for n, (_, gone) in names.items() if gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, (_, gone) in names.items() if not gone)
    assert remove_stale_temp_files(path, stale_after_s=0) != []  # an age limit of 0 takes the young ones


def test_threads_saving_at_once_never_remove_each_others_temporary_files(tmp_path):
    import threading

    path, errors = tmp_path / "ck.pt", []

    def saver(i):
        try:
            for k in range(5):
                atomic_save({"who": i, "k": k, "w": torch.full((20_000,), float(i))}, path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    back = load_checkpoint(path)
    assert back["k"] == 4 and torch.equal(back["w"], torch.full((20_000,), float(back["who"])))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
