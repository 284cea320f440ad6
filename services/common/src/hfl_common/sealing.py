"""Sealing: keys bound to the enclave's identity, and AES-GCM files written atomically.

In SGX (Gramine) the sealing key comes from the CPU through Gramine's
`/dev/attestation/keys/_sgx_mrenclave` pseudo-file: only the same enclave
code on the same CPU can derive it again. In simulation the same shape is
kept: the simulated platform holds a per-machine secret (standing in for the
CPU's fused key) and the sealing key is HKDF(secret, MRENCLAVE), so changing
a service's code changes the key exactly as it would in SGX.

Every sealed file is AES-256-GCM with a fresh 96-bit nonce, the file's purpose
bound as associated data, written to a temporary file, fsynced and renamed
into place so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
