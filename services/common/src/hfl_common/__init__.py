"""hfl_common."""
