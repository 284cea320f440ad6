"""The simulated enclave identity: what it measures, and what it cannot.

**What MRENCLAVE measures in simulation.** `measure_code` hashes, in a canonical order,
the path (relative to the packages' common directory) and the content of every ``.py``
file of the service's own package and of ``hfl_common`` as they are *on disk* when the
service starts (`simulated_identity_for`). Editing, adding, removing or renaming any of
those files changes the identity, as rebuilding an enclave changes its MRENCLAVE.
MRSIGNER is the development signing key's (SHA-256 of its modulus, as SGX computes it);
ISV_PROD_ID follows `ROLE_ISV_PROD_ID`; ISV_SVN is the --isv-svn flag.

**What it cannot measure.** Nothing in simulation stops the host: it runs the process,
can read and write its memory, and holds the platform's development keys, so it can
make any quote it likes. The identity therefore only catches honest mistakes (a service
built from other code than the policy lists), never an attack. In particular it does
not cover code that runs *besides* the measured files:

- third-party libraries (numpy, grpcio, TensorFlow, cryptography) and the interpreter;
- ``.pyc`` files used instead of the sources, ``.pth`` files, and C extensions;
- run-time patches: a ``sitecustomize``/``usercustomize`` module, ``PYTHONPATH``
  shadowing a module, ``PYTHONSTARTUP``/``PYTHONINSPECT``, or monkey-patching by any
  imported module.

The last group is cheap to do by accident, so `check_no_code_injection` refuses to start
a simulated service when one is visible at start: PYTHONPATH (or PYTHONSTARTUP,
PYTHONINSPECT, PYTHONHOME) set, or a ``sitecustomize``/``usercustomize`` loaded from
anywhere but the interpreter's own standard library directory (judged by the directory
it was loaded from: Debian's ``/usr/lib/python3.X/sitecustomize.py`` is a symlink into
``/etc``, a root-owned system file like the rest of the standard library). It is a guard against
mistakes and a loud signal, not a defence: in SGX, Gramine measures the interpreter, the
libraries and the manifest (with its fixed PYTHONPATH) into MRENCLAVE, and that is the
defence. docs/security.md says the same.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from hfl_common.errors import ConfigError, InvalidArgumentError

if TYPE_CHECKING:
    from hfl_common.tee.simulation.platform import SimulatedPlatform

# Convention of this project (not an SGX rule): the ISV_PROD_ID of each role.
# A relay runs the aggregator's code (`hfl-aggregator --relay-upstream`), so in simulation
# it has the aggregator's MRENCLAVE; its own ISV_PROD_ID (and, in SGX, its own manifest and
# signature) is what tells the two roles apart.
ROLE_ISV_PROD_ID: dict[str, int] = {"attestation": 1, "aggregator": 2, "trainer": 3, "relay": 4}

# Environment variables that make the interpreter run or find code the identity does not
# measure.
CODE_INJECTING_ENVIRONMENT = ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONHOME")
CUSTOMIZE_MODULES = ("sitecustomize", "usercustomize")


@dataclass(frozen=True)
class EnclaveIdentity:
    """The identity an enclave's report body carries."""

    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int

    def __post_init__(self) -> None:
        if len(self.mrenclave) != 32 or len(self.mrsigner) != 32:
            raise InvalidArgumentError(
                f"MRENCLAVE and MRSIGNER must be 32 bytes, got {len(self.mrenclave)} "
                f"and {len(self.mrsigner)}"
            )
        for name, value in (("ISV_PROD_ID", self.isv_prod_id), ("ISV_SVN", self.isv_svn)):
            if not 0 <= value <= 0xFFFF:
                raise InvalidArgumentError(f"{name} must be in [0, 65535], got {value}")


def measure_code(paths: Iterable[Path], *, base: Path | None = None) -> bytes:
    """SHA-256 over code files in a canonical order: the simulated MRENCLAVE.

    Each file contributes its path relative to `base` (POSIX form; default: the
    deepest directory holding all the files) and its content, both
    length-prefixed, in the order of those relative paths. Renaming, editing,
    adding or removing a file changes the result; where the tree lies does not.
    """
    files = sorted({Path(p).resolve() for p in paths})
    if not files:
        raise InvalidArgumentError("measure_code needs at least one file to measure")
    root = base.resolve() if base is not None else Path(os.path.commonpath(files))
    if root in files:
        root = root.parent
    entries: list[tuple[str, Path]] = []
    for path in files:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            raise InvalidArgumentError(f"{path} is not under the measured base {root}") from None
        entries.append((rel, path))
    digest = hashlib.sha256(b"hfl simulated MRENCLAVE v1\x00")
    for rel, path in sorted(entries):
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read {path} to measure it: {exc}") from None
        name = rel.encode()
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(len(content).to_bytes(8, "little") + content)
    return digest.digest()


def package_code_files(package: str | Path) -> tuple[Path, list[Path]]:
    """The directory of a package (import name or path) and its .py files."""
    if isinstance(package, Path):
        root = package
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise InvalidArgumentError(f"{package!r} is not an importable package")
        root = Path(next(iter(spec.submodule_search_locations)))
    if not root.is_dir():
        raise InvalidArgumentError(f"package directory {root} does not exist")
    files = [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    if not files:
        raise InvalidArgumentError(f"package directory {root} holds no .py files")
    return root, files


def simulated_identity_for(
    package: str | Path,
    role: str,
    isv_svn: int,
    platform: SimulatedPlatform | Path,
    *,
    extra_packages: Sequence[str | Path] = (),
) -> EnclaveIdentity:
    """The simulated identity of a service: its code's hash, the dev signer, the role's id.

    `package` is the service package (import name like "hfl_trainer", or its
    directory); `extra_packages` are measured with it (e.g. "hfl_common"), each
    under its own directory name.
    """
    if role not in ROLE_ISV_PROD_ID:
        raise InvalidArgumentError(
            f"unknown role {role!r}; roles are {', '.join(sorted(ROLE_ISV_PROD_ID))}"
        )
    all_files: list[Path] = []
    roots: list[Path] = []
    for pkg in (package, *extra_packages):
        root, files = package_code_files(pkg)
        roots.append(root.resolve())
        all_files.extend(files)
    base = roots[0].parent if len(roots) == 1 else Path(os.path.commonpath(roots))
    mrenclave = measure_code(all_files, base=base)
    from hfl_common.tee.simulation.platform import SimulatedPlatform

    plat = platform if isinstance(platform, SimulatedPlatform) else SimulatedPlatform.load(platform)
    return EnclaveIdentity(
        mrenclave=mrenclave,
        mrsigner=plat.mrsigner,
        isv_prod_id=ROLE_ISV_PROD_ID[role],
        isv_svn=isv_svn,
    )


def check_no_code_injection(
    environ: Mapping[str, str] | None = None,
    modules: Mapping[str, ModuleType] | None = None,
) -> None:
    """Refuse (ConfigError) when code the simulated identity does not measure was injected
    at start: see the module doc for what is checked and why it is not a defence."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    set_vars = [name for name in CODE_INJECTING_ENVIRONMENT if environ.get(name)]
    if set_vars:
        raise ConfigError(
            f"{', '.join(set_vars)} is set: it runs or finds code the simulated enclave "
            "identity does not measure, so the identity would not say what runs; unset it "
            "(docs/security.md, 'What the simulated identity measures')"
        )
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for name in CUSTOMIZE_MODULES:
        module = modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if module is None:
            continue
        if origin is None or not _in_directory(Path(origin), stdlib):
            raise ConfigError(
                f"a {name} module ({origin or 'without a file'}) was loaded at start: it "
                "runs code the simulated enclave identity does not measure; remove it "
                "(docs/security.md, 'What the simulated identity measures')"
            )


def _in_directory(path: Path, directory: Path) -> bool:
    """Whether `path` was loaded from inside `directory`: the file's own directory is
    resolved, the file itself is not (a symlink the distribution placed in the standard
    library counts as the standard library's)."""
    parent = path.absolute().parent.resolve()
    return parent == directory or directory in parent.parents
