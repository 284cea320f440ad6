"""The fault and attack suite (`make chaos`): real servers, real TLS, attacks of issue 11.

Fixtures of the attestation tests are reused (a simulated SGX platform, the policy, an
in-process attestation service), plus a small test CA for an in-process hfl server and a
TCP proxy the test controls.
"""

from __future__ import annotations

from tests.attestation.conftest import (  # noqa: F401 (fixtures)
    identities,
    make_verifier,
    operator_key,
    platform,
    policy,
    provider_for,
    start_service,
)
