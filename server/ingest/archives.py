"""Untrusted zip archives (``.keras``, ``.leanserve``, ``.npz``) read with every inflated byte counted.

A zip's directory states sizes the sender chose. Nothing here trusts them: members are inflated in chunks with a
running count against the caller's cap (``ResourceExhausted`` past it), so memory never depends on a declared size.
Python's ``zipfile`` never returns more than a member's declared size and checks its CRC at the end, so what was
counted here is exactly what any later reader of the same archive (Keras, say) gets.
"""

from __future__ import annotations

import io
import lzma
import math
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from leanserve.server.errors import InvalidArgument, ResourceExhausted, brief

CHUNK = 1 << 20
MAX_MEMBERS = 4096
#: an upload may always expand to this much, whatever its size (a small model's config and metadata)
EXPANSION_FLOOR = 16 * 1024 * 1024
MAX_ELEMENTS = 2**62

# What zipfile and its decompressors raise on malformed input (RuntimeError: an encrypted member; NotImplementedError:
# an unsupported compression method; EOFError: a truncated stream).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, RuntimeError, NotImplementedError,
               ValueError, OSError, KeyError)


def expansion_limit(received: int, max_unpacked: int, max_ratio: float) -> int:
    """Most bytes an upload of ``received`` bytes may expand to (inflated members, weights in memory): ``max_ratio``
    times what was received, at least ``EXPANSION_FLOOR``, never more than ``max_unpacked``."""
    return min(max_unpacked, max(int(received * max_ratio), EXPANSION_FLOOR))


class BoundedZip:
    """A zip archive opened for reading under one budget of inflated bytes shared by all its members.

    ``what`` names the archive in error messages ("the .keras file"). Raises ``InvalidArgument`` for anything
    malformed (a bad directory, duplicate or encrypted members, a CRC mismatch) and ``ResourceExhausted`` as soon
    as the inflated bytes pass ``max_unpacked``.
    """

    def __init__(self, source: Path | bytes | IO[bytes], max_unpacked: int, what: str) -> None:
        self.what, self.max_unpacked, self.unpacked = what, max_unpacked, 0
        try:
            self._zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except _ZIP_ERRORS as exc:
            raise InvalidArgument(f"{what} is not a valid zip archive: {brief(exc)}") from None
        infos = self._zf.infolist()
        if len(infos) > MAX_MEMBERS:
            self.close()
            raise InvalidArgument(f"{what} holds {len(infos)} members; at most {MAX_MEMBERS} are accepted")
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            self.close()
            raise InvalidArgument(f"{what} holds the same member name twice")
        if any(info.flag_bits & 0x1 for info in infos):
            self.close()
            raise InvalidArgument(f"{what} holds encrypted members")
        self.names: list[str] = names

    def __enter__(self) -> "BoundedZip":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the archive (idempotent)."""
        self._zf.close()

    def chunks(self, name: str, limit: int | None = None) -> Iterator[bytes]:
        """Inflate member ``name`` chunk by chunk, counting against the archive's budget (and ``limit`` for this
        member: ``InvalidArgument`` past it)."""
        got = 0
        try:
            with self._zf.open(name) as fh:
                while chunk := fh.read(CHUNK):
                    got += len(chunk)
                    self.unpacked += len(chunk)
                    if self.unpacked > self.max_unpacked:
                        raise ResourceExhausted(
                            f"{self.what} unpacks to more than {self.max_unpacked} bytes (the limit, counted while "
                            "inflating)"
                        )
                    if limit is not None and got > limit:
                        raise InvalidArgument(f"{self.what}: member {name!r} is larger than {limit} bytes")
                    yield chunk
        except (InvalidArgument, ResourceExhausted):
            raise
        except _ZIP_ERRORS as exc:
            raise InvalidArgument(f"{self.what}: member {name!r} cannot be read: {brief(exc)}") from None

    def read(self, name: str, limit: int | None = None) -> bytes:
        """Member ``name`` inflated into memory (counted; see ``chunks``)."""
        buf = io.BytesIO()
        for chunk in self.chunks(name, limit):
            buf.write(chunk)
        return buf.getvalue()

    def read_into_bytearray(self, name: str) -> bytearray:
        """Member ``name`` as a writable buffer (numpy arrays viewing it are writable)."""
        buf = bytearray()
        for chunk in self.chunks(name):
            buf += chunk
        return buf

    def extract(self, name: str, dest: Path) -> int:
        """Write member ``name`` to the file ``dest`` (counted); returns its size."""
        size = 0
        with open(dest, "wb") as out:
            for chunk in self.chunks(name):
                out.write(chunk)
                size += len(chunk)
        return size

    def check_all(self) -> None:
        """Inflate every member once, keeping nothing: proves that the whole archive fits the budget and that every
        CRC matches before anything is kept in memory or read by another library, so refusing a bomb costs a chunk
        of memory, never the budget. The count starts again afterwards: later reads are counted too."""
        for name in self.names:
            for _ in self.chunks(name):
                pass
        self.unpacked = 0


def read_npz(blob: bytes, max_unpacked: int, what: str = "the .npz") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (``numpy.savez`` / ``savez_compressed``) without trusting any declared size.

    Members are inflated under one budget of ``max_unpacked`` bytes; each ``.npy`` header is parsed by numpy's own
    reader, its dtype must be a plain number or bool (never an object: nothing is unpickled) and its shape must
    account for exactly the bytes that follow it, so an array is only ever a view of bytes that were received.
    """
    arrays: dict[str, np.ndarray] = {}
    with BoundedZip(blob, max_unpacked, what) as zf:
        zf.check_all()
        for name in zf.names:
            if not name.endswith(".npy"):
                raise InvalidArgument(f"{what}: member {name!r} is not a .npy array")
            arrays[name[: -len(".npy")]] = _npy_array(zf.read_into_bytearray(name), name, what)
    return arrays


def _npy_array(data: bytearray, name: str, what: str) -> np.ndarray:
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError, EOFError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what}: {name!r} is not a valid .npy array: {brief(exc)}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise InvalidArgument(f"{what}: {name!r} has dtype {dtype}; only numbers (no objects, no pickle) are accepted")
    # an empty array's other dims are unconstrained by its bytes: they must still make a shape numpy can hold
    if any(not isinstance(d, int) or d < 0 for d in shape) or math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidArgument(f"{what}: {name!r} declares shape {list(shape)}")
    count = math.prod(shape)
    offset = fh.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise InvalidArgument(
            f"{what}: {name!r} declares shape {list(shape)} of {dtype} ({count * dtype.itemsize} bytes) but holds "
            f"{len(data) - offset} bytes"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)



