"""The narrow trusted-file inputs of a service's manifest, computed where it is signed.

A manifest must not trust whole library folders. This tool lists instead:

* `site_entries`: the top-level names (package folders, modules, .dist-info,
  *.libs) that the installed distributions in the service's site directory
  declare in their RECORD files. Anything in the site directory that no
  distribution owns is left out, so it cannot be opened inside the enclave.
* `system_libs`: the exact shared libraries (from `ldd`) that the interpreter,
  its stdlib extension modules and the service's extension modules load from
  the system, minus glibc's own libraries, which Gramine's runtime directory
  provides (mounted at /lib in the enclave).

It prints them as `gramine-manifest` definitions (comma-separated, one line):

    $ python3.11 gramine/trusted_inputs.py --site /opt/hfl/site \\
          --python /usr/bin/python3.11 --stdlib /usr/lib/python3.11
    -Dsite_entries=cbor2/,cbor2-5.6.5.dist-info/,... -Dsystem_libs=/lib/x86_64-linux-gnu/libz.so.1
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import posixpath
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# glibc's libraries, which Gramine ships patched in its runtime directory
# ({{ gramine.runtimedir() }}, mounted at /lib); the enclave never loads the
# system's copies, so they are not trusted files.
GRAMINE_RUNTIME_SONAME_PREFIXES = (
    "ld-linux",
    "libc.so",
    "libm.so",
    "libmvec.so",
    "libdl.so",
    "libpthread.so",
    "librt.so",
    "libutil.so",
    "libresolv.so",
    "libnsl.so",
    "libanl.so",
    "libnss_",
    "libthread_db.so",
    "libBrokenLocale.so",
    "libc_malloc_debug.so",
    "linux-vdso.so",
)
# Names never trusted even if a RECORD lists them: scripts, byte-code caches.
_EXCLUDED_TOP_LEVEL = frozenset({"bin", "__pycache__", ".."})
_LDD_BATCH = 64


class TrustedInputsError(Exception):
    """The site directory or a shared library is not usable; the message says which."""


def site_entries(site: Path) -> list[str]:
    """Top-level entries of `site` owned by an installed distribution (folders end in '/')."""
    if not site.is_dir():
        raise TrustedInputsError(f"{site}: not a directory")
    dist_infos = sorted(site.glob("*.dist-info"))
    if not dist_infos:
        raise TrustedInputsError(f"{site}: no *.dist-info found; is the service installed here?")
    names: set[str] = set()
    for dist_info in dist_infos:
        record = dist_info / "RECORD"
        if not record.is_file():
            raise TrustedInputsError(f"{dist_info}: has no RECORD file")
        names.add(dist_info.name)
        with record.open(newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if not row or not row[0]:
                    continue
                top = row[0].replace("\\", "/").split("/", 1)[0]
                if top not in _EXCLUDED_TOP_LEVEL:
                    names.add(top)
    entries = []
    for name in sorted(names):
        path = site / name
        if path.is_dir():
            entries.append(name + "/")
        elif path.is_file():
            entries.append(name)
        else:
            logger.warning("%s lists %s but it is not installed; skipped", site, name)
    return entries


def elf_candidates(roots: Iterable[Path]) -> list[Path]:
    """Files that may be dynamically linked: executables given directly, and *.so* below dirs."""
    found: list[Path] = []
    for root in roots:
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(
                p for p in sorted(root.rglob("*.so*")) if p.is_file() and not p.is_symlink()
            )
    return found


def _is_gramine_runtime_lib(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith(GRAMINE_RUNTIME_SONAME_PREFIXES)


def parse_ldd(output: str) -> tuple[set[str], set[str]]:
    """(resolved absolute library paths, sonames ldd could not find) from ldd's output."""
    resolved: set[str] = set()
    missing: set[str] = set()
    for line in output.splitlines():
        parts = line.strip().split()
        if len(parts) >= 3 and parts[1] == "=>":
            if parts[2] == "not":
                missing.add(parts[0])
            elif parts[2].startswith("/"):
                resolved.add(parts[2])
        elif len(parts) >= 2 and parts[0].startswith("/") and parts[1].startswith("("):
            resolved.add(parts[0])  # the dynamic loader itself
    return resolved, missing


def system_libs(
    binaries: Sequence[Path], *, inside: Sequence[Path] = (), ldd: str = "ldd"
) -> list[str]:
    """System shared libraries the binaries load, excluding glibc and anything under `inside`."""
    resolved: set[str] = set()
    missing: set[str] = set()
    for start in range(0, len(binaries), _LDD_BATCH):
        batch = [str(b) for b in binaries[start : start + _LDD_BATCH]]
        proc = subprocess.run(
            [ldd, *batch], capture_output=True, text=True, check=False, env={"LC_ALL": "C"}
        )
        batch_found, batch_lost = parse_ldd(proc.stdout)
        resolved |= batch_found
        missing |= batch_lost
    inside_prefixes = tuple(os.path.abspath(p) + "/" for p in inside)
    libs = set()
    for path in resolved:
        # Keep the path the loader opens (often a symlink such as libz.so.1):
        # Gramine checks a trusted file by the path opened, and the signer
        # hashes what it points to. Only "a/../b" is normalised, as Gramine does.
        lib = posixpath.normpath(path)
        if _is_gramine_runtime_lib(lib) or lib.startswith(inside_prefixes):
            continue
        libs.add(lib)
    # A library ldd cannot find would fail to load inside the enclave as well,
    # unless it is one of the given binaries: auditwheel's vendored *.libs are
    # found through their loader's RPATH, not their own.
    given = {b.name for b in binaries}
    missing = {m for m in missing if not _is_gramine_runtime_lib(m) and m not in given}
    if missing:
        raise TrustedInputsError(f"ldd cannot find {', '.join(sorted(missing))}")
    return sorted(libs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--site", type=Path, required=True, help="the service's site directory")
    parser.add_argument("--python", type=Path, required=True, help="the interpreter (entrypoint)")
    parser.add_argument("--stdlib", type=Path, required=True, help="the interpreter's stdlib")
    parser.add_argument(
        "--project", type=Path, help="trainer: the federation project directory in the image"
    )
    args = parser.parse_args(argv)
    if args.project is not None and not args.project.is_dir():
        sys.stderr.write(f"error: {args.project}: the project directory does not exist\n")
        return 2
    try:
        entries = site_entries(args.site)
        site_binaries = elf_candidates(args.site / e.rstrip("/") for e in entries)
        binaries = [args.python, *elf_candidates([args.stdlib]), *site_binaries]
        libs = system_libs(binaries, inside=[args.site, args.stdlib])
    except (TrustedInputsError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    for value in (*entries, *libs):
        if "," in value or " " in value:
            sys.stderr.write(f"error: {value!r} contains a comma or space; cannot pass it on\n")
            return 2
    project = f" -Dproject_dir={args.project}" if args.project is not None else ""
    sys.stdout.write(
        f"-Dsite_entries={','.join(entries)} -Dsystem_libs={','.join(libs)}{project}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
