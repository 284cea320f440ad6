"""A federation project in the Gramine trainer enclave: its files are trusted (measured)."""

from __future__ import annotations

import tomllib

from tests.deploy.test_gramine_manifests import DEFINES, render_text


def test_project_dir_becomes_trusted_files_and_the_trainers_project_flag() -> None:
    with_project = tomllib.loads(
        render_text("trainer", {**DEFINES, "project_dir": "/opt/hfl/project/clinic"})
    )
    without = tomllib.loads(render_text("trainer"))

    assert "file:/opt/hfl/project/clinic/" in with_project["sgx"]["trusted_files"]
    mounts = {m["path"]: m.get("uri") for m in with_project["fs"]["mounts"]}
    assert mounts["/opt/hfl/project/clinic"] == "file:/opt/hfl/project/clinic"
    assert "/opt/hfl/project/clinic" not in {m["path"] for m in without["fs"]["mounts"]}
    argv = with_project["loader"]["argv"]
    assert argv[argv.index("--project") + 1] == "/opt/hfl/project/clinic"
    assert "--project" not in without["loader"]["argv"]
    assert not [f for f in without["sgx"]["trusted_files"] if "project" in f]
    # The final model goes home through /output, outside the sealed state.
    assert "file:/output/" in without["sgx"]["allowed_files"]
    assert argv[argv.index("--output-dir") + 1] == "/output"
