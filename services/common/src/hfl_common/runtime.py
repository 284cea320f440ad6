"""What every service's main() does the same way: flags, the TEE, attested credentials.

A service main builds, in order: its flags (each also read from HFL_<FLAG>),
logging, the policy, an `Enclave` (evidence provider, sealing keys and quote
verifier for the chosen TEE), then its attested credentials from the
attestation service (verified and pinned first), then its gRPC server. Errors
a user can cause end as one line on stderr and exit code 2 (`run_main`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from hfl_common.attest_client import (
    IssuedCertificate,
    PeerVerifier,
    PinnedAttestationService,
    Renewer,
    ServiceCredentials,
    bootstrap_attestation_service,
    obtain_certificate,
)
from hfl_common.config import AttestationPolicy, TrustRoot, load_policy
from hfl_common.enrolment import PartySigner, public_key_text
from hfl_common.errors import ConfigError, HflError
from hfl_common.freshness import MEMORY_FILE, GenerationMemory
from hfl_common.metrics import register_tee_simulated
from hfl_common.ratls import EnclaveKey
from hfl_common.sealing import GramineSealingKeys, SealingKeySource, SimulatedSealingKeys
from hfl_common.tee import (
    CachedCollateral,
    CollateralSource,
    DirectoryCollateral,
    EnclaveIdentity,
    EvidenceProvider,
    GramineProvider,
    PccsCollateral,
    QuoteVerifier,
    SimulatedPlatform,
    SimulatedProvider,
)
from hfl_common.tee.identities import service_identity
from hfl_common.tee.simulation import check_no_code_injection

log = logging.getLogger(__name__)

_SEALING_SECRET = "sealing_secret"  # noqa: S105 (a file name, not a secret)


def _set_default(action: argparse.Action, value: object, source: str) -> None:
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(value, str):
            words = {"1": True, "true": True, "yes": True, "on": True}
            words |= {"0": False, "false": False, "no": False, "off": False, "": False}
            value = words.get(value.lower(), value)
        if not isinstance(value, bool):
            raise ConfigError(f"{source} must be true or false, got {value!r}")
        action.default = value
    else:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{source} must be a string or a number, got {value!r}")
        try:
            action.default = action.type(str(value)) if callable(action.type) else str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {value!r} is not a valid value") from None
        if action.choices is not None and action.default not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ConfigError(f"{source} must be one of {choices}; got {value!r}")
    action.required = False


def parse_service_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, prefix: str = "HFL_"
) -> argparse.Namespace:
    """Flags, then the environment (HFL_<FLAG>), then a TOML config file (--config or
    HFL_CONFIG, keys named like the flags: `listen = "0.0.0.0:7401"`), then defaults."""
    actions = {
        a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")
    }
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=os.environ.get(prefix + "CONFIG"))
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        try:
            table = tomllib.loads(Path(known.config).read_text())
        except OSError as exc:
            raise ConfigError(
                f"cannot read the config file {known.config}: {exc.strerror}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{known.config}: not valid TOML: {exc}") from None
        for key, value in table.items():
            action = actions.get(key.replace("-", "_"))
            if action is None:
                raise ConfigError(
                    f"{known.config}: {key} is not a setting of {parser.prog}; "
                    f"settings: {', '.join(sorted(actions))}"
                )
            _set_default(action, value, f"{known.config}: {key}")
    for dest, action in actions.items():
        env = os.environ.get(prefix + dest.upper())
        if env is not None:
            _set_default(action, env, f"environment variable {prefix}{dest.upper()}")
    return parser.parse_args(argv)


def add_enclave_flags(parser: argparse.ArgumentParser, *, listen: str, metrics_listen: str) -> None:
    g = parser.add_argument_group("service")
    g.add_argument(
        "--config", type=Path, help="TOML file of settings named like these flags (HFL_CONFIG)"
    )
    g.add_argument("--listen", default=listen, help=f"gRPC address (default {listen})")
    g.add_argument(
        "--metrics-listen",
        default=metrics_listen,
        help=f"Prometheus /metrics and /readyz HTTP address (default {metrics_listen})",
    )
    g.add_argument("--state-dir", type=Path, default=Path("state"), help="sealed state")
    g.add_argument("--port-file", type=Path, help="write the bound ports here as JSON once serving")
    g.add_argument("--log-level", default="INFO")
    g.add_argument("--log-json", action="store_true", help="JSON log lines even on a terminal")
    t = parser.add_argument_group("attestation")
    t.add_argument("--policy", type=Path, required=True, help="the agreed policy (TOML)")
    t.add_argument("--tee", choices=("gramine", "simulated"), default="gramine")
    t.add_argument("--sim-platform", type=Path, help="simulated platform directory")
    t.add_argument("--collateral-dir", type=Path, help="offline collateral directory")
    t.add_argument("--pccs-url", help="PCCS to fetch collateral from")
    t.add_argument("--isv-svn", type=int, default=1, help="simulated ISV_SVN (default 1)")
    t.add_argument("--party", help="trainers: the enrolled party (organisation) it belongs to")
    t.add_argument(
        "--party-key",
        type=Path,
        help="trainers: the party's private enrolment key (PEM), which enrols this "
        "enclave's key (docs/security.md, 'Parties')",
    )


@dataclass(frozen=True)
class EnclaveOptions:
    role: str
    tee: str
    policy_path: Path
    sim_platform: Path | None
    collateral_dir: Path | None
    pccs_url: str | None
    isv_svn: int
    state_dir: Path
    party: str | None = None
    party_key: Path | None = None
    # A trainer's federation project, measured into its identity (hfl_trainer --project).
    project: Path | None = None

    @classmethod
    def from_args(cls, role: str, ns: argparse.Namespace) -> EnclaveOptions:
        return cls(
            role=role,
            tee=ns.tee,
            policy_path=ns.policy,
            sim_platform=ns.sim_platform,
            collateral_dir=ns.collateral_dir,
            pccs_url=ns.pccs_url,
            isv_svn=ns.isv_svn,
            state_dir=ns.state_dir,
            party=getattr(ns, "party", None),
            party_key=getattr(ns, "party_key", None),
            project=getattr(ns, "project", None),
        )


def simulated_sealing_secret(platform_dir: Path) -> bytes:
    """The simulated platform's stand-in for the CPU's sealing fuse key (made once)."""
    path = platform_dir / _SEALING_SECRET
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    return path.read_bytes()


@dataclass
class Enclave:
    """This process's TEE: how it quotes, seals and verifies others."""

    role: str
    policy: AttestationPolicy
    provider: EvidenceProvider
    sealing: SealingKeySource
    verifier: QuoteVerifier
    identity: EnclaveIdentity | None
    party: PartySigner | None = None
    state_dir: Path | None = None

    @classmethod
    def open(cls, opts: EnclaveOptions, registry: CollectorRegistry | None) -> Enclave:
        policy = load_policy(opts.policy_path)
        collateral: CollateralSource
        if opts.collateral_dir is not None:
            collateral = DirectoryCollateral(opts.collateral_dir)
        elif opts.pccs_url:
            collateral = PccsCollateral(opts.pccs_url)
        elif opts.tee == "simulated" and opts.sim_platform is not None:
            collateral = DirectoryCollateral(opts.sim_platform / "collateral")
        else:
            raise ConfigError("give --collateral-dir or --pccs-url so quotes can be verified")
        sim_root: bytes | None = None
        identity: EnclaveIdentity | None = None
        provider: EvidenceProvider
        sealing: SealingKeySource
        if opts.tee == "simulated":
            if policy.trust_root is TrustRoot.INTEL:
                raise ConfigError(
                    f"--tee simulated refused: {opts.policy_path} trusts Intel's root "
                    '(root = "intel"), a production policy, and a simulated enclave protects '
                    "nothing; use real SGX (--tee gramine) or a simulation policy"
                )
            if opts.sim_platform is None:
                raise ConfigError("--tee simulated needs --sim-platform DIR")
            check_no_code_injection()
            platform = SimulatedPlatform.load(opts.sim_platform)
            identity = service_identity(opts.role, platform, opts.isv_svn, opts.project)
            provider = SimulatedProvider(platform, identity)
            sealing = SimulatedSealingKeys(
                simulated_sealing_secret(opts.sim_platform), identity.mrenclave
            )
            sim_root = platform.root_der
        else:
            provider = GramineProvider()
            sealing = GramineSealingKeys()
            if policy.trust_root is TrustRoot.SIMULATION:
                raise ConfigError(
                    f"{opts.policy_path}: trusts the simulation root, but --tee gramine runs "
                    'on real SGX; use a policy with root = "intel"'
                )
        if registry is not None:
            register_tee_simulated(registry, opts.tee == "simulated")
        verifier = QuoteVerifier(
            policy,
            CachedCollateral(collateral, registry=registry),
            simulation_root_der=sim_root,
            registry=registry,
        )
        if identity is not None:
            log.warning(
                "SIMULATED %s enclave (no hardware protection; hfl_tee_simulated 1): "
                "MRENCLAVE %s, MRSIGNER %s",
                opts.role,
                identity.mrenclave.hex(),
                identity.mrsigner.hex(),
            )
        party: PartySigner | None = None
        if (opts.party is None) != (opts.party_key is None):
            raise ConfigError("--party and --party-key go together: the name and its key")
        if opts.party is not None and opts.party_key is not None:
            if opts.role != "trainer":
                raise ConfigError(f"--party is for trainers; a {opts.role} belongs to no party")
            if opts.party not in policy.parties:
                enrolled = ", ".join(sorted(policy.parties)) or "none"
                raise ConfigError(
                    f"--party {opts.party} is not enrolled in {opts.policy_path} "
                    f"(enrolled parties: {enrolled})"
                )
            party = PartySigner.load(opts.party, opts.party_key)
            listed = public_key_text(policy.parties[opts.party].public_key)
            if public_key_text(party.key) != listed:
                raise ConfigError(
                    f"--party-key {opts.party_key} is not party {opts.party}'s key in "
                    f"{opts.policy_path}"
                )
        elif opts.role == "trainer" and policy.parties:
            raise ConfigError(
                f"{opts.policy_path} enrols parties ({', '.join(sorted(policy.parties))}); "
                "a trainer needs --party NAME and --party-key FILE"
            )
        return cls(opts.role, policy, provider, sealing, verifier, identity, party, opts.state_dir)

    def attest(
        self, attestation_target: str, label: str, user_data: bytes = b""
    ) -> tuple[ServiceCredentials, Renewer, PinnedAttestationService]:
        """Verify and pin the attestation service, then get our certificate from it; the
        attestation state generation seen is remembered in the state dir (freshness)."""
        memory = None
        if self.state_dir is not None:
            memory = GenerationMemory(self.state_dir / MEMORY_FILE)
        pinned = bootstrap_attestation_service(attestation_target, self.verifier, memory=memory)
        key = EnclaveKey.generate()

        def issue() -> IssuedCertificate:
            # Fresh evidence every time: renewal re-attests this enclave.
            return obtain_certificate(
                pinned, key, self.provider, self.role, label, user_data, party=self.party
            )

        credentials = ServiceCredentials(key, issue())
        renewer = Renewer(credentials, issue).start()
        return credentials, renewer, pinned

    def peer_verifier(self) -> PeerVerifier:
        return PeerVerifier(self.verifier)


def write_port_file(path: Path | None, grpc_port: int, metrics_port: int) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"grpc": grpc_port, "metrics": metrics_port}))
    tmp.replace(path)


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen address {value!r} must look like HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (explicit listen address)


def run_main(body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Run a main body; a user-facing error becomes one line on stderr and exit code 2."""
    try:
        return body(argv)
    except HflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
