"""Optional Prometheus metrics: every numeric status field as a gauge."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def describe(self) -> list[GaugeMetricFamily]:
        # Without this the registry collects once at registration, on the trio thread.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.status()
        yield from numeric_gauges("mailfs_", status)
        replication = status.get("replication")
        if isinstance(replication, dict):
            yield from numeric_gauges("mailfs_replication_", replication)
            ownership = replication.get("ownership")
            if isinstance(ownership, dict):
                yield from numeric_gauges("mailfs_ownership_", ownership)
            yield from peer_gauges(replication.get("peers", {}))


def numeric(value: object) -> float | None:
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int | float) else None


def numeric_gauges(prefix: str, values: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    for key, value in values.items():
        number = numeric(value)
        if number is not None and key != "pid":
            yield GaugeMetricFamily(f"{prefix}{key}", key.replace("_", " "), value=number)


def peer_gauges(peers: dict[str, dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    """One family per peer field, labelled by peer node id."""
    families: dict[str, GaugeMetricFamily] = {}
    for node_id, fields in peers.items():
        for key, value in fields.items():
            number = numeric(value)
            if number is None:
                continue
            family = families.get(key)
            if family is None:
                family = families[key] = GaugeMetricFamily(
                    f"mailfs_peer_{key}", f"per peer: {key.replace('_', ' ')}",
                    labels=["peer"])
            family.add_metric([node_id], number)
    yield from families.values()


def serve_metrics(port: int, status: Callable[[], dict[str, Any]]) -> None:
    REGISTRY.register(StatusCollector(status))
    start_http_server(port, addr="127.0.0.1")
