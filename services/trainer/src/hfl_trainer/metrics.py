"""The trainer's Prometheus metrics, registered on an injected registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class TrainerMetrics:
    rounds_completed: Counter
    examples: Counter
    train_loss: Gauge
    eval_accuracy: Gauge
    examples_per_second: Gauge
    upload_bytes: Counter
    retries: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> TrainerMetrics:
        p = "hfl_trainer_"
        return cls(
            rounds_completed=Counter(
                p + "rounds_completed", "Rounds whose update was accepted", registry=registry
            ),
            examples=Counter(p + "examples", "Examples trained on", registry=registry),
            train_loss=Gauge(
                p + "train_loss", "Training loss of the last round", registry=registry
            ),
            eval_accuracy=Gauge(
                p + "eval_accuracy",
                "Held-out accuracy of the last evaluated model",
                registry=registry,
            ),
            examples_per_second=Gauge(
                p + "examples_per_second",
                "Local training throughput, last round",
                registry=registry,
            ),
            upload_bytes=Counter(
                p + "upload_bytes", "Update payload bytes sent", registry=registry
            ),
            retries=Counter(
                p + "retries",
                "Calls retried while the aggregator was unreachable",
                registry=registry,
            ),
        )
