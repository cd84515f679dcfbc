"""Read one layer's weight matrix from a checkpoint without executing anything in it.

A backdoored model can also be a malicious file, so a candidate is never unpickled:
torch files go through ``torch.load(weights_only=True)``, safetensors through our own header
check then views into the checked bytes. The file is read once, bounded in size, and parsed from
the very bytes that were hashed, so the digest a verdict records is the digest of what was
scored. The format is decided by the file's magic bytes, not its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.config import DEFAULT_LAYER, MAX_CHECKPOINT_BYTES
from detector.errors import InvalidCheckpoint

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL2 = b"\x80\x02"  # torch's legacy (pre-1.6) serialisation starts with a pickle
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_CHUNK = 1 << 20
#: Largest weight magnitude the detector scores. Squared distances of float64 vectors overflow
#: near 1e154; a trained network's weights are O(1). Anything past this is refused, not scored.
MAX_ABS_WEIGHT = 1e6


class StateDict(dict):
    """A checkpoint's tensors plus what the file said about them.

    ``metadata`` is the safetensors header's ``__metadata__`` (string to string; our trainer
    records the ordered class list there, see :func:`classes_of`), ``source`` and ``sha256``
    name the bytes the tensors were parsed from. Behaves as a plain ``dict`` of tensors.
    """

    def __init__(
        self,
        tensors: Any = (),
        *,
        metadata: Mapping[str, str] | None = None,
        source: str = "<memory>",
        sha256: str | None = None,
    ) -> None:
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
        self.source = source
        self.sha256 = sha256


#: safetensors metadata key holding the JSON list of class (identity folder) names, in logit order.
CLASSES_KEY = "backdoor_gate.classes"


def classes_of(tensors: Mapping[str, Any]) -> list[str] | None:
    """The ordered class list a checkpoint records (None when it records none)."""
    raw = getattr(tensors, "metadata", {}).get(CLASSES_KEY)
    if raw is None:
        return None
    source = getattr(tensors, "source", "<memory>")
    try:
        classes = json.loads(raw)
    except json.JSONDecodeError:
        raise InvalidCheckpoint(source, f"metadata '{CLASSES_KEY}' is not JSON") from None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise InvalidCheckpoint(source, f"metadata '{CLASSES_KEY}' is not a list of class names")
    return classes


@dataclass(frozen=True)
class LayerWeights:
    """A layer's weights as a 2-D float64 matrix (conv kernels flattened per output channel)."""

    matrix: np.ndarray
    layer: str
    source: str
    sha256: str | None
    original_shape: tuple[int, ...]
    #: the ordered class list the checkpoint records (logit i = classes[i]), when it records one
    classes: list[str] | None = None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def as_matrix(tensor: np.ndarray, *, name: str = "tensor", source: str = "<memory>") -> np.ndarray:
    """2-D weights as they are; conv kernels (out, in, *k) flattened to (out, in*prod(k))."""
    arr = np.asarray(tensor)
    if arr.ndim < 2:
        raise InvalidCheckpoint(
            source, f"layer '{name}' has shape {tuple(arr.shape)}; need a 2-D weight or a conv kernel"
        )
    if arr.ndim > 2:
        arr = arr.reshape(arr.shape[0], -1)
    if 0 in arr.shape:
        raise InvalidCheckpoint(source, f"layer '{name}' is empty (shape {tuple(arr.shape)})")
    return arr


def _check_values(arr: np.ndarray, name: str, source: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidCheckpoint(source, f"layer '{name}' has dtype {arr.dtype}; expected floating-point weights")
    out = np.asarray(arr, dtype=np.float64)
    bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
    if bad:
        raise InvalidCheckpoint(source, f"layer '{name}' holds {bad} NaN/Inf values")
    big = int(np.count_nonzero(np.abs(out) > MAX_ABS_WEIGHT))
    if big:
        raise InvalidCheckpoint(
            source, f"layer '{name}' holds {big} values of magnitude over {MAX_ABS_WEIGHT:g}; they cannot be scored"
        )
    return out


def _to_numpy(t: Any, name: str, source: str) -> np.ndarray:
    import torch

    if isinstance(t, np.ndarray):
        return t
    if isinstance(t, torch.Tensor):
        if not t.is_floating_point():
            raise InvalidCheckpoint(source, f"layer '{name}' has dtype {t.dtype}; expected floating-point weights")
        return t.detach().to("cpu", torch.float64).numpy()
    raise InvalidCheckpoint(source, f"layer '{name}' is a {type(t).__name__}, not a tensor")


def _missing(name: str, available: list[str], source: str) -> InvalidCheckpoint:
    shown = ", ".join(sorted(available)[:12]) + (" ..." if len(available) > 12 else "")
    return InvalidCheckpoint(
        source, f"layer '{name}' not found ({len(available)} tensors: {shown or 'none'}); pick one with --layer"
    )


def _sniff(data: bytes) -> str:
    if data.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(data) >= 9:
        (n,) = struct.unpack("<Q", data[:8])
        if data[8:9] == b"{" and 0 < n <= len(data) - 8:
            return "safetensors"
    if data.startswith(_PICKLE_PROTOCOL2):
        return "torch-legacy"
    return "unknown"


def read_checkpoint_bytes(path: str | os.PathLike, max_bytes: int = MAX_CHECKPOINT_BYTES) -> tuple[bytes, str]:
    """The file's bytes and their sha256, read once, so what is scored is exactly what was hashed."""
    p = Path(path)
    if not p.exists():
        raise InvalidCheckpoint(p, "no such file")
    if p.is_dir():
        raise InvalidCheckpoint(p, "is a directory, expected a checkpoint file (.pt/.pth/.safetensors)")
    size = p.stat().st_size
    if size == 0:
        raise InvalidCheckpoint(p, "empty file")
    if size > max_bytes:
        raise InvalidCheckpoint(p, f"file is {size} bytes, over the {max_bytes}-byte limit (max_checkpoint_bytes)")
    with open(p, "rb") as f:
        # size + 1, not max_bytes + 1: read(n) reserves n bytes up front (4 GiB by default, which a
        # node with strict overcommit refuses), and one byte past the size tells a growing file
        data = f.read(size + 1)
    if len(data) != size:
        raise InvalidCheckpoint(p, f"file changed size while being read (stat said {size} bytes, read {len(data)})")
    return data, hashlib.sha256(data).hexdigest()


#: safetensors dtype names and torch's (bytes per element follow from the torch dtype)
_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "F16": "float16",
    "BF16": "bfloat16", "U32": "uint32", "I32": "int32", "F32": "float32", "U64": "uint64", "I64": "int64",
    "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _safetensors_header(data: bytes, source: str) -> tuple[dict[str, str], list[tuple[str, Any, list[int], int, int]]]:
    """The metadata and every tensor as (name, torch dtype, shape, start, end) in ``data``, checked
    as the format requires (known dtypes, sizes that match the shapes, tensors that tile the data
    exactly) before any is read."""
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, 100 * _CHUNK):
        raise InvalidCheckpoint(source, f"safetensors header claims {n} bytes; file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidCheckpoint(source, f"safetensors header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise InvalidCheckpoint(source, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidCheckpoint(source, "safetensors __metadata__ is not a map of strings")
    data_len = len(data) - 8 - n
    entries = [(key, *_safetensors_entry(key, info, data_len, source)) for key, info in header.items()]
    at = 0
    for key, _, _, start, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if start != at:
            raise InvalidCheckpoint(source, f"safetensors entry '{key}' overlaps another or leaves a gap at {at}")
        at = end
    if at != data_len:
        raise InvalidCheckpoint(source, f"safetensors tensors cover {at} of the file's {data_len} data bytes")
    return meta, [(key, dtype, shape, 8 + n + start, 8 + n + end) for key, dtype, shape, start, end in entries]


def _safetensors_entry(key: str, info: Any, data_len: int, source: str) -> tuple[Any, list[int], int, int]:
    """One header entry as (torch dtype, shape, start, end) relative to the data, or InvalidCheckpoint."""
    import math

    import torch

    try:
        start, end = info["data_offsets"]
        name, shape = info["dtype"], info["shape"]
    except (TypeError, KeyError, ValueError):
        raise InvalidCheckpoint(
            source, f"safetensors entry '{key}' has no valid data_offsets, dtype and shape"
        ) from None
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
        raise InvalidCheckpoint(
            source, f"safetensors entry '{key}' points outside the file ({start}..{end} of {data_len})"
        )
    if name not in _ST_DTYPES:
        raise InvalidCheckpoint(source, f"safetensors entry '{key}' has unknown dtype {name!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InvalidCheckpoint(source, f"safetensors entry '{key}' has an invalid shape {shape!r}")
    dtype = getattr(torch, _ST_DTYPES[name])
    if math.prod(shape) * dtype.itemsize != end - start:
        raise InvalidCheckpoint(
            source, f"safetensors entry '{key}' holds {end - start} bytes; {name} {shape} needs another size"
        )
    return dtype, shape, start, end


def _parse_safetensors(data: bytes, source: str) -> StateDict:
    """Tensors that are views into ``data`` (no second copy of the network in memory: the gate's
    memory at 10,575 classes); a tensor misaligned for its dtype is copied instead."""
    import warnings

    import torch

    meta, entries = _safetensors_header(data, source)
    origin = np.frombuffer(data, dtype=np.uint8, count=1).ctypes.data  # the bytes' address, for alignment
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")  # never written to
        for key, dtype, shape, start, end in entries:
            if start == end:
                out[key] = torch.empty(shape, dtype=dtype)
                continue
            buf, offset = (data, start) if (origin + start) % dtype.itemsize == 0 else (bytearray(data[start:end]), 0)
            flat = torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize, offset=offset)
            out[key] = flat.view(shape)
    return StateDict(out, metadata=meta)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else e.__class__.__name__)[:300]


def _parse_torch(data: bytes, source: str) -> Mapping[str, Any]:
    import io
    import pickle

    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InvalidCheckpoint(
            source, f"refused by the safe loader (the pickle asks to run code or build objects): {_one_line(e)}"
        ) from None
    except Exception as e:  # corrupt zip, truncated storage, bad magic ... all mean "invalid"
        raise InvalidCheckpoint(
            source, f"unreadable torch checkpoint: {e.__class__.__name__}: {_one_line(e)}"
        ) from None
    return _state_dict_of(obj, source)


def _state_dict_of(obj: Any, source: str) -> Mapping[str, Any]:
    """The one state dict a checkpoint holds, or InvalidCheckpoint naming why there is not exactly one.

    Accepted: a flat mapping name -> tensor, or a mapping whose single entry is one of
    ``state_dict``/``model_state_dict``/``model`` holding such a flat mapping. Anything beside it
    (top-level tensors next to a nested dict, two candidate dicts, an ``epoch`` or an optimiser
    state) gives a loader a second reading of the file: the gate would judge one and a consumer
    could run the other, so the file is refused instead of guessed at.
    """
    if isinstance(obj, StateDict):  # already parsed and checked
        return obj
    if not isinstance(obj, Mapping):
        raise InvalidCheckpoint(source, f"holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    nested = [k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)]
    if nested:
        others = sorted(str(k) for k in obj if k != nested[0])
        if others:
            raise InvalidCheckpoint(
                source,
                f"two readings: a nested '{nested[0]}' dict and {len(others)} other top-level entries "
                f"({_shown(others)}); save exactly one flat state dict",
            )
        obj = obj[nested[0]]
    not_tensors = sorted(f"{k} ({type(v).__name__})" for k, v in obj.items() if not _is_tensor(v))
    if not_tensors:
        raise InvalidCheckpoint(
            source,
            f"entries that are not tensors: {_shown(not_tensors)}; a checkpoint holds one flat state dict "
            "(name -> tensor) and nothing else",
        )
    return obj


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, (torch.Tensor, np.ndarray))


def _shown(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def check_every_tensor(tensors: Mapping[str, Any], source: str) -> None:
    """Every floating tensor of the file finite and within :data:`MAX_ABS_WEIGHT`, read or not.

    The detector reads a few tensors; a NaN ``logits.bias`` or an infinite ``running_mean``
    elsewhere makes the deployed model's every output garbage (or a chosen class) while its
    score stays the clean model's. So the whole file is checked before anything is scored.
    """
    import torch

    bad: list[str] = []
    for name, t in tensors.items():
        if not _is_tensor(t):
            continue
        x = torch.as_tensor(t) if isinstance(t, np.ndarray) else t
        if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
            continue
        peak = x.detach().abs().max()  # NaN propagates through max; inf exceeds the limit
        if not bool(peak <= MAX_ABS_WEIGHT):
            n_bad = int((~torch.isfinite(x)).sum()) or int((x.abs() > MAX_ABS_WEIGHT).sum())
            kind = "NaN/Inf" if not bool(torch.isfinite(x).all()) else f"over {MAX_ABS_WEIGHT:g} in magnitude"
            bad.append(f"'{name}' ({n_bad} of {x.numel()} values {kind})")
    if bad:
        raise InvalidCheckpoint(source, f"tensors that cannot be a working network: {_shown(bad, 5)}")


def parse_tensors(data: bytes, source: str = "<bytes>", sha256: str | None = None) -> StateDict:
    """Every tensor of a checkpoint given as bytes, without executing code, each one checked
    finite and bounded (:func:`check_every_tensor`). Raises InvalidCheckpoint."""
    kind = _sniff(data)
    digest = sha256 or hashlib.sha256(data).hexdigest()
    if kind == "safetensors":
        sd = _parse_safetensors(data, source)
        out = StateDict(sd, metadata=sd.metadata, source=source, sha256=digest)
    elif kind in ("torch-zip", "torch-legacy"):
        out = StateDict(_parse_torch(data, source), source=source, sha256=digest)
    else:
        raise InvalidCheckpoint(source, "unknown format: neither a torch zip/legacy checkpoint nor a safetensors file")
    check_every_tensor(out, source)
    return out


def read_tensors(path: str | os.PathLike, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> tuple[StateDict, str]:
    """All tensors of a checkpoint file and the file's sha256, read safely."""
    data, digest = read_checkpoint_bytes(path, max_bytes)
    return parse_tensors(data, str(path), digest), digest


def layer_of(
    tensors: Mapping[str, Any], layer: str = DEFAULT_LAYER, *, source: str = "<memory>", sha256: str | None = None
) -> LayerWeights:
    """Pick ``layer`` out of a state dict and check it can be scored."""
    sd = _state_dict_of(tensors, source)
    if layer not in sd:
        raise _missing(layer, [str(k) for k in sd], source)
    raw = _to_numpy(sd[layer], layer, source)
    shape = tuple(int(s) for s in np.shape(raw))
    matrix = _check_values(as_matrix(raw, name=layer, source=source), layer, source)
    return LayerWeights(matrix=matrix, layer=layer, source=source, sha256=sha256, original_shape=shape)


def load_layer(source: Any, layer: str = DEFAULT_LAYER, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> LayerWeights:
    """One layer of a network as a 2-D float64 matrix.

    ``source`` is a checkpoint path, an ``nn.Module``, a state dict, a :class:`LayerWeights`,
    or an array (taken as the layer itself). Anything that cannot be scored raises
    :class:`InvalidCheckpoint`.
    """
    import torch

    if isinstance(source, LayerWeights):
        return source
    if isinstance(source, (str, os.PathLike)):
        tensors, digest = read_tensors(source, max_bytes=max_bytes)
        return layer_of(tensors, layer, source=str(source), sha256=digest)
    if isinstance(source, torch.nn.Module):
        return layer_of(source.state_dict(), layer, source=f"<{type(source).__name__}>")
    if isinstance(source, Mapping):
        return layer_of(source, layer)
    return layer_of({layer: source}, layer, source=f"<{type(source).__name__}>")
