"""Read tensors from a GGUF file (llama.cpp's format; city96 / calcuis Wan and umT5 files)
through the ``TensorStore`` interface, with the optional ``gguf`` package
(``pip install wanlite[gguf]``).

Every tensor is delivered in a floating dtype: F32 / F16 / BF16 as stored, block-quantized
types (Q8_0, Q4_0, Q4_K, ...) dequantized to fp32 *per tensor, when read* -- the file stays
compact on disk and in the page cache, and only the tensor being loaded exists in full
precision (the Component then casts it to the compute dtype, or quantizes it again).  Q8_0 and
the plain types are decoded with torch; the other types with ``gguf.quants.dequantize``
(numpy, slower, exact).

Shapes: GGUF lists dimensions fastest-first, so the torch shape is the reverse.  GGUF has at
most 4 dimensions; ComfyUI-GGUF's converter stores a 5-D tensor (the DiT's patch embedding,
a Conv3d) flattened, with its real shape in the metadata array
``comfy.gguf.orig_shape.<name>`` -- honoured here (and written so by ``write_gguf``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .tensorstore import Entry, drop_pages

ORIG_SHAPE = "comfy.gguf.orig_shape."


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "reading GGUF files needs the gguf package: pip install 'wanlite[gguf]'", name="gguf"
        ) from e
    return gguf


class GGUFStore:
    """Every tensor of one GGUF file, dequantized on demand (see the module docstring)."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # a truncated or foreign file: the reader's own message
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.metadata = _string_fields(self.reader, gguf)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.shapes = {n: _shape(self.reader, t) for n, t in self._tensors.items()}
        self.entries = {n: self._entry(n, t, gguf) for n, t in self._tensors.items()}

    def _entry(self, name: str, t, gguf) -> Entry:
        dtype = _dtype(t.tensor_type, gguf)
        return Entry(self.path, dtype, self.shapes[name], t.data_offset, t.n_bytes)

    def quant_types(self) -> dict[str, str]:
        """The GGML type of every tensor (``Q8_0``, ``BF16``, ...), for logging."""
        return {n: t.tensor_type.name for n, t in self._tensors.items()}

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._tensors[key]
        out = _decode(t.data, t.tensor_type).reshape(self.shapes[key])
        drop_pages(t.data.ctypes.data, t.data.nbytes)
        return out if dtype is None else out.to(dtype)

    view = get  # nothing here is usable in place: every tensor is decoded

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        t, shape = self._tensors[key], self.shapes[key]
        for r in rows:
            if not 0 <= r < shape[0]:
                raise IndexError(f"{key}: row {r} out of range [0, {shape[0]})")
        data = t.data.reshape(shape[0], -1)[rows]  # a row is whole blocks (rows % 32 == 0)
        return _decode(data, t.tensor_type).reshape(len(rows), *shape[1:])

    def unmap(self) -> None:
        """Nothing to do: reads drop their pages as they go."""

    def close(self) -> None:
        self._tensors.clear()
        self.reader = None


def _string_fields(reader, gguf) -> dict[str, str]:
    out = {}
    for name, field in reader.fields.items():
        if field.types == [gguf.GGUFValueType.STRING]:
            out[name] = field.contents()
    return out


def _shape(reader, t) -> tuple[int, ...]:
    field = reader.get_field(ORIG_SHAPE + t.name)
    if field is not None:
        return tuple(int(d) for d in field.contents())
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _dtype(qtype, gguf) -> torch.dtype:
    q = gguf.GGMLQuantizationType
    return {q.F16: torch.float16, q.BF16: torch.bfloat16}.get(qtype, torch.float32)


def _decode(data: np.ndarray, qtype) -> torch.Tensor:
    """A new floating tensor (flat order preserved) from the raw data of one tensor."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    raw = torch.from_numpy(np.array(data, copy=True))  # out of the map, writable
    if qtype in (q.F32, q.F16):
        return raw
    if qtype == q.BF16:
        return raw.view(torch.uint8).view(torch.bfloat16)
    if qtype == q.Q8_0:  # blocks of (fp16 scale, 32 x int8): x = d * q
        blocks = raw.view(torch.uint8).reshape(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        return (d * blocks[:, 2:].contiguous().view(torch.int8).float()).reshape(-1)
    out = gguf.quants.dequantize(np.asarray(data), qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1)


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], qtype: str, arch: str = "wan"):
    """Write ``tensors`` to a GGUF file: 2-D+ weights whose rows are whole blocks in ``qtype``
    (``Q8_0``, ``Q4_0``, ``BF16``, ...), the rest (norms, biases, small tables) in F32, as the
    usual converters do.  5-D tensors are flattened to 4-D with ``comfy.gguf.orig_shape``."""
    gguf = _gguf()
    kind = gguf.GGMLQuantizationType[qtype.upper()]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    w = gguf.GGUFWriter(str(path), arch)
    for name, t in tensors.items():
        t = t.detach().float().contiguous()
        if t.dim() > 4:
            w.add_array(ORIG_SHAPE + name, list(t.shape))
            t = t.reshape(t.shape[0], -1, *t.shape[-2:])
        quantize = t.dim() >= 2 and t.shape[-1] % block == 0 and math.prod(t.shape) >= 1024
        if not quantize or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t.numpy())
        else:
            data = gguf.quants.quantize(t.numpy(), kind)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
