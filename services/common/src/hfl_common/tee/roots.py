"""Intel's SGX attestation root: what every genuine PCK chain and collateral chains to.

INTEL_SGX_ROOT_CA_PEM is the self-signed "Intel SGX Root CA" (ECDSA P-256,
valid 2018-05-21 to 2049-12-31), the certificate Intel publishes at
https://certificates.trustedservices.intel.com/IntelSGXRootCA.der and that
ends the issuer chains of Intel's PCS collateral. It is copied from the issuer
chain of the real collateral in tests/data/dcap/sgx_quote_collateral.json; a
test checks the two still agree. Public data, not a secret.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

INTEL_SGX_ROOT_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""

INTEL_SGX_ROOT_CA_DER: bytes = x509.load_pem_x509_certificate(
    INTEL_SGX_ROOT_CA_PEM.encode()
).public_bytes(serialization.Encoding.DER)

# SHA-256 of the DER above, hex: 44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3
INTEL_SGX_ROOT_CA_SHA256: bytes = hashlib.sha256(INTEL_SGX_ROOT_CA_DER).digest()
