"""A trainer process for the chaos tests: attest, join, start an upload and stall in it.

`python -m tests.chaos.uploader FILES_DIR ATTESTATION AGGREGATOR PLAN LABEL` prints
"MIDWAY" once part of its update is on the wire, then waits inside the upload stream (the
test SIGKILLs it there).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hfl_common.api import aggregator_pb2
from tests import fedkit


def files_in(directory: Path) -> fedkit.FederationFiles:
    weights_path = directory / "initial_weights.npz"
    with np.load(weights_path, allow_pickle=False) as npz:
        weights = {k: npz[k] for k in npz.files}
    return fedkit.FederationFiles(
        directory=directory,
        platform_dir=directory / "platform",
        policy=directory / "policy.toml",
        operator_dir=directory / "operator",
        initial_weights=weights_path,
        initial_weights_sha256=hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        weights=weights,
    )


def main(argv: list[str]) -> int:
    directory, attestation, aggregator, plan, label = argv
    files = files_in(Path(directory))
    trainer = fedkit.TestTrainer.attest(files, attestation, label=label, num_examples=50)
    trainer.connect(aggregator, Path(plan)).join()
    task = trainer.wait_for_task(aggregator_pb2.TASK_KIND_TRAIN, timeout=60)
    header = trainer.update_header(task)
    update = fedkit.constant_update(files.weights, 0.75)
    messages = fedkit.update_messages(header, update, chunk_bytes=16)

    def stalled() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
        for index, message in enumerate(messages):
            yield message
            if index == len(messages) // 2:
                print("MIDWAY", flush=True)
                time.sleep(600)

    trainer.stub.UploadUpdate(stalled(), timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
