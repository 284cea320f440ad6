"""The operator's side: a certificate from the federation CA, and `hfl status`.

An operator is a person or a tool (grpcurl, `hfl status`), not an enclave. Its
key is listed in the agreed policy ([operators] spki_sha256); the attestation
service issues it a short-lived certificate with role "operator", which the
aggregator's authorization table admits to GetStatus only. `hfl status`
re-verifies the aggregator's attested certificate before it asks anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc
from hfl_common.attest_client import (
    IssuedCertificate,
    ServiceCredentials,
    bootstrap_attestation_service,
    connect_verified,
    obtain_certificate,
)
from hfl_common.config import load_policy
from hfl_common.errors import ConfigError, UnavailableError
from hfl_common.ratls import EnclaveKey
from hfl_common.tee import DirectoryCollateral, QuoteVerifier, Verdict


@dataclass(frozen=True)
class OperatorCredentials:
    directory: Path
    credentials: ServiceCredentials
    verifier: QuoteVerifier


def simulation_root_der(platform_dir: Path) -> bytes:
    """The simulated platform's root certificate (DER): all an operator needs of it.

    Only root_ca.pem is read, not the platform's private keys, so an operator's
    copy of a simulated platform (`make operator`) holds nothing secret.
    """
    path = platform_dir / "root_ca.pem"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: cannot read the simulated platform's root certificate ({exc})"
        ) from None
    return cert.public_bytes(serialization.Encoding.DER)


def make_verifier(
    policy_path: Path, platform_dir: Path | None, collateral: Path | None
) -> QuoteVerifier:
    policy = load_policy(policy_path)
    sim_root = simulation_root_der(platform_dir) if platform_dir else None
    directory = collateral or (platform_dir / "collateral" if platform_dir else None)
    if directory is None:
        raise ConfigError("give --collateral-dir (or a simulated --sim-platform)")
    return QuoteVerifier(policy, DirectoryCollateral(directory), simulation_root_der=sim_root)


def _load_key(path: Path) -> EnclaveKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the operator key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} must hold an EC private key (P-384)")
    return EnclaveKey(key)


def obtain_operator_certificate(
    directory: Path,
    attestation: str,
    policy_path: Path,
    platform_dir: Path | None,
    collateral: Path | None = None,
) -> OperatorCredentials:
    """Verify and pin the attestation service, then get an operator certificate.

    Writes cert.pem and ca.pem beside key.pem in `directory` (for grpcurl).
    """
    verifier = make_verifier(policy_path, platform_dir, collateral)
    key = _load_key(directory / "key.pem")
    with bootstrap_attestation_service(attestation, verifier) as pinned:
        issued = obtain_certificate(pinned, key, None, "operator", "operator")
    (directory / "cert.pem").write_bytes(issued.cert_pem)
    (directory / "ca.pem").write_bytes(issued.ca_pem)
    return OperatorCredentials(directory, ServiceCredentials(key, issued), verifier)


def load_operator_credentials(
    directory: Path, policy_path: Path, platform_dir: Path | None, collateral: Path | None = None
) -> OperatorCredentials:
    key = _load_key(directory / "key.pem")
    try:
        cert_pem = (directory / "cert.pem").read_bytes()
        ca_pem = (directory / "ca.pem").read_bytes()
    except OSError as exc:
        raise ConfigError(f"no operator certificate in {directory}: {exc.strerror}") from None
    cert = x509.load_pem_x509_certificate(cert_pem)
    issued = IssuedCertificate(
        cert_pem, ca_pem, cert.not_valid_after_utc, cert.not_valid_before_utc
    )
    if issued.not_after < dt.datetime.now(dt.UTC):
        raise ConfigError(
            f"the operator certificate in {directory} expired at {issued.not_after:%Y-%m-%d %H:%M}"
            "; get a new one with `hfl operator-cert`"
        )
    verifier = make_verifier(policy_path, platform_dir, collateral)
    return OperatorCredentials(directory, ServiceCredentials(key, issued), verifier)


def aggregator_channel(
    target: str,
    operator: OperatorCredentials,
    on_verdict: Callable[[Verdict], None] | None = None,
) -> grpc.Channel:
    """A channel to the aggregator, after re-verifying its attested certificate."""
    return connect_verified(
        target, operator.credentials, operator.verifier, "aggregator", on_verdict=on_verdict
    )


SIMULATED_BANNER = (
    "!! SIMULATED TEE: {who} runs on the simulated SGX platform (development root, no "
    "hardware protection); never use this federation for real data !!"
)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value and math.isfinite(value) else "-"


def enum_name(value: int, enum: Any, prefix: str) -> str:
    """An hfl.v1 enum value as a short lower-case word (FEDERATION_STATE_DONE -> done)."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def format_status(
    s: aggregator_pb2.GetStatusResponse, last_rounds: int = 10, simulated: Sequence[str] = ()
) -> str:
    """The status as text; `simulated` names the parties whose verified evidence is
    simulated, shown in a banner first. (The aggregator's comes from its quote, which
    the caller verified; the trainers' from GetStatus, where the aggregator reports
    each trainer's verified evidence.)"""
    simulated = [*simulated, *(t.label or t.trainer_id for t in s.trainers if t.simulated)]
    state = enum_name(s.state, aggregator_pb2.FederationState, "FEDERATION_STATE_")
    mode = enum_name(s.mode, aggregator_pb2.AggregationMode, "AGGREGATION_MODE_")
    if s.mode == aggregator_pb2.AGGREGATION_MODE_ASYNC:
        mode += f" (buffer {s.buffer_size})"
    banner = [SIMULATED_BANNER.format(who=", ".join(simulated)), ""] if simulated else []
    lines = [
        *banner,
        f"federation {s.federation_id}: {state}, round {s.round}/{s.total_rounds}, "
        f"model version {s.model_version}",
        f"plan sha256 {s.plan_sha256}",
        f"model {s.model}, strategy {s.strategy}, mode {mode}",
    ]
    if s.failure:
        lines.append(f"failed: {s.failure}")
    if s.HasField("privacy"):
        lines.append(format_privacy(s.privacy))
    if s.stop_reason:
        lines.append(f"stopped: {s.stop_reason}")
    lines += ["", "trainers:"]
    for t in s.trainers:
        seen = t.last_seen.ToDatetime(dt.UTC)
        t_state = enum_name(t.state, aggregator_pb2.TrainerState, "TRAINER_STATE_")
        lines.append(
            f"  {t.label:<12} {t.trainer_id:<16} {t_state:<6} updates {t.updates_accepted} "
            f"(refused {t.updates_refused})  examples {t.num_examples}  "
            f"last seen {seen:%H:%M:%S}  MRENCLAVE {t.mrenclave[:16]}…"
            + ("  (simulated TEE)" if t.simulated else "")
        )
    shown = list(s.rounds)[-last_rounds:] if last_rounds > 0 else list(s.rounds)
    lines += ["", f"rounds (last {len(shown)} of {len(s.rounds)}):"]
    for r in shown:
        r_state = enum_name(r.state, aggregator_pb2.RoundState, "ROUND_STATE_")
        lines.append(
            f"  {r.round:>4} {r_state:<9} updates {r.updates}  train loss {_fmt(r.train_loss)}  "
            f"eval loss {_fmt(r.eval_loss)}  accuracy {_fmt(r.eval_accuracy)}"
            + (f"  epsilon {_fmt(r.dp_epsilon)}" if s.HasField("privacy") else "")
            + (f"  ({r.failure_message})" if r.failure_message else "")
        )
    return "\n".join(lines)


def format_privacy(p: aggregator_pb2.PrivacyStatus) -> str:
    """One line: the differential privacy spent so far, and the budget."""
    budget = f" of max {p.max_epsilon:g}" if p.max_epsilon > 0 else " (no budget)"
    return (
        f"privacy: {p.mode} DP, epsilon {p.epsilon:.4g}{budget} at delta {p.delta:.3g} "
        f"after {p.rounds_accounted} rounds (RDP {_fmt(p.epsilon_rdp)}, "
        f"PLD {_fmt(p.epsilon_pld)}; noise multiplier {p.noise_multiplier:.4g}, "
        f"clip norm {p.clip_norm:.4g})"
    )


def status_main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="hfl status", description="The aggregator's Status.")
    p.add_argument("--run", type=Path, help="a `hfl run` directory (default runs/latest)")
    p.add_argument("--aggregator", help="aggregator address (default: from --run)")
    p.add_argument("--operator-dir", type=Path, help="key.pem, cert.pem, ca.pem")
    p.add_argument("--policy", type=Path)
    p.add_argument("--sim-platform", type=Path)
    p.add_argument("--collateral-dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the Status message as JSON")
    p.add_argument("--rounds", type=int, default=10, help="rounds to list (0: all)")
    ns = p.parse_args(argv)
    run = ns.run or (Path("runs/latest") if not ns.aggregator else None)
    aggregator = ns.aggregator
    if run is not None:
        try:
            endpoints = json.loads((run / "endpoints.json").read_text())
        except OSError:
            raise ConfigError(
                f"{run} is not a running `hfl run` directory (no endpoints.json)"
            ) from None
        aggregator = aggregator or endpoints["aggregator"]["grpc"]
    operator_dir = ns.operator_dir or (run / "operator" if run else None)
    policy = ns.policy or (run / "policy.toml" if run else None)
    platform = ns.sim_platform or (run / "platform" if run else None)
    if operator_dir is None or policy is None or aggregator is None:
        raise ConfigError("give --run DIR, or --aggregator, --operator-dir and --policy")
    operator = load_operator_credentials(operator_dir, policy, platform, ns.collateral_dir)
    simulated: list[str] = []

    def note(verdict: Verdict) -> None:
        if verdict.simulated:
            simulated.append("the aggregator")

    channel = aggregator_channel(aggregator, operator, note)
    try:
        status = aggregator_pb2_grpc.AggregatorServiceStub(channel).GetStatus(
            aggregator_pb2.GetStatusRequest(), timeout=10
        )
    except grpc.RpcError as err:
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        raise UnavailableError(
            f"aggregator {aggregator} did not answer Status: {details}"
        ) from None
    finally:
        channel.close()
    if ns.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(status))
    else:
        print(format_status(status, ns.rounds, simulated))
    return 0


def operator_cert_main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="hfl operator-cert",
        description="Get a fresh operator certificate from the attestation service.",
    )
    p.add_argument("--operator-dir", type=Path, required=True, help="holds key.pem")
    p.add_argument("--attestation", required=True, help="attestation service address")
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--sim-platform", type=Path)
    p.add_argument("--collateral-dir", type=Path)
    ns = p.parse_args(argv)
    if not (ns.operator_dir / "key.pem").exists():
        ns.operator_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        fd = os.open(ns.operator_dir / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    creds = obtain_operator_certificate(
        ns.operator_dir, ns.attestation, ns.policy, ns.sim_platform, ns.collateral_dir
    )
    print(f"operator certificate written to {creds.directory / 'cert.pem'}")
    return 0
