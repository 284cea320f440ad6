"""The trained model goes home: the final global model as a Keras file plus its provenance.

When the federation is done, a trainer that the plan's ``[export] receivers``
names downloads the final global model (before it leaves, while its session still
holds) and writes, into its output directory:

``model.keras``
    the plan's model with the final weights, loadable with ``keras.saving.load_model``
    (a project's model needs the project importable: ``hfl evaluate --project DIR``
    or :func:`load_exported` do that);
``provenance.json``
    what the model is and where it came from: the plan's SHA-256, name and entry
    points with their parameters, the rounds completed, the model version, the
    aggregator's MRENCLAVE as this trainer verified it in its quote, this trainer's
    evaluation of the final model on its held-out data, and the SHA-256 of the
    weights (of their canonical ``.npz``, :func:`hfl_trainer.models.weights_npz_bytes`)
    and of ``model.keras``; and ``privacy``: the differential privacy the model was
    trained under (:func:`privacy_provenance`).

Where epsilon comes from: under central DP (and client-side DP in synchronous
mode) the attested aggregator keeps the ledger (dp-accounting) and sends what the
final model spent in its DONE task (``Task.privacy``); the trainer verified that
aggregator's quote, plan hash included, on every connection, so the figure comes
from code every party agreed to. Trainers hold no operator rights, so they do not
call GetStatus. Under client-side DP in asynchronous mode no aggregator ledger
exists (refused there: a trainer may send several updates per buffer); the
provenance then states this trainer's own guarantee for the noised updates it sent.

With a signer (every trainer that attested: hfl_trainer.main passes its enclave key
and federation certificate) the directory also gets ``export-manifest.json``,
``export-manifest.sig`` and ``signer.pem`` (hfl_common.export_signature): the hashes of
both files signed by the trainer's enclave key, which ``hfl verify-export`` checks.

Files are written to a temporary name and renamed, so a reader never sees half a model.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from hfl_common.api import aggregator_pb2
from hfl_common.config import FederationPlan
from hfl_common.export_signature import ExportSigner, sign_export
from hfl_trainer.models import set_weights, weights_npz_bytes
from hfl_trainer.privacy import local_epsilon
from hfl_trainer.training import EvalResult

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = "hfl-model-provenance/1"


@dataclass(frozen=True)
class Exported:
    model: Path
    provenance: Path
    weights_sha256: str
    # export-manifest.json, when a signer signed the export
    manifest: Path | None = None


def weights_sha256(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the weights' canonical .npz (same weights, same digest)."""
    return hashlib.sha256(weights_npz_bytes(weights)).hexdigest()


def export_model(
    output_dir: Path,
    model: keras.Model,
    weights: Mapping[str, np.ndarray],
    *,
    plan: FederationPlan,
    label: str,
    rounds_completed: int,
    model_version: int,
    aggregator_mrenclave: str,
    evaluation: EvalResult | None,
    privacy: Mapping[str, Any] | None = None,
    signer: ExportSigner | None = None,
) -> Exported:
    """Write ``model.keras`` and ``provenance.json`` into ``output_dir``; with `signer`,
    their manifest signed by the trainer's enclave key (hfl_common.export_signature)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    set_weights(model, weights)
    digest = weights_sha256(weights)
    model_path = output_dir / MODEL_FILE
    tmp_model = output_dir / f".{MODEL_FILE}.tmp.keras"
    model.save(tmp_model)
    keras_sha = hashlib.sha256(tmp_model.read_bytes()).hexdigest()
    os.replace(tmp_model, model_path)
    provenance: dict[str, Any] = {
        "format": PROVENANCE_FORMAT,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "trainer": label,
        "plan": {
            "name": plan.name,
            "sha256": plan.sha256_hex,
            "model": {
                "entry": plan.model.entry,
                "params": dict(plan.model.params),
                "input_shape": list(plan.model.input_shape),
                "num_classes": plan.model.num_classes,
                "initial_weights_sha256": plan.model.initial_weights_sha256,
            },
            "data": {"entry": plan.data.entry, "params": dict(plan.data.params)},
            "strategy": plan.strategy.name,
            "rounds_planned": plan.rounds,
        },
        "rounds_completed": rounds_completed,
        "model_version": model_version,
        "aggregator_mrenclave": aggregator_mrenclave,
        "final_metrics": (
            {
                "scope": "this trainer's held-out data",
                "loss": evaluation.loss,
                "accuracy": evaluation.accuracy,
                "examples": evaluation.num_examples,
            }
            if evaluation is not None
            else None
        ),
        "weights_sha256": digest,
        "model_file": MODEL_FILE,
        "model_file_sha256": keras_sha,
        "privacy": dict(privacy) if privacy is not None else {"mode": plan.privacy.mode},
    }
    provenance_path = output_dir / PROVENANCE_FILE
    tmp = output_dir / f".{PROVENANCE_FILE}.tmp"
    tmp.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, provenance_path)
    manifest = None
    if signer is not None:
        manifest = sign_export(
            output_dir,
            [MODEL_FILE, PROVENANCE_FILE],
            signer,
            plan_sha256=plan.sha256_hex,
            model_version=model_version,
            rounds_completed=rounds_completed,
            trainer=label,
            aggregator_mrenclave=aggregator_mrenclave,
        )
    log.info(
        "final model (version %d, %d rounds) written to %s; weights sha256 %s",
        model_version,
        rounds_completed,
        model_path,
        digest,
    )
    return Exported(model_path, provenance_path, digest, manifest)


def load_exported(path: Path, project: Path | None = None) -> keras.Model:
    """Load an exported ``model.keras`` (or the directory holding it).

    A project's model may use the project's own layers: give its directory, which is
    made importable first. Only Keras and the project's code are needed.
    """
    from hfl_common.errors import InvalidArgumentError

    if project is not None:
        from hfl_trainer.project import use_project

        use_project(project)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise InvalidArgumentError(f"{file}: no exported model here (expected {MODEL_FILE})")
    try:
        model: keras.Model = keras.saving.load_model(file, compile=False)
    except (ValueError, TypeError, OSError) as exc:
        hint = "" if project else "; if it is a project's model, give --project DIR"
        raise InvalidArgumentError(
            f"{file}: cannot load the model ({' '.join(str(exc).split())[:300]}){hint}"
        ) from None
    return model


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def privacy_provenance(
    plan: FederationPlan,
    final: aggregator_pb2.PrivacyStatus | None,
    own_releases: int = 0,
) -> dict[str, Any]:
    """The ``privacy`` entry of provenance.json.

    `final` is the PrivacyStatus of the aggregator's DONE task (None when it sent
    none); `own_releases` the noised updates this trainer sent (client-side DP).
    Without DP: ``{"mode": "none"}``. Epsilon is null where it cannot be stated.
    """
    p = plan.privacy
    if p.mode == "none":
        return {"mode": "none"}
    out: dict[str, Any] = {
        "mode": p.mode,
        "delta": p.delta,
        "max_epsilon": p.max_epsilon,
        "noise_multiplier": (
            p.central.noise_multiplier if p.central is not None else p.noise_multiplier
        ),
        "clip_norm": p.central.clip_norm if p.central is not None else p.clip_norm,
    }
    if final is not None and final.mode:
        return out | {
            "epsilon": final.epsilon,
            "delta": final.delta,
            "epsilon_rdp": _finite(final.epsilon_rdp),
            "epsilon_pld": _finite(final.epsilon_pld),
            "rounds_accounted": final.rounds_accounted,
            "relation": final.relation,
            "accounted_noise_multiplier": final.noise_multiplier,
            "final_clip_norm": final.clip_norm,
            "stop_reason": final.stop_reason,
            "source": "the attested aggregator's ledger (dp-accounting), sent with DONE",
        }
    if p.mode == "client":
        eps = local_epsilon(p.noise_multiplier, own_releases, p.delta)
        return out | {
            "epsilon": eps.epsilon,
            "epsilon_rdp": _finite(eps.rdp),
            "epsilon_pld": _finite(eps.pld),
            "rounds_accounted": eps.releases,
            "relation": "add_or_remove_one",
            "source": "this trainer's own noised updates (dp-accounting)",
        }
    return out | {"epsilon": None, "source": "the aggregator reported no epsilon"}
