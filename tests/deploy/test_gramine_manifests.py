"""The Gramine manifest templates render to secure, valid Gramine 1.8 manifests.

The templates are rendered the way `gramine-manifest` renders them: Jinja2 with
StrictUndefined, the `gramine` globals it injects (a small stand-in here), and
the -D variables gramine/gramine.mk passes. The result is parsed as TOML and
checked key by key.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2
import pytest

REPO = Path(__file__).resolve().parents[2]
GRAMINE = REPO / "gramine"
RUNTIMEDIR = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"
SITE = "/opt/hfl/site"
ROLES = {"attestation": 1, "aggregator": 2, "trainer": 3, "relay": 4}
# The Python package each role runs (a relay is the aggregator in relay mode).
MODULES = {"attestation": "hfl_attestation", "aggregator": "hfl_aggregator",
           "trainer": "hfl_trainer", "relay": "hfl_aggregator"}  # fmt: skip

# The keys Gramine 1.8's manifest schema (python/graminelibos/manifest_check.py)
# accepts in the sections these templates use; a typo or a pre-1.8 key name
# (sgx.thread_num, loader.entrypoint as a string) fails here, not on a host.
ALLOWED_KEYS = {
    "loader": {
        "entrypoint",
        "argv",
        "argv_src_file",
        "env",
        "env_src_file",
        "gid",
        "log_file",
        "log_level",
        "uid",
        "insecure__use_cmdline_argv",
        "insecure__use_host_env",
        "insecure__disable_aslr",
    },
    "libos": {"entrypoint", "check_invalid_pointers"},
    "fs": {"mounts", "root", "start_dir", "insecure__keys"},
    "sys": {
        "allowed_ioctls",
        "brk",
        "disallow_subprocesses",
        "enable_extra_runtime_domain_names_conf",
        "enable_sigterm_injection",
        "experimental__enable_flock",
        "insecure__allow_eventfd",
        "ioctl_structs",
        "stack",
        "fds",
    },
    "sgx": {
        "allowed_files",
        "cpu_features",
        "debug",
        "edmm_enable",
        "enable_stats",
        "enclave_size",
        "file_check_policy",
        "isvprodid",
        "isvsvn",
        "max_threads",
        "preheat_enclave",
        "remote_attestation",
        "seal_key",
        "trusted_files",
        "use_exinfo",
    },
}


class _Runtimedir:
    """Stand-in for graminelibos' Runtimedir: callable and printable."""

    def __call__(self, libc: str = "glibc") -> str:
        return RUNTIMEDIR

    def __str__(self) -> str:
        return RUNTIMEDIR


GRAMINE_GLOBALS: dict[str, Any] = {
    "gramine": {
        "libos": "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
        "pkglibdir": "/usr/lib/x86_64-linux-gnu/gramine",
        "runtimedir": _Runtimedir(),
    },
}

DEFINES = {
    "log_level": "error",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "entrypoint": "/usr/bin/python3.11",
    "python_stdlib": "/usr/lib/python3.11",
    "site_dir": SITE,
    "site_entries": "grpc/,grpcio-1.68.1.dist-info/,numpy/,numpy.libs/,six.py",
    "system_libs": "/lib/x86_64-linux-gnu/libz.so.1,/lib/x86_64-linux-gnu/libssl.so.3",
    "isvsvn": "3",
}


def render_text(role: str, defines: dict[str, str] | None = None) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.globals.update(GRAMINE_GLOBALS)
    template = env.from_string((GRAMINE / f"{role}.manifest.template").read_text())
    return template.render(**(DEFINES if defines is None else defines))


def render(role: str) -> dict[str, Any]:
    return tomllib.loads(render_text(role))


def _keys(table: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in table.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out.extend(_keys(value, prefix + key + "."))
    return out


@pytest.mark.parametrize("role", ROLES)
def test_manifest_renders_with_only_the_documented_variables(role: str) -> None:
    manifest = render(role)
    assert manifest["libos"]["entrypoint"] == "/usr/bin/python3.11"
    for var in ("site_dir", "isvsvn"):
        with pytest.raises(jinja2.UndefinedError, match=var):
            render_text(role, {k: v for k, v in DEFINES.items() if k != var})


@pytest.mark.parametrize("role", ROLES)
def test_manifest_uses_only_gramine_1_8_keys(role: str) -> None:
    manifest = render(role)
    assert set(manifest) <= set(ALLOWED_KEYS), set(manifest) - set(ALLOWED_KEYS)
    for section, allowed in ALLOWED_KEYS.items():
        unknown = set(manifest.get(section, {})) - allowed
        assert not unknown, f"{role}: unknown {section} keys {unknown}"
    assert manifest["loader"]["entrypoint"] == {
        "uri": "file:/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"
    }


@pytest.mark.parametrize("role", ROLES)
def test_manifest_has_no_insecure_option(role: str) -> None:
    text = render_text(role)
    assert "insecure__" not in re.sub(r"#.*", "", text)
    assert not [k for k in _keys(render(role)) if "insecure__" in k]


@pytest.mark.parametrize("role", ROLES)
def test_manifest_is_a_production_dcap_enclave(role: str) -> None:
    sgx = render(role)["sgx"]
    assert sgx["debug"] is False
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["file_check_policy"] == "strict"
    assert sgx["isvprodid"] == ROLES[role]
    assert sgx["isvsvn"] == 3
    assert render(role)["loader"]["log_level"] == "error"


@pytest.mark.parametrize("role", ROLES)
def test_state_dir_is_an_encrypted_mount_sealed_to_the_enclave(role: str) -> None:
    mounts = render(role)["fs"]["mounts"]
    state = [m for m in mounts if m["path"] == "/var/lib/hfl"]
    assert state == [
        {
            "type": "encrypted",
            "path": "/var/lib/hfl",
            "uri": "file:/var/lib/hfl",
            "key_name": "_sgx_mrenclave",
        }
    ]
    assert {"type": "tmpfs", "path": "/tmp"} in mounts


@pytest.mark.parametrize("role", ROLES)
def test_trusted_files_are_narrow(role: str) -> None:
    trusted = render(role)["sgx"]["trusted_files"]
    assert all(isinstance(t, str) and t.startswith("file:") for t in trusted)
    paths = [t.removeprefix("file:") for t in trusted]
    too_wide = {"/", "/usr/", "/usr/lib/", "/lib/", "/usr/lib/x86_64-linux-gnu/", "/etc/"}
    too_wide |= {"/lib/x86_64-linux-gnu/", "/opt/", f"{SITE}/", "/usr/lib/python3/"}
    assert not set(paths) & too_wide
    assert f"{SITE}/numpy/" in paths
    assert f"{SITE}/six.py" in paths
    assert "/lib/x86_64-linux-gnu/libz.so.1" in paths
    assert "/usr/bin/python3.11" in paths
    assert f"{RUNTIMEDIR}/" in paths
    assert "/etc/hfl/policy.toml" in paths
    if role != "attestation":
        # The plan pins the initial model by digest; both must be measured.
        assert {"/etc/hfl/plan.toml", "/etc/hfl/initial_weights.npz"} <= set(paths)
    allowed = render(role)["sgx"]["allowed_files"]
    assert "file:/etc/hosts" in allowed
    assert not [a for a in allowed if a.startswith(("file:/etc/hfl", "file:/opt", "file:/usr"))]


@pytest.mark.parametrize("role", ROLES)
def test_argv_is_fixed_and_runs_the_service_module(role: str) -> None:
    loader = render(role)["loader"]
    argv = loader["argv"]
    assert argv[:4] == ["/usr/bin/python3.11", "-P", "-m", f"{MODULES[role]}.main"]
    assert argv[argv.index("--tee") + 1] == "gramine"
    assert argv[argv.index("--state-dir") + 1] == "/var/lib/hfl"
    assert argv[argv.index("--policy") + 1] == "/etc/hfl/policy.toml"
    env = loader["env"]
    assert env["PYTHONPATH"] == SITE
    passthrough = {k for k, v in env.items() if isinstance(v, dict)}
    assert all(env[k] == {"passthrough": True} for k in passthrough)
    # Never the interpreter's, loader's or library search settings.
    assert not passthrough & {"PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME"}
    assert passthrough <= {
        "HFL_ATTESTATION",
        "HFL_AGGREGATOR",
        "HFL_LABEL",
        "HFL_TRAINER_INDEX",
        "HFL_NUM_PARTITIONS",
        "HFL_PCCS_URL",
        "HFL_RELAY_UPSTREAM",
        "HFL_PARTY",
        "HFL_PARTY_KEY",
    }


def test_only_the_trainer_gets_per_party_settings_from_the_host() -> None:
    env = {role: render(role)["loader"]["env"] for role in ROLES}
    passed = {role: {k for k, v in e.items() if isinstance(v, dict)} for role, e in env.items()}
    assert passed["attestation"] == {"HFL_PCCS_URL"}
    assert passed["aggregator"] == {"HFL_ATTESTATION", "HFL_PCCS_URL"}
    # The relay: the aggregator's settings plus its root's address and its display name.
    assert passed["relay"] == {
        "HFL_ATTESTATION",
        "HFL_PCCS_URL",
        "HFL_RELAY_UPSTREAM",
        "HFL_LABEL",
    }
    assert env["trainer"]["HFL_LABEL"] == {"passthrough": True}
    assert "/etc/hfl/plan.toml" in str(render("aggregator")["sgx"]["trusted_files"])
    assert "file:/data/" in render("trainer")["sgx"]["allowed_files"]
    assert env["trainer"]["HFL_PARTY"] == {"passthrough": True}
    assert env["trainer"]["HFL_PARTY_KEY"] == {"passthrough": True}


def test_the_trainer_reads_its_party_and_key_from_the_passed_through_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The names the manifest passes through are the ones the trainer's flags read
    # (hfl_common.runtime: --party <- HFL_PARTY, --party-key <- HFL_PARTY_KEY), with
    # the manifest's own fixed argv.
    import argparse

    from hfl_common.runtime import EnclaveOptions, add_enclave_flags, parse_service_args

    loader = render("trainer")["loader"]
    argv = loader["argv"][loader["argv"].index("--listen") :]
    parser = argparse.ArgumentParser(prog="hfl-trainer")
    add_enclave_flags(parser, listen="127.0.0.1:7410", metrics_listen="127.0.0.1:9410")
    for flag in ("--plan", "--data-dir", "--output-dir", "--project"):  # hfl_trainer.main's own
        parser.add_argument(flag)
    # What Gramine hands the enclave: only the variables the manifest passes through.
    host = {"HFL_PARTY": "party-a", "HFL_PARTY_KEY": "/keys/party/party.key.pem"}
    passed = {k for k, v in loader["env"].items() if v == {"passthrough": True}}
    for name, value in host.items():
        if name in passed:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    options = EnclaveOptions.from_args("trainer", parse_service_args(parser, argv))
    assert options.party == "party-a"
    assert options.party_key == Path("/keys/party/party.key.pem")
    assert options.tee == "gramine"
    assert options.state_dir == Path("/var/lib/hfl")


def test_the_party_key_is_an_allowed_file_on_its_own_mount_never_a_measured_one() -> None:
    # Each party has its own key, so it cannot be measured into the one trainer
    # MRENCLAVE; it is read from /keys/party/, which no other role can open.
    trainer = render("trainer")
    assert {"path": "/keys/party", "uri": "file:/keys/party"} in trainer["fs"]["mounts"]
    assert "file:/keys/party/" in trainer["sgx"]["allowed_files"]
    assert not [t for t in trainer["sgx"]["trusted_files"] if "/keys" in t]
    # No insecure key for an encrypted mount; the only encrypted mount is the sealed state.
    assert "insecure__keys" not in trainer["fs"]
    for role in ("attestation", "aggregator"):
        manifest = render(role)
        assert not [m for m in manifest["fs"]["mounts"] if m["path"].startswith("/keys")]
        assert not [a for a in manifest["sgx"]["allowed_files"] if "/keys" in a]
        assert "HFL_PARTY" not in manifest["loader"]["env"]
        assert "HFL_PARTY_KEY" not in manifest["loader"]["env"]


@pytest.mark.parametrize(
    ("role", "size", "threads", "edmm"),
    [
        ("attestation", "1G", 64, False),
        ("aggregator", "4G", 64, False),
        ("relay", "4G", 64, False),
        ("trainer", "8G", 96, True),
    ],
)
def test_enclave_resources_per_service(role: str, size: str, threads: int, edmm: bool) -> None:
    manifest = render(role)
    assert manifest["sgx"]["enclave_size"] == size
    assert manifest["sgx"]["max_threads"] == threads
    assert manifest["sgx"]["edmm_enable"] is edmm
    assert manifest["sys"]["enable_sigterm_injection"] is True
    # Each sizing decision is explained next to it in the template.
    text = (GRAMINE / f"{role}.manifest.template").read_text()
    for key in ("sgx.enclave_size", "sgx.max_threads", "sgx.edmm_enable"):
        line = text.index(f"\n{key} =")
        assert text[:line].rstrip().splitlines()[-1].startswith("#"), key


@pytest.mark.parametrize("role", ROLES)
def test_pccs_url_comes_from_each_party_outside_the_measurement(role: str) -> None:
    # Every service verifies its peers' quotes, so every one needs collateral;
    # the URL is not in MRENCLAVE (each party its own PCCS): Intel's signatures
    # on the collateral, under the root the measured policy pins, protect it.
    manifest = render(role)
    assert "--pccs-url" not in manifest["loader"]["argv"]
    assert manifest["loader"]["env"]["HFL_PCCS_URL"] == {"passthrough": True}
    assert "pccs_url" not in (GRAMINE / f"{role}.manifest.template").read_text()
    assert "pccs_url" not in (GRAMINE / "gramine.mk").read_text()


@pytest.mark.parametrize("role", ROLES)
def test_every_enclave_trusts_the_measured_ca_bundle_for_the_pccs(role: str) -> None:
    manifest = render(role)
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    assert f"file:{bundle}" in manifest["sgx"]["trusted_files"]
    assert manifest["loader"]["env"]["SSL_CERT_FILE"] == bundle
    # A private PCCS CA is added to that bundle before signing (Dockerfile.sgx).
    dockerfile = (REPO / "deploy/docker/Dockerfile.sgx").read_text()
    assert "/opt/hfl/sgx/pccs-ca.crt /usr/local/share/ca-certificates/" in dockerfile
    assert dockerfile.index("update-ca-certificates") < dockerfile.index(
        "make -f gramine/gramine.mk sign"
    )


@pytest.mark.parametrize("role", ROLES)
def test_thread_pools_are_capped_inside_the_enclave(role: str) -> None:
    manifest = render(role)
    env = manifest["loader"]["env"]
    assert env["TOKIO_WORKER_THREADS"] == "2"
    openblas = int(env["OPENBLAS_NUM_THREADS"])
    capped = 2 + openblas + 16  # tokio, OpenBLAS, gRPC server workers (ServerConfig)
    if role == "trainer":
        capped += int(env["TF_NUM_INTRAOP_THREADS"]) + int(env["TF_NUM_INTEROP_THREADS"])
    # What is left covers gRPC core's event-engine pool on a 12-CPU container
    # (~2 per CPU) plus Gramine's and the service's own helper threads.
    assert manifest["sgx"]["max_threads"] - capped >= 24 + 8, role
    text = (GRAMINE / f"{role}.manifest.template").read_text()
    comment = text[: text.index("\nsgx.max_threads =")].rsplit("\n\n", 1)[-1]
    for reason in ("gRPC", "tokio" if role != "trainer" else "TensorFlow", "Gramine"):
        assert reason in comment, (role, reason)


def test_only_the_aesm_needs_the_provisioning_device() -> None:
    compose = (REPO / "deploy/compose.yaml").read_text()
    assert "- /dev/sgx_provision" not in compose
    assert "/dev/sgx_enclave:/dev/sgx_enclave" in compose


def test_sgx_image_uses_the_python_the_tests_use() -> None:
    # One Python 3.11 (Debian 12's) in the enclaves, the offline base and CI.
    dockerfile = (REPO / "deploy/docker/Dockerfile.sgx").read_text()
    assert "ARG SGX_BASE_IMAGE=debian:bookworm-slim" in dockerfile
    assert "packages.gramineproject.io/ bookworm main" in dockerfile
    assert "gramine:1.8-jammy" not in dockerfile
    assert "python3 python3-venv" in dockerfile
    assert "--require-hashes -r build-tools.txt" in dockerfile
    assert "--no-build-isolation" in dockerfile
    assert sys.version_info[:2] == (3, 11)
    mk = (GRAMINE / "gramine.mk").read_text()
    assert "HFL_SGX_PYTHON ?= /usr/bin/python3.11" in mk


def _gramine_tools() -> Path | None:
    for candidate in (
        os.environ.get("HFL_GRAMINE_TOOLS"),
        str(REPO.parent / "shared" / "tools"),
        "/work/shared/tools",
    ):
        if candidate and (Path(candidate) / "graminelibos" / "manifest.py").is_file():
            return Path(candidate)
    return None


@pytest.mark.parametrize("role", ROLES)
def test_gramine_1_8_renders_and_accepts_the_manifest(role: str) -> None:
    """Gramine's own renderer and schema check (graminelibos at v1.8), where available."""
    tools = _gramine_tools()
    if tools is None:
        pytest.skip("Gramine 1.8's graminelibos not found (HFL_GRAMINE_TOOLS=<dir>/tools)")
    code = f"""
import json, os, sys
os.environ.setdefault("GRAMINE_PKGLIBDIR", {str(tools / "gramine-pkglib")!r})
sys.path.insert(0, {str(tools)!r})
from graminelibos import Manifest
text = open({str(GRAMINE / f"{role}.manifest.template")!r}).read()
m = Manifest.from_template(text, json.loads(sys.argv[1]))
m.check()
print(json.dumps({{
    "max_threads": m["sgx"]["max_threads"],
    "env": m["loader"]["env"],
    "allowed_files": m["sgx"]["allowed_files"],
}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(DEFINES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rendered = json.loads(proc.stdout)
    assert rendered["max_threads"] == render(role)["sgx"]["max_threads"]
    party = {k: rendered["env"].get(k) for k in ("HFL_PARTY", "HFL_PARTY_KEY")}
    if role == "trainer":
        # Gramine's own renderer and schema accept the party's passthrough and its key file.
        assert party == {"HFL_PARTY": {"passthrough": True}, "HFL_PARTY_KEY": {"passthrough": True}}
        assert "file:/keys/party/" in rendered["allowed_files"]
    else:
        assert party == {"HFL_PARTY": None, "HFL_PARTY_KEY": None}


# --- gramine/trusted_inputs.py -------------------------------------------


def _trusted_inputs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trusted_inputs", GRAMINE / "trusted_inputs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _install_fake_dist(site: Path, name: str, files: list[str]) -> None:
    dist_info = site / f"{name}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    for rel in files:
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    record = [f"{rel},sha256=abc,1" for rel in files] + [f"{dist_info.name}/RECORD,,"]
    (dist_info / "RECORD").write_text("\n".join(record) + "\n")


def test_site_entries_lists_only_what_distributions_own(tmp_path: Path) -> None:
    ti = _trusted_inputs()
    site = tmp_path / "site"
    _install_fake_dist(site, "demo", ["demo/__init__.py", "demo.libs/libx.so.1", "demo_mod.py"])
    (site / "bin").mkdir()
    (site / "bin" / "demo-cli").write_text("#!")
    (site / "planted").mkdir()
    (site / "planted" / "evil.py").write_text("x")
    assert ti.site_entries(site) == [
        "demo/",
        "demo-1.0.dist-info/",
        "demo.libs/",
        "demo_mod.py",
    ]


def test_site_entries_refuses_a_directory_without_distributions(tmp_path: Path) -> None:
    ti = _trusted_inputs()
    with pytest.raises(ti.TrustedInputsError, match=r"no \*\.dist-info found"):
        ti.site_entries(tmp_path)


def test_ldd_output_is_parsed_and_missing_libraries_reported() -> None:
    ti = _trusted_inputs()
    out = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n"
        "\tlibfoo.so.2 => not found\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n"
    )
    resolved, missing = ti.parse_ldd(out)
    assert resolved == {"/lib/x86_64-linux-gnu/libz.so.1", "/lib64/ld-linux-x86-64.so.2"}
    assert missing == {"libfoo.so.2"}


def test_system_libs_of_this_interpreter_exclude_glibc() -> None:
    ti = _trusted_inputs()
    import _ssl  # an extension module of the stdlib, linked against OpenSSL

    binaries = [Path(sys.executable).resolve(), Path(_ssl.__file__)]
    libs = ti.system_libs(binaries)
    assert all(lib.startswith("/") for lib in libs)
    assert not [lib for lib in libs if re.search(r"/(libc|libm|libpthread|ld-linux)[.-]", lib)]


def test_cli_prints_gramine_manifest_definitions(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _install_fake_dist(site, "demo", ["demo/__init__.py"])
    proc = subprocess.run(
        [
            sys.executable,
            str(GRAMINE / "trusted_inputs.py"),
            "--site",
            str(site),
            "--python",
            str(Path(sys.executable).resolve()),
            "--stdlib",
            str(tmp_path / "no-stdlib"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("-Dsite_entries=demo/,demo-1.0.dist-info/ -Dsystem_libs=")


# --- gramine/gramine.mk --------------------------------------------------


def _make(args: list[str], path: str) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    assert make, "make is needed for gramine/gramine.mk"
    return subprocess.run(
        [make, "--no-print-directory", "-f", "gramine/gramine.mk", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=120,
        env={"PATH": path, "HOME": "/nonexistent"},
    )


def test_make_manifests_without_gramine_says_where_they_are_built(tmp_path: Path) -> None:
    proc = _make(["manifests", f"GRAMINE_BUILD={tmp_path}"], path=str(tmp_path))
    assert proc.returncode == 2
    assert "gramine-manifest is not installed here" in proc.stdout
    assert "make sgx-images" in proc.stdout


def test_make_policy_writes_the_roles_tables_from_sig_files(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from .test_sigstruct import build_sigstruct

    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    for role, prod in ROLES.items():
        sig = build_sigstruct(key, mrenclave=bytes([prod]) * 32, isv_prod_id=prod, isv_svn=2)
        (tmp_path / f"hfl-{role}.sig").write_bytes(sig)
    proc = _make(
        ["policy", f"GRAMINE_BUILD={tmp_path}", f"GRAMINE_POLICY_PY={sys.executable}"],
        path=os.environ["PATH"],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    roles = tomllib.loads((tmp_path / "policy-roles.toml").read_text())["roles"]
    assert roles["trainer"]["mrenclave"] == ["03" * 32]
    assert roles["attestation"]["isv_prod_id"] == 1
    assert roles["aggregator"]["min_isv_svn"] == 2
    assert roles["relay"]["isv_prod_id"] == 4
    mrsigner_only = tomllib.loads((tmp_path / "policy-roles.mrsigner.toml").read_text())
    assert "mrenclave" not in mrsigner_only["roles"]["trainer"]


def test_the_relay_manifest_is_the_aggregators_but_for_its_product_id_and_upstream() -> None:
    aggregator, relay = render("aggregator"), render("relay")
    assert aggregator["sgx"]["isvprodid"] == 2
    assert relay["sgx"]["isvprodid"] == 4
    assert relay["loader"]["argv"] == aggregator["loader"]["argv"]
    assert relay["sgx"]["trusted_files"] == aggregator["sgx"]["trusted_files"]
    assert relay["fs"] == aggregator["fs"]
    extra = set(relay["loader"]["env"]) - set(aggregator["loader"]["env"])
    assert extra == {"HFL_RELAY_UPSTREAM", "HFL_LABEL"}
    assert "HFL_RELAY_UPSTREAM" not in aggregator["loader"]["env"]
