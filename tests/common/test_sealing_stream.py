"""Streamed sealing: AES-GCM record by record, refusing any modified, reordered,
truncated or extended file, and replacing the previous file only when complete."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hfl_common.sealing import (
    SealedStreamReader,
    SealedStreamWriter,
    SimulatedSealingKeys,
    UnsealError,
)

PURPOSE = "test-stream"
KEYS = SimulatedSealingKeys(b"platform-secret", b"\x11" * 32)
OTHER_ENCLAVE = SimulatedSealingKeys(b"platform-secret", b"\x22" * 32)
HEADER = 8 + 32 + 4  # magic, salt, record size


def write(path: Path, pieces: list[bytes], record_bytes: int = 7) -> None:
    with SealedStreamWriter(KEYS, PURPOSE, path, record_bytes=record_bytes) as out:
        for piece in pieces:
            out.write(memoryview(piece))


def read_all(path: Path, sizes: list[int], keys: SimulatedSealingKeys = KEYS) -> list[bytes]:
    with SealedStreamReader(keys, PURPOSE, path) as reader:
        out = [reader.read(n) for n in sizes]
        reader.finish()
    return out


def records(path: Path) -> tuple[bytes, list[bytes]]:
    """The file's header and its records (length + flag + ciphertext), as stored."""
    data = path.read_bytes()
    header, rest, out = data[:HEADER], data[HEADER:], []
    while rest:
        (length,) = struct.unpack(">I", rest[:4])
        out.append(rest[: 5 + length])
        rest = rest[5 + length :]
    return header, out


def test_pieces_of_any_size_come_back_across_record_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    pieces = [b"", b"abc", bytes(range(256)) * 3, b"x", b"0123456789" * 5]
    write(path, pieces)
    whole = b"".join(pieces)
    assert b"0123456789" not in path.read_bytes()
    # read back in other cuts than the ones written
    assert b"".join(read_all(path, [5, 1, len(whole) - 6])) == whole
    assert len(records(path)[1]) == -(-len(whole) // 7)


def test_an_empty_stream_is_one_final_record(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [])
    assert read_all(path, []) == []
    assert len(records(path)[1]) == 1


def test_another_enclave_identity_cannot_unseal(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"secret model bytes"])
    with pytest.raises(UnsealError, match="different enclave identity"):
        read_all(path, [18], keys=OTHER_ENCLAVE)


def test_a_modified_byte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"a" * 30])
    data = bytearray(path.read_bytes())
    data[HEADER + 5 + 3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(UnsealError, match="record 0"):
        read_all(path, [30])


def test_reordered_records_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"a" * 7 + b"b" * 7 + b"c" * 3])
    header, recs = records(path)
    path.write_bytes(header + recs[1] + recs[0] + recs[2])
    with pytest.raises(UnsealError, match="reordered"):
        read_all(path, [17])


def test_a_stream_cut_after_a_record_is_refused_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"a" * 20])
    header, recs = records(path)
    path.write_bytes(header + b"".join(recs[:-1]))
    with pytest.raises(UnsealError, match="truncated"):
        read_all(path, [14])


def test_a_non_final_record_cannot_be_passed_off_as_final(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"a" * 20])
    header, recs = records(path)
    forged = bytearray(recs[0])
    forged[4] = 1  # the final flag, in the clear but bound to the nonce
    path.write_bytes(header + bytes(forged))
    with pytest.raises(UnsealError):
        read_all(path, [7])


def test_data_after_the_final_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"abc"])
    path.write_bytes(path.read_bytes() + b"more")
    with pytest.raises(UnsealError, match="follows the final"):
        read_all(path, [3])


def test_unread_content_is_refused_by_finish(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"abcdef"])
    with pytest.raises(UnsealError, match="left unread"):
        read_all(path, [4])


def test_a_file_that_is_not_a_sealed_stream_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    path.write_bytes(b"HFLSEAL1" + b"\0" * 100)
    with pytest.raises(UnsealError, match="not an hfl sealed stream"):
        read_all(path, [1])


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "s.sealed"
    write(path, [b"first"])

    def crash_in_the_middle() -> None:
        with SealedStreamWriter(KEYS, PURPOSE, path, record_bytes=4) as out:
            out.write(b"second, longer than one record")
            raise RuntimeError("crash in the middle")

    with pytest.raises(RuntimeError, match="crash"):
        crash_in_the_middle()
    assert read_all(path, [5]) == [b"first"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.sealed"]
