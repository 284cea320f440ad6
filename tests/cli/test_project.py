"""Federation projects from the command line: `hfl new`, `hfl run --project`, `hfl evaluate`,
and the project's code in the trainer's measured identity.

Real processes, the simulated TEE and mutual RA-TLS (tests/cli/clikit.py); the breast-cancer
example's hospital tables come from scikit-learn's bundled data.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from hfl_cli.local import PlanOptions
from hfl_cli.project import scaffold
from hfl_common.config import load_plan
from hfl_common.errors import ConfigError
from hfl_common.tee import SimulatedPlatform
from hfl_common.tee.identities import service_identity
from tests.cli import clikit

EXAMPLE = clikit.REPO / "examples" / "breast_cancer"


def copy_example(base: Path) -> Path:
    target = base / "breast_cancer"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def hospitals(project: Path, base: Path) -> dict[str, Path]:
    sys.path.insert(0, str(project.parent))
    try:
        from breast_cancer.make_hospitals import write  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(project.parent))
    return write(base)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- hfl new


def test_new_writes_a_project_named_like_its_directory(tmp_path: Path) -> None:
    written = scaffold(tmp_path / "clinic")

    assert sorted(p.name for p in written) == [
        "README.md", "__init__.py", "data.py", "model.py", "plan.toml",
    ]  # fmt: skip
    plan = (tmp_path / "clinic" / "plan.toml").read_text()
    assert 'entry = "clinic.model:build"' in plan
    assert 'entry = "clinic.data:load"' in plan


def test_new_refuses_a_directory_name_that_is_no_package_name(tmp_path: Path) -> None:
    result = clikit.run_hfl("new", str(tmp_path / "my-clinic"))

    assert result.returncode == 2
    assert clikit.one_error_line(result) == (
        f"error: {tmp_path / 'my-clinic'}: a project's directory name is its Python package "
        "name; 'my-clinic' is not an identifier (try 'my_clinic')"
    )
    assert not (tmp_path / "my-clinic").exists()


def test_new_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "clinic").mkdir()
    (tmp_path / "clinic" / "notes.txt").write_text("mine")

    with pytest.raises(ConfigError, match="already exists and is not empty"):
        scaffold(tmp_path / "clinic")
    assert (tmp_path / "clinic" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- identity


def test_project_files_are_part_of_the_trainer_identity_wherever_they_lie(
    tmp_path: Path,
) -> None:
    platform = SimulatedPlatform.load_or_create(tmp_path / "platform")
    project = scaffold(tmp_path / "a" / "clinic")[0].parent
    moved = tmp_path / "b" / "clinic"
    shutil.copytree(project, moved)
    edited = tmp_path / "c" / "clinic"
    shutil.copytree(project, edited)
    model_py = edited / "model.py"
    model_py.write_text(model_py.read_text().replace("hidden=32", "hidden=33"))

    plain = service_identity("trainer", platform).mrenclave
    with_project = service_identity("trainer", platform, project=project).mrenclave

    assert with_project != plain
    assert service_identity("trainer", platform, project=moved).mrenclave == with_project
    assert service_identity("trainer", platform, project=edited).mrenclave != with_project
    # Byte-code caches are not the project's code.
    (project / "__pycache__").mkdir()
    (project / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"cache")
    assert service_identity("trainer", platform, project=project).mrenclave == with_project


@pytest.mark.slow
def test_editing_one_line_of_model_py_gets_the_trainer_refused(tmp_path: Path) -> None:
    project = scaffold(tmp_path / "agreed" / "clinic")[0].parent
    moved = tmp_path / "elsewhere" / "clinic"
    shutil.copytree(project, moved)
    edited = tmp_path / "edited" / "clinic"
    shutil.copytree(project, edited)
    model_py = edited / "model.py"
    model_py.write_text(model_py.read_text().replace("hidden=32", "hidden=33"))

    with clikit.LocalFederation.start(
        tmp_path / "fed", PlanOptions(trainers=2, rounds=1, project=project)
    ) as fed:
        # The agreed code, kept at another path by another party: admitted.
        fed.start_trainer(0, num_partitions=2, extra=["--project", str(moved)])
        # One line changed: its identity is not the one the policy names.
        result = clikit.run_hfl(
            "trainer", *fed.trainer_args(1, extra=["--project", str(edited)]), timeout=300
        )

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert "certificate for role trainer refused" in line, line
    assert "is not one the policy accepts for role trainer" in line, line


# ----------------------------------------------------------------------------- runs


def test_run_with_a_data_function_that_raises_stops_before_any_service(tmp_path: Path) -> None:
    project = scaffold(tmp_path / "clinic")[0].parent
    (project / "data.py").write_text(
        "def load(data_dir, **params):\n    raise FileNotFoundError('records.csv is not here')\n"
    )
    workdir = tmp_path / "run"

    result = clikit.run_hfl("run", "--project", str(project), "--workdir", str(workdir),
                            timeout=300)  # fmt: skip

    assert result.returncode == 2
    assert clikit.one_error_line(result) == (
        f"error: {project / 'data.py'}: clinic.data:load raised FileNotFoundError: records.csv "
        "is not here; fix the function or its parameters in [data.params]"
    )
    assert not (workdir / "logs").exists()  # no service was started


def test_run_with_a_hospital_table_missing_the_label_column_names_it(tmp_path: Path) -> None:
    project = copy_example(tmp_path)
    dirs = hospitals(project, tmp_path / "data")
    table = dirs["hospital_b"] / "records.csv"
    table.write_text(table.read_text().replace(",diagnosis\n", ",outcome\n", 1))

    result = clikit.run_hfl(
        "run", "--project", str(project), "--workdir", str(tmp_path / "run"),
        "--party-data", str(dirs["hospital_a"]), "--party-data", str(dirs["hospital_b"]),
        timeout=300,
    )  # fmt: skip

    assert result.returncode == 2
    line = clikit.one_error_line(result)
    assert line.startswith(
        f"error: {table}: no label column 'diagnosis' (the plan's [data.params] label); its "
        "columns are mean_radius,"
    ), line


@pytest.mark.slow
def test_hospitals_federate_and_take_the_model_home(tmp_path: Path) -> None:
    project = copy_example(tmp_path)
    dirs = hospitals(project, tmp_path / "data")
    workdir = tmp_path / "run"

    result = clikit.run_hfl(
        "run", "--project", str(project), "--workdir", str(workdir), "--rounds", "3",
        "--party-data", str(dirs["hospital_a"]), "--party-data", str(dirs["hospital_b"]),
        "--party-data", str(dirs["hospital_c"]), "--expect-accuracy", "0.8",
        timeout=600,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 trainers; breast_cancer.model:build on breast_cancer.data:load" in result.stdout
    plan = load_plan(workdir / "plan.toml")
    digests = set()
    for name in ("trainer-1", "trainer-2", "trainer-3"):
        provenance = json.loads((workdir / "models" / name / "provenance.json").read_text())
        assert provenance["plan"]["sha256"] == plan.sha256_hex
        assert provenance["rounds_completed"] == 3
        assert len(provenance["aggregator_mrenclave"]) == 64
        assert provenance["trainer"] == name
        digests.add(provenance["weights_sha256"])
    assert len(digests) == 1  # every hospital took home the same global model

    evaluated = clikit.run_hfl(
        "evaluate", str(workdir / "models" / "trainer-2"), "--project", str(project),
        "--data-dir", str(dirs["held_out"]), "--split", "all", "--json", timeout=300,
    )  # fmt: skip

    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert scores["examples"] == 114
    assert scores["accuracy"] >= 0.8  # a broken pipeline scores about 0.37 or 0.63 here
    assert scores["weights_sha256"] in digests

    # Each export is signed by its trainer's enclave key under the federation CA, and
    # the signer's quote verifies under the agreed policy: the trainer's MRENCLAVE (hfl's
    # code and the project's) is the one the policy names.
    verified = clikit.run_hfl(
        "verify-export", str(workdir / "models" / "trainer-3"),
        "--ca", str(workdir / "state" / "attestation" / "ca_cert.pem"),
        "--plan", str(workdir / "plan.toml"), "--policy", str(workdir / "policy.toml"),
        "--sim-platform", str(workdir / "platform"), timeout=120,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["trainer"] == "trainer-3"
    assert report["plan_sha256"] == plan.sha256_hex
    platform = SimulatedPlatform.load(workdir / "platform", refresh_collateral=False)
    assert (
        report["trainer_mrenclave"]
        == service_identity("trainer", platform, project=project).mrenclave.hex()
    )
    assert clikit.processes_mentioning(str(workdir)) == []
