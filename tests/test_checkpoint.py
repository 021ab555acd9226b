"""Atomic checkpoints, RNG capture/restore and the resumable batch sampler (pyode_bridge.utils)."""
import random

import numpy as np
import pytest
import torch

from pyode_bridge.utils import (
    ResumableBatchSampler,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
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


def _draws(gen):
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(),
            torch.rand(2, generator=gen).tolist())


def test_rng_state_round_trip_through_a_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws(gen)
    atomic_save({"rng": capture_rng_state({"g": gen})}, tmp_path / "rng.pt")
    expected = _draws(gen)
    _draws(gen)  # move every stream on
    state = load_checkpoint(tmp_path / "rng.pt")["rng"]  # weights_only=True must accept it
    restore_rng_state(state, {"g": gen})
    assert _draws(gen) == expected
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
