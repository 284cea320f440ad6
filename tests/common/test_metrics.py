"""Metrics registered on an injected registry, served over HTTP on a port of their own."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from hfl_common.metrics import GrpcServerMetrics, register_build_info, start_metrics_http


def fetch(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_on_port_zero_serves_the_given_registry() -> None:
    registry = CollectorRegistry()
    register_build_info(registry, "trainer", "1.2.3")
    port, stop = start_metrics_http(registry, "127.0.0.1", 0)
    try:
        samples = fetch(port)
    finally:
        stop()

    assert port > 0
    assert samples[("hfl_build_info", (("service", "trainer"), ("version", "1.2.3")))] == 1.0
    # nothing from the process-global default registry leaks in
    assert not any(name.startswith("process_") for name, _ in samples)


def test_stopped_metrics_endpoint_refuses_connections_and_stops_twice_harmlessly() -> None:
    port, stop = start_metrics_http(CollectorRegistry(), "127.0.0.1", 0)
    stop()
    stop()
    with pytest.raises(urllib.error.URLError):
        fetch(port)


def test_grpc_metrics_count_codes_durations_and_bytes_per_method() -> None:
    registry = CollectorRegistry()
    metrics = GrpcServerMetrics(registry)
    metrics.received("hfl.v1.AggregatorService", "Join", 120)
    metrics.received("hfl.v1.AggregatorService", "Join", 30)
    metrics.sent("hfl.v1.AggregatorService", "Join", 64)
    metrics.finished("hfl.v1.AggregatorService", "Join", grpc.StatusCode.OK, 0.004)
    metrics.finished("hfl.v1.AggregatorService", "Join", grpc.StatusCode.NOT_FOUND, 2.0)

    join = {"service": "hfl.v1.AggregatorService", "method": "Join"}
    assert registry.get_sample_value("hfl_grpc_received_bytes_total", join) == 150.0
    assert registry.get_sample_value("hfl_grpc_sent_bytes_total", join) == 64.0
    assert registry.get_sample_value("hfl_grpc_requests_total", {**join, "code": "OK"}) == 1.0
    assert (
        registry.get_sample_value("hfl_grpc_requests_total", {**join, "code": "NOT_FOUND"}) == 1.0
    )
    assert registry.get_sample_value("hfl_grpc_request_duration_seconds_count", join) == 2.0
    assert (
        registry.get_sample_value(
            "hfl_grpc_request_duration_seconds_bucket", {**join, "le": "0.005"}
        )
        == 1.0
    )
    assert registry.get_sample_value("hfl_grpc_request_duration_seconds_sum", join) == 2.004


def test_two_registries_do_not_share_metrics() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    GrpcServerMetrics(first).sent("s", "m", 10)
    GrpcServerMetrics(second)

    labels = {"service": "s", "method": "m"}
    assert first.get_sample_value("hfl_grpc_sent_bytes_total", labels) == 10.0
    assert second.get_sample_value("hfl_grpc_sent_bytes_total", labels) is None


def test_registering_server_metrics_twice_on_one_registry_is_refused() -> None:
    registry = CollectorRegistry()
    GrpcServerMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        GrpcServerMetrics(registry)


def test_metrics_port_in_use_is_a_clear_config_error() -> None:
    import socket

    from hfl_common.errors import ConfigError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: "):
            start_metrics_http(CollectorRegistry(), "127.0.0.1", port)
