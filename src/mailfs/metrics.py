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
        for key, value in self.status().items():
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, int | float) and key != "pid":
                yield GaugeMetricFamily(f"mailfs_{key}", key.replace("_", " "), value=value)


def serve_metrics(port: int, status: Callable[[], dict[str, Any]]) -> None:
    REGISTRY.register(StatusCollector(status))
    start_http_server(port, addr="127.0.0.1")
