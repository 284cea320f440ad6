"""hfl_attestation."""
