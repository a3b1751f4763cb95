"""Read a torch.distributed.checkpoint (DCP) directory without running code from it.

torch 2.13's DCP reads untrusted bytes twice with the full pickle machinery:
- `FileSystemReader.read_metadata` does `pickle.load` on `<dir>/.metadata`, so a replaced
  `.metadata` can call anything (`os.system`, ...) while being read;
- `DefaultLoadPlanner.load_bytes` does `torch.load(weights_only=False)` on every non-tensor entry
  of the state dict (the step, the optimizer's param_groups).

`SafeReader` unpickles `.metadata` with an allowlist of exactly the classes DCP writes there, and
`SafePlanner` loads byte entries with `weights_only=True`. Everything else is DCP's own code.
Imported lazily by checkpoint.load_sharded: torch.distributed.checkpoint takes seconds to import.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata

# Every global DCP's FileSystemWriter pickles into .metadata (found by unpickling one with a
# logging find_class): its metadata dataclasses, the path it saved to, torch.Size, and the
# dtype/layout/memory-format encodings. Calling any of them only builds a value.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # looks a name up among torch's layouts
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals in _METADATA_CLASSES and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f".metadata names {module}.{name}, which is not a class DCP writes there; refused unread")


def read_metadata(stream: io.RawIOBase | io.BufferedIOBase) -> dcp_metadata.Metadata:
    """A DCP Metadata object from `stream`, unpickled with the allowlist."""
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f".metadata holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose read_metadata cannot run code (same steps as torch's, minus pickle)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries are read with torch.load(weights_only=True)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        plain = torch.load(value, map_location="cpu", weights_only=True)  # refuses code
        # Hand DCP its usual stream, re-serialised from the plain data just read, so its own
        # placement logic (flattened keys, mappings) stays untouched.
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)

