"""Sealing: keys bound to the enclave's identity, and AES-GCM files written atomically.

In SGX (Gramine) the sealing key comes from the CPU through Gramine's
`/dev/attestation/keys/_sgx_mrenclave` pseudo-file: only the same enclave
code on the same CPU can derive it again. In simulation the same shape is
kept: the simulated platform holds a per-machine secret (standing in for the
CPU's fused key) and the sealing key is HKDF(secret, MRENCLAVE), so changing
a service's code changes the key exactly as it would in SGX.

Every sealed file is AES-256-GCM with a fresh 96-bit nonce, the file's purpose
bound as associated data, written to a temporary file, fsynced and renamed
into place so a crash never leaves a half-written checkpoint. Large files (the
aggregator's checkpoint) use the streamed form at the end of this module
(SealedStreamWriter / SealedStreamReader): AES-GCM record by record, with order and
truncation protection, so the plaintext is never held whole in memory.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl_common.errors import ConfigError, HflError

_MAGIC = b"HFLSEAL1"
_NONCE = 12


class UnsealError(HflError):
    """A sealed file cannot be opened: another enclave's key, or tampered bytes."""


class SealingKeySource(Protocol):
    def sealing_key(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose`, bound to this enclave's identity."""
        ...


def _derive(base: bytes, salt: bytes, purpose: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=purpose.encode())
    return hkdf.derive(base)


@dataclass(frozen=True)
class GramineSealingKeys:
    """Sealing keys from Gramine's `/dev/attestation/keys/_sgx_mrenclave` (SGX only)."""

    keys_dir: Path = Path("/dev/attestation/keys")
    key_name: str = "_sgx_mrenclave"

    def sealing_key(self, purpose: str) -> bytes:
        path = self.keys_dir / self.key_name
        try:
            base = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the SGX sealing key {path}: {exc.strerror or exc}; "
                "sealing with --tee gramine needs to run inside a Gramine SGX enclave"
            ) from None
        return _derive(base, b"hfl-sgx-seal", purpose)


@dataclass(frozen=True)
class SimulatedSealingKeys:
    """Simulated sealing: HKDF over the simulated platform's secret and the MRENCLAVE."""

    platform_secret: bytes
    mrenclave: bytes

    def sealing_key(self, purpose: str) -> bytes:
        return _derive(self.platform_secret, self.mrenclave, purpose)


def seal(key: bytes, purpose: str, plaintext: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return _MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, purpose.encode())


def unseal(key: bytes, purpose: str, blob: bytes, what: str = "sealed data") -> bytes:
    if len(blob) < len(_MAGIC) + _NONCE + 16 or not blob.startswith(_MAGIC):
        raise UnsealError(f"{what} is not an hfl sealed file (bad header or too short)")
    nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(_MAGIC) + _NONCE :], purpose.encode())
    except InvalidTag:
        raise UnsealError(
            f"{what} cannot be unsealed: it was sealed by a different enclave identity "
            "or has been modified"
        ) from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file, fsync and rename (crash-safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_sealed(keys: SealingKeySource, purpose: str, path: Path, plaintext: bytes) -> None:
    write_atomic(path, seal(keys.sealing_key(purpose), purpose, plaintext))


def read_sealed(keys: SealingKeySource, purpose: str, path: Path) -> bytes:
    return unseal(keys.sealing_key(purpose), purpose, path.read_bytes(), str(path))


# --------------------------------------------------------------------- streamed sealing
#
# For files too large to hold twice in memory (the aggregator's checkpoint): the plaintext
# is sealed record by record as it is written, and read back record by record.
#
# File: MAGIC "HFLSTRM1" | salt (32 random bytes) | max record plaintext (u32) | records.
# Record: ciphertext length (u32) | final flag (1 byte) | AES-256-GCM ciphertext + tag.
# Each file gets its own key, HKDF(sealing key, salt, purpose); record i's nonce is
# i (11 bytes, big-endian) || final flag, and the header is associated data of every
# record. So a record cannot be moved (the counter), dropped from the end (the last one
# must carry the final flag, which is authenticated through the nonce), followed by
# anything, or spliced in from another file (another key); any of these is an UnsealError.

_STREAM_MAGIC = b"HFLSTRM1"
_STREAM_SALT = 32
_U32 = struct.Struct(">I")
_TAG = 16
STREAM_RECORD_BYTES = 1 << 20


def _stream_key(keys: SealingKeySource, purpose: str, salt: bytes) -> bytes:
    return _derive(keys.sealing_key(purpose), salt, purpose + "/stream")


def _stream_nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(_NONCE - 1, "big") + (b"\x01" if final else b"\x00")


class SealedStreamWriter:
    """Seal `path` as a stream of AES-GCM records, written atomically.

    Use as a context manager: `write()` the plaintext in pieces of any size (memoryviews
    of numpy arrays are not copied; each record costs one ciphertext of at most
    `record_bytes`); leaving the block normally marks the last record final, fsyncs and
    renames the temporary file over `path` (then fsyncs the directory). On an exception
    the temporary file is removed and `path` keeps its previous content.
    """

    def __init__(
        self,
        keys: SealingKeySource,
        purpose: str,
        path: Path,
        record_bytes: int = STREAM_RECORD_BYTES,
    ) -> None:
        if not 1 <= record_bytes <= (1 << 31):
            raise ValueError(f"record_bytes {record_bytes} must be in 1..2**31")
        self.path = path
        self._record_bytes = record_bytes
        salt = secrets.token_bytes(_STREAM_SALT)
        self._header = _STREAM_MAGIC + salt + _U32.pack(record_bytes)
        self._aead = AESGCM(_stream_key(keys, purpose, salt))
        self._index = 0
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def __enter__(self) -> SealedStreamWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._header)
        return self

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if self._pending_bytes == self._record_bytes:
                self._seal(final=False)
            take = min(len(view), self._record_bytes - self._pending_bytes)
            self._pending.append(view[:take])
            self._pending_bytes += take
            view = view[take:]

    def _seal(self, final: bool) -> None:
        assert self._file is not None, "use SealedStreamWriter as a context manager"
        parts = self._pending
        plaintext = parts[0] if len(parts) == 1 else b"".join(parts)
        flag = b"\x01" if final else b"\x00"
        sealed = self._aead.encrypt(_stream_nonce(self._index, final), plaintext, self._header)
        self._file.write(_U32.pack(len(sealed)) + flag)
        self._file.write(sealed)
        self.bytes_written += len(sealed) + _U32.size + 1
        self._index += 1
        self._pending = []
        self._pending_bytes = 0

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        f = self._file
        assert f is not None
        try:
            if exc_type is None:
                self._seal(final=True)
                f.flush()
                os.fsync(f.fileno())
            f.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        except BaseException:
            f.close()
            self._tmp.unlink(missing_ok=True)
            raise
        finally:
            self._file = None
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class SealedStreamReader:
    """Read a file written by SealedStreamWriter, authenticating record by record.

    `readinto(buffer)` fills the buffer exactly (across records), `read(n)` returns n
    bytes, and `finish()` checks that the whole stream was consumed and ended with its
    final record. Anything wrong (another enclave's key, modified, reordered, truncated or
    extended records) raises UnsealError naming the file; no unauthenticated byte is ever
    returned. Memory: one record at a time.
    """

    def __init__(self, keys: SealingKeySource, purpose: str, path: Path) -> None:
        self.path = path
        self._what = str(path)
        self._file: BinaryIO = path.open("rb")
        try:
            header = self._file.read(len(_STREAM_MAGIC) + _STREAM_SALT + _U32.size)
            if len(header) < len(_STREAM_MAGIC) + _STREAM_SALT + _U32.size or not (
                header.startswith(_STREAM_MAGIC)
            ):
                raise UnsealError(f"{self._what} is not an hfl sealed stream (bad header)")
            salt = header[len(_STREAM_MAGIC) : len(_STREAM_MAGIC) + _STREAM_SALT]
            (self._record_bytes,) = _U32.unpack(header[-_U32.size :])
        except BaseException:
            self._file.close()
            raise
        self._header = header
        self._aead = AESGCM(_stream_key(keys, purpose, salt))
        self._index = 0
        self._final = False
        self._buffer = memoryview(b"")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SealedStreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_record(self) -> None:
        if self._final:
            raise UnsealError(f"{self._what}: read past the end of the sealed stream")
        head = self._file.read(_U32.size + 1)
        if len(head) < _U32.size + 1:
            raise UnsealError(
                f"{self._what} is truncated: the sealed stream ends without its final record"
            )
        (length,) = _U32.unpack(head[: _U32.size])
        flag = head[_U32.size]
        if flag not in (0, 1) or not _TAG <= length <= self._record_bytes + _TAG:
            raise UnsealError(f"{self._what}: record {self._index} has a malformed header")
        sealed = self._file.read(length)
        if len(sealed) < length:
            raise UnsealError(f"{self._what} is truncated inside record {self._index}")
        final = flag == 1
        try:
            plain = self._aead.decrypt(_stream_nonce(self._index, final), sealed, self._header)
        except InvalidTag:
            raise UnsealError(
                f"{self._what} cannot be unsealed: record {self._index} was sealed by a "
                "different enclave identity, modified, reordered or taken from another file"
            ) from None
        self._index += 1
        self._final = final
        self._buffer = memoryview(plain)

    def readinto(self, buffer: bytearray | memoryview) -> None:
        out = memoryview(buffer).cast("B")
        while out:
            if not self._buffer:
                self._next_record()
                continue
            take = min(len(out), len(self._buffer))
            out[:take] = self._buffer[:take]
            out = out[take:]
            self._buffer = self._buffer[take:]

    def read(self, size: int) -> bytes:
        out = bytearray(size)
        self.readinto(out)
        return bytes(out)

    def finish(self) -> None:
        """The stream must be consumed exactly: its final record read, nothing after it."""
        while not self._buffer and not self._final:
            self._next_record()
        if self._buffer:
            raise UnsealError(
                f"{self._what}: {len(self._buffer)} sealed bytes were left unread: the "
                "content does not match what its reader expects"
            )
        if self._file.read(1):
            raise UnsealError(f"{self._what}: data follows the final sealed record")
