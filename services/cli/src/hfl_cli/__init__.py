"""hfl_cli."""
