"""Latency of attestation: certificate issuance and peer re-verification, against dcap-qvl.

Starts an attestation service in-process (simulated TEE, TLS on 127.0.0.1), then times,
over --n repetitions each:

- bare:   one `dcap_qvl.verify_with_root_ca` call on a simulated quote (collateral parsed
          once beforehand): the floor every attested operation pays;
- verify: `QuoteVerifier.verify_quote` (parse, collateral from disk, dcap-qvl, policy);
- peer:   `PeerVerifier.verify_peer` on a fresh federation certificate (cold cache: the
          certificate is new each time), what a server does on a peer's first call;
- peer-warm: the same certificate again (cached verdict);
- issue:  `obtain_certificate` end to end over gRPC/TLS: new quote, CSR, the service's
          verification and signing, the response checks.

and prints the median and p90 in milliseconds and each one's ratio to the bare call.

    .venv/bin/python benchmarks/bench_attestation.py            # 50 repetitions
    .venv/bin/python benchmarks/bench_attestation.py --n 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dcap_qvl
from prometheus_client import CollectorRegistry

from hfl_attestation.service import AttestationServiceConfig, start_attestation_service
from hfl_common.attest_client import (
    PeerVerifier,
    bootstrap_attestation_service,
    obtain_certificate,
)
from hfl_common.config import AttestationPolicy, parse_policy
from hfl_common.ratls import EnclaveKey
from hfl_common.runtime import simulated_sealing_secret
from hfl_common.sealing import SimulatedSealingKeys
from hfl_common.server import PeerIdentity, ServerConfig
from hfl_common.tee import (
    DirectoryCollateral,
    EnclaveIdentity,
    QuoteVerifier,
    SimulatedPlatform,
    SimulatedProvider,
)


def _policy(platform: SimulatedPlatform, ids: dict[str, EnclaveIdentity]) -> AttestationPolicy:
    text = (
        f'[trust]\nroot = "simulation"\nsimulation_root_sha256 = "{platform.root_sha256.hex()}"\n'
    )
    for role, identity in ids.items():
        text += (
            f"[roles.{role}]\n"
            f'mrenclave = ["{identity.mrenclave.hex()}"]\n'
            f"isv_prod_id = {identity.isv_prod_id}\n"
        )
    return parse_policy(text, "bench-policy")


def _time(fn: Callable[[], object], n: int) -> list[float]:
    fn()  # warm-up
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="repetitions per measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        platform = SimulatedPlatform.create(Path(tmp) / "platform")
        ids = {
            role: EnclaveIdentity(bytes([prod]) * 32, platform.mrsigner, prod, 1)
            for role, prod in (("attestation", 1), ("aggregator", 2), ("trainer", 3))
        }
        policy = _policy(platform, ids)

        def verifier(registry: CollectorRegistry) -> QuoteVerifier:
            return QuoteVerifier(
                policy,
                DirectoryCollateral(platform.collateral_dir),
                simulation_root_der=platform.root_der,
                registry=registry,
            )

        registry = CollectorRegistry()
        service = start_attestation_service(
            AttestationServiceConfig(
                server=ServerConfig(service="attestation", require_client_auth=False),
                state_dir=Path(tmp) / "state",
            ),
            policy=policy,
            verifier=verifier(registry),
            provider=SimulatedProvider(platform, ids["attestation"]),
            sealing=SimulatedSealingKeys(
                simulated_sealing_secret(platform.directory), ids["attestation"].mrenclave
            ),
            registry=registry,
        )
        try:
            client_verifier = verifier(CollectorRegistry())
            pinned = bootstrap_attestation_service(f"127.0.0.1:{service.port}", client_verifier)
            trainer = SimulatedProvider(platform, ids["trainer"])
            quote = trainer.quote(bytes(64))
            collateral = dcap_qvl.QuoteCollateralV3.from_json(platform.collateral_path.read_text())
            now = int(time.time())
            root = platform.root_der

            # fresh certificates for the cold-cache peer verification, made beforehand
            certs = [
                obtain_certificate(pinned, EnclaveKey.generate(), trainer, "trainer").cert_pem
                for _ in range(args.n + 1)
            ]
            cold = iter(certs)
            peers = PeerVerifier(verifier(CollectorRegistry()))
            warm_peer = PeerIdentity.from_pem(certs[0])
            peers.verify_peer(warm_peer)

            results = {
                "bare dcap-qvl": _time(
                    lambda: dcap_qvl.verify_with_root_ca(quote, collateral, root, now), args.n
                ),
                "verify_quote": _time(
                    lambda: client_verifier.verify_quote(quote, "trainer"), args.n
                ),
                "peer (cold)": _time(
                    lambda: PeerVerifier(client_verifier).verify_peer(
                        PeerIdentity.from_pem(next(cold))
                    ),
                    args.n - 1,
                ),
                "peer (cached)": _time(lambda: peers.verify_peer(warm_peer), args.n),
                "issue over gRPC": _time(
                    lambda: obtain_certificate(pinned, EnclaveKey.generate(), trainer, "trainer"),
                    args.n,
                ),
            }
            pinned.close()
        finally:
            service.stop(0)

    base = statistics.median(results["bare dcap-qvl"])
    print(f"{'operation':<18} {'median ms':>10} {'p90 ms':>10} {'x bare':>8}   (n={args.n})")
    for name, samples in results.items():
        med = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        print(f"{name:<18} {med * 1e3:>10.3f} {p90 * 1e3:>10.3f} {med / base:>8.2f}")


if __name__ == "__main__":
    main()
