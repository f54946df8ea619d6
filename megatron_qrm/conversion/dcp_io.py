"""Write and read megatron-core ``torch_dist`` checkpoints one chunk at a time, without torch.distributed.

A megatron-core dist-checkpoint directory is a torch.distributed.checkpoint (DCP) checkpoint plus two
small files::

    .metadata          pickled DCP ``Metadata``: per global key its dtype, global shape and chunks
                       (offsets, sizes), and per chunk the file/offset/length of its bytes
    __R_0.distcp       chunk data: each chunk is one ``torch.save`` blob (objects: ``torch.save`` of a
                       list of their data), appended back to back
    metadata.json      {"sharded_backend": "torch_dist", ...}
    common.pt          non-sharded state (empty for model weights)

Keys are global and layout-agnostic (megatron-core reshards on load), so a checkpoint can be written
for any TP/PP by one process: :class:`DistCheckpointWriter` appends chunks to the file of the rank that
would own them (``__{pp*TP+tp}_0.distcp``) and keeps only their (tiny) metadata, so memory stays at one
chunk. :class:`DistCheckpointReader` reads any region of a tensor by loading just the chunks that
overlap it, whatever TP/PP the checkpoint was saved with.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import uuid
from typing import Any, Optional

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

METADATA_FILE = ".metadata"
MCORE_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                  "common_backend_version": 1}


def object_key(key: str, index: int, count: int) -> str:
    """megatron-core's ``ShardedObject.unique_key`` for a per-layer object."""
    return f"{key}/shard_{index}_{count}"


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``torch.save`` writes a tensor's whole storage: give slices their own."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


class DistCheckpointWriter:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.state_dict_metadata: dict[str, Any] = {}
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self._files: dict[int, Any] = {}
        self.bytes_written = 0

    def _file(self, rank: int):
        if rank not in self._files:
            self._files[rank] = open(os.path.join(self.directory, self.file_name(rank)), "wb")
        return self._files[rank]

    @staticmethod
    def file_name(rank: int) -> str:
        return f"__{rank}_0.distcp"

    def _append(self, rank: int, obj: Any) -> _StorageInfo:
        f = self._file(rank)
        start = f.tell()
        torch.save(obj, f)
        length = f.tell() - start
        self.bytes_written += length
        return _StorageInfo(self.file_name(rank), start, length)

    def write_tensor(self, key: str, global_shape: tuple[int, ...], dtype: torch.dtype,
                     offsets: tuple[int, ...], chunk: torch.Tensor, rank: int) -> None:
        """Append one chunk of global tensor ``key`` (at ``offsets``) to rank ``rank``'s file."""
        if chunk.dtype != dtype:
            chunk = chunk.to(dtype)
        if len(offsets) != len(global_shape) or chunk.dim() != len(global_shape):
            raise ValueError(f"{key}: chunk {tuple(chunk.shape)} at {offsets} does not fit {global_shape}")
        md = self.state_dict_metadata.get(key)
        if md is None:
            md = TensorStorageMetadata(properties=TensorProperties(dtype=dtype), size=torch.Size(global_shape),
                                       chunks=[])
            self.state_dict_metadata[key] = md
        elif tuple(md.size) != tuple(global_shape) or md.properties.dtype != dtype:
            raise ValueError(f"{key}: inconsistent global shape/dtype")
        for o, s, g in zip(offsets, chunk.shape, global_shape):
            if o < 0 or o + s > g:
                raise ValueError(f"{key}: chunk {tuple(chunk.shape)} at {offsets} exceeds {global_shape}")
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(chunk.shape)))
        self.storage_data[MetadataIndex(key, torch.Size(offsets))] = self._append(rank, _own_storage(chunk))

    def write_object(self, unique_key: str, data: Any, rank: int) -> None:
        """A megatron-core ShardedObject (stored as ``torch.save([data])``)."""
        buf = io.BytesIO()
        torch.save([data], buf)
        f = self._file(rank)
        start = f.tell()
        f.write(buf.getvalue())
        self.bytes_written += f.tell() - start
        self.state_dict_metadata[unique_key] = BytesStorageMetadata()
        self.storage_data[MetadataIndex(unique_key)] = _StorageInfo(self.file_name(rank), start, f.tell() - start)

    def finish(self) -> None:
        """Check that every tensor is fully covered, then write ``.metadata``, ``metadata.json`` and
        ``common.pt``."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files.clear()
        for key, md in self.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                covered = sum(math.prod(c.sizes) for c in md.chunks)
                if covered != math.prod(md.size):
                    raise RuntimeError(f"{key}: chunks cover {covered} of {math.prod(md.size)} elements")
        metadata = Metadata(state_dict_metadata=self.state_dict_metadata, planner_data=None,
                            storage_data=self.storage_data,
                            storage_meta=StorageMeta(checkpoint_id=self.directory, save_id=str(uuid.uuid4())),
                            version="1.0.0")
        with open(os.path.join(self.directory, METADATA_FILE), "wb") as f:
            pickle.dump(metadata, f)
        with open(os.path.join(self.directory, "metadata.json"), "w") as f:
            json.dump(MCORE_METADATA, f)
        torch.save({}, os.path.join(self.directory, "common.pt"))


class DistCheckpointReader:
    """Random access to the tensors of a dist-checkpoint directory (any TP/PP it was saved with)."""

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, METADATA_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory}: not a torch_dist checkpoint (no {METADATA_FILE})")
        with open(path, "rb") as f:
            self.metadata: Metadata = pickle.load(f)

    def keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]

    def __contains__(self, key: str) -> bool:
        return isinstance(self.metadata.state_dict_metadata.get(key), TensorStorageMetadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.metadata.state_dict_metadata[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def _load_chunk(self, key: str, offsets) -> torch.Tensor:
        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(offsets))]
        with open(os.path.join(self.directory, info.relative_path), "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The full tensor ``key``, or (``layer`` given) its slice ``[layer]`` along the leading layer axis."""
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{self.directory}: no tensor {key!r} in the checkpoint")
        size = tuple(md.size)
        start = [0] * len(size)
        length = list(size)
        if layer is not None:
            start[0], length[0] = layer, 1
        overlapping = []
        for chunk in md.chunks:
            lo = [max(s, o) for s, o in zip(start, chunk.offsets)]
            hi = [min(s + n, o + c) for s, n, o, c in zip(start, length, chunk.offsets, chunk.sizes)]
            if all(h > l for l, h in zip(lo, hi)):
                overlapping.append((chunk, lo, hi))
        if len(overlapping) == 1 and list(overlapping[0][0].offsets) == start \
                and list(overlapping[0][0].sizes) == length:  # one chunk is exactly the region: no copy
            data = self._load_chunk(key, start)
            return data[0] if layer is not None else data
        out = torch.empty(length, dtype=md.properties.dtype)
        filled = 0
        for chunk, lo, hi in overlapping:
            data = self._load_chunk(key, chunk.offsets)
            src = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, chunk.offsets))
            dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
            out[dst] = data[src]
            filled += math.prod(h - l for l, h in zip(lo, hi))
            del data
        if filled != out.numel():
            raise RuntimeError(f"{self.directory}: chunks of {key!r} cover {filled} of {out.numel()} elements")
        return out[0] if layer is not None else out
