"""The object byte format: round trips of every supported value, clear errors otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from moetrain.checkpoint.errors import CorruptObjectError, SerializationError
from moetrain.checkpoint.format import ALIGN, encode_header, read_state, write_state

from .helpers import assert_same, make_objects


def _roundtrip(state):
    sink = io.BytesIO()
    n = write_state(sink, state)
    raw = sink.getvalue()
    assert n == len(raw)
    return read_state(np.frombuffer(bytearray(raw), dtype=np.uint8)), raw


def test_roundtrip_of_training_like_objects():
    for name, state in make_objects(rank=1, experts=3).items():
        back, _ = _roundtrip(state)
        assert_same(state, back, name)


def test_roundtrip_of_edge_values():
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state = {
        "noncontig_T": base.t(),  # stored contiguous, same values
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "cplx": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64),
        7: "int key", (1, "a"): "tuple key", None: [None, True, 1.5, float("inf")],
        "np": np.arange(5, dtype=np.int16), "np_scalar": np.float32(0.25),
        "bytes": b"\x00\xffrng", "dtype": torch.bfloat16, "nested": [{"x": (torch.ones(2),)}],
    }
    back, raw = _roundtrip(state)
    assert_same({k: v for k, v in state.items() if k != "noncontig_T"},
                {k: v for k, v in back.items() if k != "noncontig_T"})
    assert torch.equal(back["noncontig_T"], base.t()) and back["noncontig_T"].is_contiguous()
    assert len(raw) % ALIGN == 0


def test_loaded_tensors_are_writable_views_of_the_buffer():
    sink = io.BytesIO()
    write_state(sink, {"a": torch.zeros(8), "b": torch.ones(3, dtype=torch.float64)})
    buf = np.frombuffer(bytearray(sink.getvalue()), dtype=np.uint8)
    state = read_state(buf)
    state["a"].add_(1.0)  # e.g. an optimizer updating loaded state in place
    assert torch.equal(read_state(buf)["a"], torch.ones(8))
    assert state["b"].data_ptr() % 8 == 0


def test_unsupported_value_names_its_path_before_writing():
    class Custom:
        pass

    sink = io.BytesIO()
    with pytest.raises(SerializationError, match=r"obj\['optim'\]\['groups'\]\[1\].*Custom"):
        write_state(sink, {"optim": {"groups": [1, Custom()]}}, where="obj")
    assert sink.getvalue() == b""  # nothing streamed
    with pytest.raises(SerializationError, match="layout"):
        encode_header({"s": torch.eye(3).to_sparse()})


@pytest.mark.parametrize("damage", ["magic", "truncate", "header"])
def test_damaged_bytes_raise_corrupt_object_error(damage):
    sink = io.BytesIO()
    write_state(sink, {"w": torch.randn(16)})
    raw = bytearray(sink.getvalue())
    if damage == "magic":
        raw[0] ^= 0xFF
    elif damage == "truncate":
        raw = raw[:-64]
    else:
        raw[20] = ord("}")
    with pytest.raises(CorruptObjectError, match="obj-7"):
        read_state(np.frombuffer(raw, dtype=np.uint8), where="obj-7")
