"""hfl_trainer."""
