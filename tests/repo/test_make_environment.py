"""What the Makefile exports never configures a service by accident.

Services read any flag from its HFL_<FLAG> environment variable (hfl_common.runtime),
and `make test` / `make up` export the deployment's variables to everything they run:
a name both use (HFL_PROJECT was once the compose project and the trainer's --project)
turns a deployment setting into a service setting.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hfl_aggregator.main import parser as aggregator_parser
from hfl_attestation.main import parser as attestation_parser
from hfl_trainer.main import parser as trainer_parser

ROOT = Path(__file__).resolve().parents[2]


def _exported(makefile: Path) -> set[str]:
    names: set[str] = set()
    for line in makefile.read_text().splitlines():
        if line.startswith("export "):
            names.update(line.split()[1:])
    return names


def _service_variables(p: argparse.ArgumentParser) -> set[str]:
    return {
        "HFL_" + re.sub(r"[^A-Z0-9]", "_", option.lstrip("-").upper())
        for action in p._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def test_no_exported_make_variable_is_a_service_setting() -> None:
    exported = set()
    for mk in [ROOT / "Makefile", *ROOT.glob("*/*.mk")]:
        exported |= _exported(mk)
    assert "HFL_COMPOSE_PROJECT" in exported  # the check reads the real export lines
    for p in (attestation_parser(), aggregator_parser(), trainer_parser()):
        clash = exported & _service_variables(p)
        assert not clash, f"{p.prog}: make exports {sorted(clash)}, which the service reads"
