"""Read and write safetensors one tensor at a time, without memory-mapping.

The `safetensors` library maps whole files (the touched pages then count as resident memory) and
writes a file from a dict holding every tensor; loading a 64 GB checkpoint that way keeps a second
copy of the model around. Here reads are plain `readinto` calls into a fresh array and writes
stream tensors into a file whose header is planned up front, so the host holds one tensor at a
time. The format is the published one (8-byte little-endian header length, JSON header, raw
little-endian data; every host JAX supports is little-endian); files written here load with
`safetensors` and transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A safetensors file or index that cannot be read, naming the file and tensor."""


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise SafetensorsError(f"dtype {dtype} has no safetensors code")
    return _NAMES[dtype]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one file's header; every tensor's byte range is checked against the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file of {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} bytes); not safetensors?")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header should be a JSON object, found {type(header).__name__}")
    base, data_size = 8 + n, size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{where}: malformed entry {entry!r} (expected dtype, shape, data_offsets)") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{where}: unsupported dtype {dtype!r} (known: {sorted(DTYPES)})")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError(f"{where}: bad shape {list(shape)}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] outside the data section ({data_size} bytes)")
        if end - begin != expected:
            raise SafetensorsError(f"{where}: {end - begin} bytes stored, shape {list(shape)} x {dtype} needs {expected}")
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, expected)
    return out


class SafetensorsReader:
    """All tensors of a checkpoint: one `.safetensors` file, or a folder (with or without index)."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isfile(path):
            files = [path]
            weight_map = None
        elif os.path.isdir(path):
            index = os.path.join(path, INDEX_FILE)
            if os.path.exists(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SafetensorsError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
                files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
                for file in files:
                    if not os.path.exists(file):
                        raise SafetensorsError(f"{index}: lists {os.path.basename(file)}, which does not exist")
            else:
                weight_map = None
                files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
            if not files:
                raise SafetensorsError(f"{path}: no .safetensors files found")
        else:
            raise SafetensorsError(f"{path}: no such file or folder")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise SafetensorsError(f"tensor '{name}' appears in both {self.tensors[name].file} and {file}")
                self.tensors[name] = info
        if weight_map is not None:
            for name, file in weight_map.items():
                info = self.tensors.get(name)
                if info is None or os.path.basename(info.file) != file:
                    raise SafetensorsError(f"{INDEX_FILE}: maps '{name}' to {file}, but that file does not hold it")
            extra = sorted(set(self.tensors) - set(weight_map))
            if extra:
                raise SafetensorsError(f"{INDEX_FILE}: tensors {extra[:5]} are in the files but not in the index")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh numpy array (plain reads; nothing stays mapped)."""
        info = self.tensors[name]
        out = np.empty(info.shape, info.np_dtype)
        if info.nbytes:
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.offset)
                view = memoryview(out.reshape(-1).view(np.uint8))
                done = 0
                while done < info.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise SafetensorsError(f"{info.file}: tensor '{name}' is truncated "
                                               f"({done} of {info.nbytes} bytes)")
                    done += n
        return out


# ------------------------------------------------------------------------------------------------
# Writing

def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size: expected bytes or a size like '5GB', found {size!r}")
    unit = m.group(2).rstrip("B")
    factor = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * factor)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Split entries, in order, into files of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class StreamWriter:
    """Writes one safetensors file whose tensors arrive one by one, in the planned order."""

    def __init__(self, path: str, entries: Sequence[Entry], metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self.path, self._pending = path, list(entries)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        if not self._pending:
            raise SafetensorsError(f"{self.path}: unexpected extra tensor '{name}'")
        e = self._pending.pop(0)
        if name != e.name or tuple(array.shape) != e.shape or dtype_name(array.dtype) != e.dtype:
            raise SafetensorsError(f"{self.path}: expected tensor '{e.name}' {e.dtype}{list(e.shape)}, "
                                   f"got '{name}' {dtype_name(array.dtype)}{list(array.shape)}")
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        self._f.close()
        if self._pending:
            raise SafetensorsError(f"{self.path}: closed with {len(self._pending)} tensors unwritten "
                                   f"(first: '{self._pending[0].name}')")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def shard_file_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(folder: str, shards: Iterable[tuple[str, Sequence[Entry]]]) -> None:
    weight_map, total = {}, 0
    for file, entries in shards:
        for e in entries:
            weight_map[e.name] = file
            total += e.nbytes
    with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
