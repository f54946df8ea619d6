"""Streaming safetensors: read one tensor at a time, write sharded files tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` and the raw bytes. Reading a tensor here is one ``readinto`` of its byte range into a
fresh tensor (no mmap: mapped pages would stay resident and count toward the process' memory for as
long as the file is open). Writing needs every header up front, so :class:`ShardedSafetensorsWriter`
takes the full list of (name, shape, dtype) in write order, assigns shards, and then accepts the
tensors one by one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megatron_qrm.conversion.errors import ConversionError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype_name: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return DTYPES.get(self.dtype_name)


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{path}: not a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ConversionError(f"{path}: not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(n))
    return header, 8 + n


class SafetensorsReader:
    """All tensors of an HF model directory: sharded (``model.safetensors.index.json``) or single file."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [fn for fn in files if not os.path.exists(os.path.join(directory, fn))]
            if missing:
                raise ConversionError(f"{directory}: shard file(s) listed in {INDEX_FILE} are missing: "
                                      f"{', '.join(missing)}")
        else:
            weight_map = None
            files = sorted(fn for fn in os.listdir(directory) if fn.endswith(".safetensors"))
            if not files:
                has_bin = any(fn.endswith(".bin") or fn.endswith(".pt") for fn in os.listdir(directory))
                raise ConversionError(f"{directory}: no safetensors weights" + (
                    " (only PyTorch .bin files: re-save the model with save_pretrained(safe_serialization=True))"
                    if has_bin else ""))
        self.tensors: dict[str, TensorInfo] = {}
        for fn in files:
            path = os.path.join(directory, fn)
            header, start = _read_header(path)
            size = os.path.getsize(path)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                b, e = meta["data_offsets"]
                if start + e > size:
                    raise ConversionError(f"{path}: truncated (tensor {name} ends past the end of the file)")
                self.tensors[name] = TensorInfo(fn, meta["dtype"], tuple(meta["shape"]), start + b, start + e)
        if weight_map is not None:
            absent = [n for n, fn in weight_map.items() if n not in self.tensors or self.tensors[n].file != fn]
            if absent:
                raise ConversionError(f"{directory}: tensors listed in {INDEX_FILE} are not in their shard files: "
                                      f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
        self.files = files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into its own memory (nothing else is kept)."""
        info = self.tensors[name]
        dtype = info.dtype
        if dtype is None:
            raise ConversionError(f"{name}: safetensors dtype {info.dtype_name} is not supported")
        out = torch.empty(info.shape, dtype=dtype)
        if info.nbytes != out.numel() * out.element_size():
            raise ConversionError(f"{name}: {info.nbytes} bytes on disk for shape {info.shape} {info.dtype_name}")
        if info.nbytes:
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(os.path.join(self.directory, info.file), "rb", buffering=0) as f:
                f.seek(info.begin)
                done = 0
                while done < info.nbytes:
                    n = f.readinto(buf[done:])
                    if not n:
                        raise ConversionError(f"{name}: unexpected end of {info.file}")
                    done += n
        return out

    def shard_sizes(self) -> dict[str, int]:
        return {fn: os.path.getsize(os.path.join(self.directory, fn)) for fn in self.files}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '50KB' / '123' -> bytes (decimal units, as transformers' max_shard_size)."""
    t = str(text).strip().upper()
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1,
             "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Writes ``entries`` (name, shape, dtype), in that order, as HF-style shards of at most
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own): ``model.safetensors`` when
    one shard suffices, else ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    Only the tensor being written is in memory."""

    def __init__(self, directory: str, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int):
        self.directory = directory
        self.entries = [_Entry(n, tuple(s), d) for n, s, d in entries]
        shards: list[list[_Entry]] = [[]]
        size = 0
        for e in self.entries:
            if shards[-1] and size + e.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        n = len(shards)
        self.shards = [(SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors", s)
                       for k, s in enumerate(shards)]
        self._order = [(k, e) for k, (_, s) in enumerate(self.shards) for e in s]
        self._pos = 0
        self._file = None
        self._remaining = 0
        self.shard_bytes = [sum(e.nbytes for e in s) for _, s in self.shards]

    def shard_of(self, index: int) -> int:
        return self._order[index][0]

    def _open(self, k: int) -> None:
        name, entries = self.shards[k]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(os.path.join(self.directory, name), "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._remaining = len(entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise RuntimeError(f"unexpected tensor {name}: every planned tensor was written")
        k, e = self._order[self._pos]
        if name != e.name or tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
            raise RuntimeError(f"writer expected {e.name} {e.shape} {e.dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._file is None:
            self._open(k)
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._remaining -= 1
        self._pos += 1
        if self._remaining == 0:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pos != len(self._order):
            raise RuntimeError(f"only {self._pos} of {len(self._order)} tensors were written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in self.entries)},
                     "weight_map": {e.name: name for name, s in self.shards for e in s}}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
