"""The scratch store that keeps finished layers' stored tensors on disk until the export."""

import pytest
import torch

from qvlm_offline.spill import SpilledTensors


def test_values_come_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = {
        "a": (torch.randint(-2**31, 2**31 - 1, (64, 48), dtype=torch.int32, generator=g),
              torch.randn(2, 48, generator=g).half(), None),
        "b": (torch.randint(0, 255, (7, 3), dtype=torch.uint8, generator=g), torch.randn(5, generator=g),
              torch.empty(0, 4, dtype=torch.int32)),
        "c": (torch.randn(6, 8, generator=g).t(),),  # not contiguous
    }
    with SpilledTensors(tmp_path / "scratch") as store:
        for k, v in values.items():
            store[k] = v
        assert sorted(store) == ["a", "b", "c"] and len(store) == 3 and "a" in store and "z" not in store
        for k, v in values.items():
            got = store[k]
            assert len(got) == len(v)
            for x, y in zip(got, v):
                if y is None:
                    assert x is None
                else:
                    assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        assert store.nbytes("a") == 64 * 48 * 4 + 2 * 48 * 2
        store["a"] = (torch.ones(3, dtype=torch.int32),)  # replaced
        assert torch.equal(store["a"][0], torch.ones(3, dtype=torch.int32))
        del store["b"]
        assert "b" not in store
        path = store.path
        assert path.exists() and path.parent.parent == tmp_path / "scratch"
    assert not path.parent.exists()  # the scratch directory goes with the store


def test_a_missing_key_is_a_key_error(tmp_path):
    with SpilledTensors(tmp_path) as store, pytest.raises(KeyError):
        store["nope"]
