"""Does the sim-platform volume's policy name this image's code? (`make up`, before starting).

Run by the compose `sim-bootstrap` service (hfl-tools image, where it is
/opt/hfl/libexec/check_sim_volume.py) after `hfl init /sim`. The simulated
MRENCLAVE of each service is the hash of its installed code
(hfl_common.tee.identities), the same code the service images hold; a policy
written by `hfl init` of an older hfl names other values, and every service
would then be refused at attestation. Exit 0 when every role's identity is in
the policy, 1 with one line starting "STALE VOLUME:" that names the first
mismatch (deploy/compose.sh looks for it and says what to do).
"""

import sys
from pathlib import Path

from hfl_common.config import load_policy
from hfl_common.tee import SimulatedPlatform
from hfl_common.tee.identities import SERVICE_PACKAGES, service_identity

SIM = Path("/sim")

try:
    policy = load_policy(SIM / "policy.toml")
    platform = SimulatedPlatform.load(SIM / "platform", refresh_collateral=False)
except Exception as exc:  # any failure means the volume is unusable
    print(f"STALE VOLUME: cannot read {SIM}: {exc}")
    sys.exit(1)
for role in SERVICE_PACKAGES:
    expected = policy.roles.get(role)
    mrenclave = service_identity(role, platform).mrenclave
    if expected is None or (expected.mrenclave and mrenclave not in expected.mrenclave):
        print(
            f"STALE VOLUME: {SIM}/policy.toml was written for another hfl version: it does "
            f"not list this {role} code (MRENCLAVE {mrenclave.hex()[:16]}...)"
        )
        sys.exit(1)
