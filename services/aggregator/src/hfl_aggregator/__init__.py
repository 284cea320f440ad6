"""hfl_aggregator."""
