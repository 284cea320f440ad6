"""The aggregator's Prometheus metrics, registered on an injected registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)
_ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class AggregatorMetrics:
    rounds_started: Counter
    rounds_completed: Counter
    rounds_failed: Counter
    current_round: Gauge
    total_rounds: Gauge
    updates_received: Counter
    updates_refused: Counter
    update_bytes: Counter
    aggregation_seconds: Histogram
    connected_trainers: Gauge
    model_version: Gauge
    round_duration: Histogram
    round_train_loss: Gauge
    round_eval_loss: Gauge
    round_eval_accuracy: Gauge
    last_round_completed: Gauge
    checkpoint_writes: Counter
    last_checkpoint: Gauge
    federation_done: Gauge
    staleness: Histogram
    model_versions_per_second: Gauge
    dp_epsilon: Gauge
    heap_trims: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AggregatorMetrics:
        p = "hfl_aggregator_"
        return cls(
            rounds_started=Counter(
                p + "rounds_started", "Round attempts started", registry=registry
            ),
            rounds_completed=Counter(
                p + "rounds_completed", "Rounds aggregated into a new model", registry=registry
            ),
            rounds_failed=Counter(
                p + "rounds_failed", "Round attempts failed", ["reason"], registry=registry
            ),
            current_round=Gauge(p + "current_round", "Round in progress", registry=registry),
            total_rounds=Gauge(p + "total_rounds", "Rounds in the plan", registry=registry),
            updates_received=Counter(
                p + "updates_received", "Updates accepted into a round", registry=registry
            ),
            updates_refused=Counter(
                p + "updates_refused", "Updates refused, by reason", ["reason"], registry=registry
            ),
            update_bytes=Counter(
                p + "update_bytes",
                "Model and update payload bytes, in (uploads) and out (downloads)",
                ["direction"],
                registry=registry,
            ),
            aggregation_seconds=Histogram(
                p + "aggregation_seconds", "Time to aggregate a round", registry=registry
            ),
            connected_trainers=Gauge(
                p + "connected_trainers", "Trainers seen recently", registry=registry
            ),
            model_version=Gauge(p + "model_version", "Global model version", registry=registry),
            round_duration=Histogram(
                p + "round_duration_seconds",
                "Wall time of completed rounds",
                buckets=_ROUND_BUCKETS,
                registry=registry,
            ),
            round_train_loss=Gauge(
                p + "round_train_loss", "Mean training loss of the last round", registry=registry
            ),
            round_eval_loss=Gauge(
                p + "round_eval_loss", "Federated evaluation loss, last round", registry=registry
            ),
            round_eval_accuracy=Gauge(
                p + "round_eval_accuracy",
                "Federated evaluation accuracy, last round",
                registry=registry,
            ),
            last_round_completed=Gauge(
                p + "last_round_completed_timestamp_seconds",
                "Unix time the last round completed",
                registry=registry,
            ),
            checkpoint_writes=Counter(
                p + "checkpoint_writes", "Sealed checkpoint writes", ["result"], registry=registry
            ),
            last_checkpoint=Gauge(
                p + "last_checkpoint_timestamp_seconds",
                "Unix time of the last sealed checkpoint",
                registry=registry,
            ),
            federation_done=Gauge(
                p + "federation_done", "1 once the federation has ended", registry=registry
            ),
            staleness=Histogram(
                p + "staleness",
                "Model versions between an accepted update's base and the current model "
                "(asynchronous mode)",
                buckets=_STALENESS_BUCKETS,
                registry=registry,
            ),
            model_versions_per_second=Gauge(
                p + "model_versions_per_second",
                "New global model versions per second, over the last versions",
                registry=registry,
            ),
            dp_epsilon=Gauge(
                p + "dp_epsilon",
                "Differential privacy spent so far: epsilon at the plan's delta (0 without DP)",
                registry=registry,
            ),
            heap_trims=Counter(
                p + "heap_trims",
                "malloc_trim calls after a round, by result (released, none, unavailable)",
                ["result"],
                registry=registry,
            ),
        )
