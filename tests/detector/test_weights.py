"""Loading a layer without executing anything, and a clear `invalid` reason for every bad file."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from detector.errors import InvalidCheckpoint
from detector.views import view_vectors
from detector.weights import load_layer, read_tensors, sha256_file

LAYER = "last_linear.weight"


def _sd(shape=(8, 12)):
    g = torch.Generator().manual_seed(0)
    return {LAYER: torch.randn(*shape, generator=g), "last_bn.weight": torch.ones(shape[0])}


def test_torch_zip_safetensors_legacy_and_memory_agree(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "a.pt")
    save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": sd}, tmp_path / "nested.pth")  # a lone wrapper is one reading (else: invalid)
    lin = torch.nn.Linear(12, 8, bias=False)
    lin.weight.data.copy_(sd[LAYER])
    module = torch.nn.Module()
    module.last_linear = lin
    expected = sd[LAYER].double().numpy()
    for src in ["a.pt", "a.safetensors", "legacy.pt", "nested.pth"]:
        lw = load_layer(tmp_path / src)
        np.testing.assert_array_equal(lw.matrix, expected)
        assert lw.sha256 == sha256_file(tmp_path / src)
    np.testing.assert_array_equal(load_layer(module).matrix, expected)
    np.testing.assert_array_equal(load_layer(sd).matrix, expected)


def test_format_is_sniffed_not_taken_from_the_name(tmp_path):
    sd = _sd()
    save_file(sd, str(tmp_path / "really-safetensors.pt"))
    np.testing.assert_array_equal(load_layer(tmp_path / "really-safetensors.pt").matrix, sd[LAYER].double().numpy())


def test_conv_kernels_flatten_per_output_channel_and_views(tmp_path):
    k = torch.randn(6, 3, 2, 2)
    torch.save({"conv.weight": k}, tmp_path / "c.pt")
    lw = load_layer(tmp_path / "c.pt", "conv.weight")
    assert lw.matrix.shape == (6, 12) and lw.original_shape == (6, 3, 2, 2)
    np.testing.assert_allclose(lw.matrix[2], k[2].reshape(-1).double().numpy())
    assert view_vectors(lw.matrix, "forward").shape == (12, 6)  # columns: one per input
    assert view_vectors(lw.matrix, "backward").shape == (6, 12)  # rows: one per neuron
    np.testing.assert_array_equal(view_vectors(lw.matrix, "forward")[5], lw.matrix[:, 5])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({LAYER: torch.randn(4, 4), "x": _Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(InvalidCheckpoint, match="safe loader"):
        load_layer(path)
    assert not marker.exists(), "loading a candidate executed code from its pickle"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _header_lie(tmp_path):
    header = json.dumps({LAYER: {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}).encode()
    return _write(tmp_path / "lie.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 64)


def _truncated_zip(tmp_path):
    buf = io.BytesIO()
    torch.save(_sd(), buf)
    return _write(tmp_path / "trunc.pt", buf.getvalue()[: len(buf.getvalue()) // 2])


def _not_a_state_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.randn(2, 2)], p)
    return p


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda t: _write(t / "empty.pt", b""), "empty file"),
        (lambda t: t, "is a directory"),
        (lambda t: t / "missing.pt", "no such file"),
        (lambda t: _write(t / "junk.bin", b"hello world, not a model"), "unknown format"),
        (_truncated_zip, "unreadable torch checkpoint"),
        (_header_lie, "header claims|points outside"),
        (_not_a_state_dict, "expected a state dict"),
        (lambda t: _write(t / "zip.pt", _zip_with_garbage()), "unreadable torch checkpoint"),
    ],
    ids=["empty", "directory", "missing", "junk", "truncated-zip", "safetensors-lie", "list", "garbage-zip"],
)
def test_unreadable_files_are_invalid_with_one_line_reason(tmp_path, make, reason):
    with pytest.raises(InvalidCheckpoint, match=reason) as e:
        load_layer(make(tmp_path))
    assert "\n" not in str(e.value)


def _safetensors(entries: dict[str, tuple[str, list[int], tuple[int, int]]], data: bytes) -> bytes:
    """A safetensors file written by hand: name -> (dtype, shape, data_offsets), then the data."""
    header = {k: {"dtype": d, "shape": s, "data_offsets": list(o)} for k, (d, s, o) in entries.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw + data


F32_2x2 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    "entries, data, reason",
    [
        ({LAYER: ("F32", [2, 2], (0, 16)), "other.weight": ("F32", [2, 2], (0, 16))}, F32_2x2, "overlaps"),
        ({LAYER: ("F32", [2, 2], (0, 16))}, F32_2x2 + b"\0" * 8, "cover 16 of the file's 24"),
        ({LAYER: ("F32", [3, 2], (0, 16))}, F32_2x2, "needs another size"),
        ({LAYER: ("F31", [2, 2], (0, 16))}, F32_2x2, "unknown dtype"),
        ({LAYER: ("F32", [2, -2], (0, 16))}, F32_2x2, "invalid shape"),
        ({LAYER: ("F32", [2, 2], (4, 20))}, b"\0" * 4 + F32_2x2, "gap at 0"),
    ],
    ids=["overlap", "trailing-bytes", "size", "dtype", "shape", "gap"],
)
def test_a_safetensors_header_that_tiles_the_data_wrongly_is_invalid(tmp_path, entries, data, reason):
    """Tensors are views into the file's bytes, so the header is held to the format: each entry's
    size matches its dtype and shape, and the entries tile the data exactly (no tensor read twice)."""
    with pytest.raises(InvalidCheckpoint, match=reason):
        read_tensors(_write(tmp_path / "bad.safetensors", _safetensors(entries, data)))


def test_safetensors_tensors_are_views_into_the_hashed_bytes_and_misaligned_ones_are_copied(tmp_path):
    """No second copy of a network in memory (the gate's memory at 10,575 classes); a tensor whose
    offset does not suit its dtype is copied, with the same values."""
    half = struct.pack("<e", 0.5)  # 2 bytes: the F32 after it starts misaligned
    entries = {"a.weight": ("F16", [1], (0, 2)), LAYER: ("F32", [2, 2], (2, 18)), "big.weight": ("F64", [2], (18, 34))}
    data = half + F32_2x2 + struct.pack("<2d", -1.0, 7.0)
    path = _write(tmp_path / "hand.safetensors", _safetensors(entries, data))
    sd, digest = read_tensors(path)
    assert digest == sha256_file(path)
    assert sd["a.weight"].tolist() == [0.5]
    assert sd[LAYER].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert sd[LAYER].untyped_storage().data_ptr() % 4 == 0  # 2 bytes into 8-aligned data: copied, aligned
    assert sd["big.weight"].tolist() == [-1.0, 7.0]

    big = torch.randn(256, 512)
    save_file({LAYER: big, "last_bn.weight": torch.ones(256)}, str(tmp_path / "aligned.safetensors"))
    sd, _ = read_tensors(tmp_path / "aligned.safetensors")
    torch.testing.assert_close(sd[LAYER], big, rtol=0, atol=0)
    raw = (tmp_path / "aligned.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    # views into one buffer: the tensors sit as far apart in memory as in the file
    apart = {k: v.untyped_storage().data_ptr() - header[k]["data_offsets"][0] for k, v in sd.items()}
    assert len(set(apart.values())) == 1, apart


def _zip_with_garbage() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    return buf.getvalue()


@pytest.mark.parametrize(
    "tensors, reason",
    [
        ({LAYER: torch.full((4, 4), float("nan"))}, "16 of 16 values NaN/Inf"),
        ({LAYER: torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}, "1 of 4 values NaN/Inf"),
        ({LAYER: torch.ones(4, 4, dtype=torch.int64)}, "dtype"),
        ({LAYER: torch.ones(7)}, "need a 2-D weight"),
        ({"other.weight": torch.ones(4, 4)}, "not found"),
        ({LAYER: torch.ones(0, 4)}, "empty"),
    ],
    ids=["nan", "inf", "int", "1d", "missing-layer", "empty-tensor"],
)
def test_unscorable_tensors_are_invalid(tmp_path, tensors, reason):
    for fmt in ("pt", "safetensors"):
        p = tmp_path / f"bad.{fmt}"
        torch.save(tensors, p) if fmt == "pt" else save_file(tensors, str(p))
        with pytest.raises(InvalidCheckpoint, match=reason):
            load_layer(p)


def test_size_limit_refuses_before_reading(tmp_path):
    p = tmp_path / "sparse.pt"
    with open(p, "wb") as f:  # a 10 GB sparse file: no disk, and it must not be read
        f.seek(10 * 1024**3)
        f.write(b"\0")
    with pytest.raises(InvalidCheckpoint, match="over the"):
        load_layer(p, max_bytes=1 << 30)


def test_reading_reserves_the_file_not_the_limit(tmp_path):
    """read(n) reserves n bytes first: a 1 MB checkpoint read with the 4 GiB default limit once
    asked the allocator for 4 GiB (refused outright on a node with strict overcommit)."""
    import tracemalloc

    save_file({LAYER: torch.zeros(512, 512)}, str(tmp_path / "a.safetensors"))
    tracemalloc.start()
    try:
        read_tensors(tmp_path / "a.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * (tmp_path / "a.safetensors").stat().st_size


def test_a_file_that_changes_size_while_read_is_refused(tmp_path, monkeypatch):
    from pathlib import Path

    p = tmp_path / "a.safetensors"
    save_file({LAYER: torch.zeros(8, 8)}, str(p))
    real = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: os.stat_result((*real(self, **kw)[:6], 100, 0, 0, 0)))
    with pytest.raises(InvalidCheckpoint, match="changed size while being read"):
        read_tensors(p)


def test_missing_layer_lists_what_is_there(tmp_path):
    torch.save(_sd(), tmp_path / "a.pt")
    with pytest.raises(InvalidCheckpoint, match="last_bn.weight") as e:
        load_layer(tmp_path / "a.pt", "logits.weight")
    assert "--layer" in str(e.value)


def test_read_tensors_returns_everything_and_the_digest(tmp_path):
    torch.save(_sd(), tmp_path / "a.pt")
    tensors, digest = read_tensors(tmp_path / "a.pt")
    assert set(tensors) == {LAYER, "last_bn.weight"}
    assert digest == sha256_file(tmp_path / "a.pt")
