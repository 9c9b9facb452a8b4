"""What a replica reports about itself: Ray Serve metrics per request, and a summary of its totals.

:class:`ServeMetrics` holds the replica's Prometheus-style metrics (requests by route and status,
latency, time to first token, tokens, batch occupancy), recorded once per request.
:func:`summary` turns the decode loop's RunnerStats into the figures `gptflow serve` logs at the
end (rates and percentiles). The counting itself is the runner's (runner.RunnerStats).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from ray.serve import metrics

from flows.serve.runner import RunnerStats

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]
TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5]


class ServeMetrics:
    """A replica's Ray Serve metrics (made in the replica: they are per process)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "gptflow_requests", "requests by route and status", ("route", "status")
        )
        self.tokens = metrics.Counter("gptflow_generated_tokens", "tokens generated")
        self.latency = metrics.Histogram("gptflow_latency_s", "request latency", LATENCY_BUCKETS_S)
        self.ttft = metrics.Histogram(
            "gptflow_time_to_first_token_s", "time to first token", TTFT_BUCKETS_S
        )
        self.occupancy = metrics.Gauge("gptflow_batch_occupancy", "mean sequences per decode step")

    def record(
        self,
        route: str,
        status: int,
        start: float,
        tokens: int,
        ttft: float | None,
        stats: RunnerStats,
    ) -> None:
        """One finished request: its route and status, latency since `start` (perf_counter) and
        tokens when it succeeded, time to first token for a stream; the occupancy so far."""
        self.requests.inc(tags={"route": route, "status": str(status)})
        if status == 200:
            self.latency.observe(time.perf_counter() - start)
            if tokens:
                self.tokens.inc(tokens)
        if ttft is not None:  # streams only: a non-streamed answer arrives whole
            self.ttft.observe(ttft)
        if stats.steps:
            self.occupancy.set(stats.occupied_rows / stats.steps)


def summary(stats: RunnerStats, version: str | None, swaps: int, started: float) -> dict[str, Any]:
    """Totals and percentiles of a replica, for the summary `gptflow serve` logs at the end."""
    s = stats
    out: dict[str, Any] = {
        "version": version,
        "swaps": swaps,
        "requests": s.requests,
        "rejected": s.rejected,
        "completion_tokens": s.completion_tokens,
        "decode_steps": s.steps,
        "uptime_s": time.time() - started,
    }
    if s.steps:
        out["mean_batch_occupancy"] = s.occupied_rows / s.steps
        out["decode_tokens_per_s"] = s.completion_tokens / max(s.busy_s, 1e-9)
    for key, values in (("latency", s.latency_s), ("ttft", s.ttft_s)):
        if values:
            out[f"{key}_p50_s"] = statistics.median(values)
            out[f"{key}_p90_s"] = (
                statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
            )
    return out
