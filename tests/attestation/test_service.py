"""The attestation service over real gRPC/TLS on 127.0.0.1: issuing, refusing, verifying."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from hfl_common.api import attestation_pb2, attestation_pb2_grpc
from hfl_common.attest_client import (
    PinnedAttestationService,
    bootstrap_attestation_service,
    embedded_evidence,
    evidence_quote,
    fetch_server_certificate,
    key_dns_name,
    obtain_certificate,
    peer_id_for,
    verify_ra_tls_certificate,
)
from hfl_common.config import AttestationPolicy, load_policy
from hfl_common.errors import PermissionDeniedError
from hfl_common.ratls import (
    LEGACY_QUOTE_OID,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    EnclaveKey,
    certificate_pem,
    make_ra_tls_certificate,
    parse_ra_tls_certificate,
    user_data_from_report_data,
)
from hfl_common.server import make_channel
from hfl_common.tee import (
    DirectoryCollateral,
    EnclaveIdentity,
    QuoteVerifier,
    SimulatedPlatform,
    SimulatedProvider,
)
from hfl_common.tee.identities import service_identity

from .conftest import DCAP_DATA, Identities, ServiceFactory, VerifierFactory, policy_toml

Providers = Callable[[EnclaveIdentity], SimulatedProvider]


def _request(
    key: EnclaveKey,
    role: attestation_pb2.Role,
    quote: bytes | None = None,
    cert: bytes | None = None,
) -> attestation_pb2.IssueCertificateRequest:
    role_name = attestation_pb2.Role.Name(role).removeprefix("ROLE_").lower()
    req = attestation_pb2.IssueCertificateRequest(
        csr=key.csr("t", (), role_name), role=role, label="test"
    )
    if quote is not None:
        req.evidence.sgx_quote = quote
    if cert is not None:
        req.evidence.ra_tls_certificate = cert
    return req


class _Refusal:
    """A failed call's status code and details."""

    def __init__(self, err: grpc.RpcError) -> None:
        assert isinstance(err, grpc.Call)
        self._code: grpc.StatusCode = err.code()
        self._details: str = err.details() or ""

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _issue_error(
    stub: attestation_pb2_grpc.AttestationServiceStub,
    request: attestation_pb2.IssueCertificateRequest,
) -> _Refusal:
    with pytest.raises(grpc.RpcError) as info:
        stub.IssueCertificate(request, timeout=5)
    return _Refusal(info.value)


def test_trainer_and_aggregator_obtain_certificates_with_names_quote_and_lifetime(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
    policy: AttestationPolicy,
) -> None:
    service = start_service()
    pinned = bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier())
    plan_hash = hashlib.sha256(b"the agreed plan").digest()
    for identity, role, user_data in (
        (identities.trainer, "trainer", b""),
        (identities.aggregator, "aggregator", plan_hash),
    ):
        key = EnclaveKey.generate()
        issued = obtain_certificate(pinned, key, provider_for(identity), role, "x", user_data)
        cert = issued.certificate
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(issued.ca_pem))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"hfl://role/{role}" in san.get_values_for_type(x509.UniformResourceIdentifier)
        assert f"hfl://id/{peer_id_for(key.spki_sha256)}" in san.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        assert key_dns_name(key.spki_sha256) in san.get_values_for_type(x509.DNSName)
        lifetime = issued.not_after - dt.datetime.now(dt.UTC)
        assert dt.timedelta(seconds=policy.certificate_lifetime_seconds - 60) < lifetime
        assert lifetime <= dt.timedelta(seconds=policy.certificate_lifetime_seconds)
        # the verified quote is in the leaf, with the caller's user data preserved
        ca = x509.load_pem_x509_certificate(issued.ca_pem)
        embedded = embedded_evidence(cert, ca)
        assert embedded.has_legacy_extension
        assert embedded.spki_sha256 == key.spki_sha256
        report_data = embedded.quote[368:432]
        assert report_data[:32] == key.spki_sha256
        assert user_data_from_report_data(report_data) == user_data.ljust(32, b"\x00")
    pinned.close()


def test_ra_tls_certificate_evidence_is_accepted_and_its_extension_copied(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        key = EnclaveKey.generate()
        evidence = make_ra_tls_certificate(key, provider_for(identities.trainer), role="trainer")
        response = pinned.stub.IssueCertificate(
            _request(key, attestation_pb2.ROLE_TRAINER, cert=evidence), timeout=5
        )
    assert response.verdict.accepted
    leaf = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    oids = {ext.oid for ext in leaf.extensions}
    assert TCG_DICE_TAGGED_EVIDENCE_OID in oids
    assert LEGACY_QUOTE_OID not in oids


def test_quote_for_an_unlisted_mrenclave_is_refused_with_the_reason(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        key = EnclaveKey.generate()
        quote = evidence_quote(key, provider_for(identities.rogue_trainer))
        err = _issue_error(pinned.stub, _request(key, attestation_pb2.ROLE_TRAINER, quote))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details().startswith("evidence refused for role trainer: quote MRENCLAVE")
        assert identities.rogue_trainer.mrenclave.hex() in err.details()
        # the high-level client says the same, as a domain error
        with pytest.raises(
            PermissionDeniedError, match=r"quote MRENCLAVE .* is not one the policy"
        ):
            obtain_certificate(
                pinned, key, provider_for(identities.rogue_trainer), "trainer", "rogue"
            )


def test_trainer_evidence_cannot_buy_an_aggregator_certificate(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        key = EnclaveKey.generate()
        quote = evidence_quote(key, provider_for(identities.trainer))
        err = _issue_error(pinned.stub, _request(key, attestation_pb2.ROLE_AGGREGATOR, quote))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "evidence refused for role aggregator" in err.details()


def test_csr_key_not_bound_by_the_quote_is_refused(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        quoted_key, csr_key = EnclaveKey.generate(), EnclaveKey.generate()
        quote = evidence_quote(quoted_key, provider_for(identities.trainer))
        err = _issue_error(pinned.stub, _request(csr_key, attestation_pb2.ROLE_TRAINER, quote))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "report_data[0:32]" in err.details()
        assert csr_key.spki_sha256.hex() in err.details()
        # an RA-TLS certificate for one key does not vouch for another key's CSR
        cert = make_ra_tls_certificate(quoted_key, provider_for(identities.trainer))
        err = _issue_error(pinned.stub, _request(csr_key, attestation_pb2.ROLE_TRAINER, cert=cert))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not the CSR's key" in err.details()


def test_operator_key_must_be_listed_in_the_policy(
    start_service: ServiceFactory, make_verifier: VerifierFactory, operator_key: EnclaveKey
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        stranger = EnclaveKey.generate()
        err = _issue_error(pinned.stub, _request(stranger, attestation_pb2.ROLE_OPERATOR))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == (
            f"operator key {stranger.spki_sha256.hex()} is not in the policy's [operators] "
            "spki_sha256 list"
        )
        issued = obtain_certificate(pinned, operator_key, None, "operator", "alice")
    san = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "hfl://role/operator" in san.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert LEGACY_QUOTE_OID not in {ext.oid for ext in issued.certificate.extensions}


def test_tdx_garbage_and_missing_evidence_are_refused(
    start_service: ServiceFactory, make_verifier: VerifierFactory
) -> None:
    service = start_service()
    tdx_quote = (DCAP_DATA / "tdx_quote").read_bytes()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        key = EnclaveKey.generate()
        err = _issue_error(pinned.stub, _request(key, attestation_pb2.ROLE_TRAINER, tdx_quote))
        assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
        assert "evidence refused for role trainer" in err.details()
        assert "TDX" in err.details() or "quote" in err.details()

        err = _issue_error(
            pinned.stub, _request(key, attestation_pb2.ROLE_TRAINER, b"\x03\x00garbage" * 10)
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "evidence refused for role trainer" in err.details()

        err = _issue_error(
            pinned.stub, _request(key, attestation_pb2.ROLE_TRAINER, cert=b"\x30junk")
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a usable RA-TLS certificate" in err.details()

        err = _issue_error(pinned.stub, _request(key, attestation_pb2.ROLE_TRAINER))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no evidence was sent" in err.details()

        bad = _request(key, attestation_pb2.ROLE_TRAINER)
        bad.role = attestation_pb2.ROLE_UNSPECIFIED
        err = _issue_error(pinned.stub, bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "role 0 is not one of" in err.details()


def test_verify_evidence_answers_refusals_with_a_verdict_not_an_error(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        good = provider_for(identities.trainer).quote(bytes(64))
        response = pinned.stub.VerifyEvidence(
            attestation_pb2.VerifyEvidenceRequest(
                evidence=attestation_pb2.Evidence(sgx_quote=good),
                role=attestation_pb2.ROLE_TRAINER,
            ),
            timeout=5,
        )
        assert response.verdict.accepted
        assert response.verdict.tcb_status == "UpToDate"
        assert response.verdict.measurements.mrenclave == identities.trainer.mrenclave
        assert response.verdict.simulated

        response = pinned.stub.VerifyEvidence(
            attestation_pb2.VerifyEvidenceRequest(
                evidence=attestation_pb2.Evidence(sgx_quote=good),
                role=attestation_pb2.ROLE_AGGREGATOR,
            ),
            timeout=5,
        )
        assert not response.verdict.accepted
        assert response.verdict.reason_code == "mrenclave_mismatch"
        assert "for role aggregator" in response.verdict.reason


def test_trust_bundle_and_policy_are_published(
    start_service: ServiceFactory, make_verifier: VerifierFactory, policy: AttestationPolicy
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        bundle = pinned.stub.GetTrustBundle(attestation_pb2.GetTrustBundleRequest(), timeout=5)
        published = pinned.stub.GetPolicy(attestation_pb2.GetPolicyRequest(), timeout=5)
        pinned_pem = pinned.certificate.pem
    assert bundle.ca_certificates_pem.encode() == service.ca.pem
    assert bundle.attestation_certificate_pem.encode() == pinned_pem
    assert bundle.policy_sha256 == hashlib.sha256(policy.text.encode()).hexdigest()
    assert published.policy_toml == policy.text
    assert published.policy_sha256 == bundle.policy_sha256


def test_issued_certificates_are_counted_per_role(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    registry = CollectorRegistry()
    service = start_service(registry=registry)
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        for _ in range(2):
            obtain_certificate(
                pinned, EnclaveKey.generate(), provider_for(identities.trainer), "trainer"
            )
        with pytest.raises(PermissionDeniedError):
            obtain_certificate(
                pinned, EnclaveKey.generate(), provider_for(identities.rogue_trainer), "trainer"
            )
    value = registry.get_sample_value
    assert value("hfl_attestation_certificates_issued_total", {"role": "trainer"}) == 2
    assert (
        value(
            "hfl_attestation_certificate_refusals_total",
            {"role": "trainer", "reason": "mrenclave_mismatch"},
        )
        == 1
    )
    # the verifier's own metrics share the registry
    assert (
        value(
            "hfl_attestation_verifications_total",
            {"role": "trainer", "result": "accepted", "reason": "ok"},
        )
        == 2
    )


def test_main_serves_writes_port_file_and_stops_on_sigterm(
    platform: SimulatedPlatform, identities: Identities, operator_key: EnclaveKey, tmp_path: Path
) -> None:
    # The real identity of this code: MRENCLAVE over hfl_attestation + hfl_common.
    real = service_identity("attestation", platform, 1)
    ids = Identities(
        attestation=real,
        aggregator=identities.aggregator,
        trainer=identities.trainer,
        rogue_trainer=identities.rogue_trainer,
        rogue_attestation=identities.rogue_attestation,
    )
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text(policy_toml(platform, ids, operator_key.spki_sha256))
    port_file = tmp_path / "ports.json"
    env = {
        **os.environ,
        "HFL_POLICY": str(policy_path),  # flags also come from the environment
        "HFL_TEE": "simulated",
        "HFL_SIM_PLATFORM": str(platform.directory),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from hfl_attestation.main import main; sys.exit(main())",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--port-file",
            str(port_file),
            "--log-json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no port file within 60 s"
            time.sleep(0.1)
        ports = json.loads(port_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/readyz") as r:
            assert r.status == 200
        verifier = QuoteVerifier(
            load_policy(policy_path),
            DirectoryCollateral(platform.collateral_dir),
            simulation_root_der=platform.root_der,
            registry=CollectorRegistry(),
        )
        with bootstrap_attestation_service(f"127.0.0.1:{ports['grpc']}", verifier) as pinned:
            assert pinned.verdict.measurements is not None
            assert pinned.verdict.measurements.mrenclave == real.mrenclave
        # a second instance on the same port: one clear line, exit code 2
        clash = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from hfl_attestation.main import main; sys.exit(main())",
                "--listen",
                f"127.0.0.1:{ports['grpc']}",
                "--metrics-listen",
                "127.0.0.1:0",
                "--state-dir",
                str(tmp_path / "state2"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert clash.returncode == 2
        last = clash.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: attestation: cannot bind 127.0.0.1:{ports['grpc']}")
        assert "Traceback" not in clash.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_reports_user_errors_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    bad_policy = tmp_path / "policy.toml"
    bad_policy.write_text('[trust]\nroot = "intel"\n[roles.trainer]\nmrenclave = ["zz"]\n')
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from hfl_attestation.main import main; sys.exit(main())",
            "--policy",
            str(bad_policy),
            "--tee",
            "simulated",
            "--sim-platform",
            str(tmp_path / "no-such-platform"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "mrenclave must be hexadecimal" in lines[0]
    assert "Traceback" not in result.stderr


def test_attestation_service_renews_its_own_certificate_without_restart(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    platform: SimulatedPlatform,
) -> None:
    service = start_service(self_certificate_validity=dt.timedelta(seconds=3))
    first = fetch_server_certificate("127.0.0.1", service.port)
    deadline = time.monotonic() + 20
    while service.own_certificate.renewals < 1:
        assert time.monotonic() < deadline, "the own certificate was not renewed in time"
        time.sleep(0.1)
    second = fetch_server_certificate("127.0.0.1", service.port)
    assert second != first
    old, new = parse_ra_tls_certificate(first), parse_ra_tls_certificate(second)
    assert new.spki_sha256 == old.spki_sha256  # the same enclave key, fresh evidence
    assert new.certificate.not_valid_after_utc > old.certificate.not_valid_after_utc
    # Pins are to the exact certificate (grpcio takes only root certificates), so a new
    # connection pinned to the old one is refused...
    old_pin = make_channel(
        service.target,
        grpc.ssl_channel_credentials(root_certificates=certificate_pem(first)),
        target_name_override=service.key_dns_name,
    )
    with pytest.raises(grpc.RpcError) as refused:
        attestation_pb2_grpc.AttestationServiceStub(old_pin).GetTrustBundle(
            attestation_pb2.GetTrustBundleRequest(), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...and a client holding it re-verifies the renewed certificate's evidence, pins it
    # and carries on: here, a trainer getting its certificate through the stale pin.
    verifier = make_verifier()
    verdict = verify_ra_tls_certificate(old, verifier, "attestation")
    stale = PinnedAttestationService(service.target, old_pin, old, verdict, verifier=verifier)
    issued = obtain_certificate(
        stale, EnclaveKey.generate(), SimulatedProvider(platform, identities.trainer), "trainer"
    )
    assert issued.certificate.not_valid_after_utc > dt.datetime.now(dt.UTC)
    assert stale.certificate.der == second
    stale.close()
