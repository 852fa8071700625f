"""Our serving figures on Ray's metrics endpoint (Prometheus, the dashboard's Metrics page), next to Ray
Serve's own `ray_serve_*` (requests, errors and latency per route and status code, queues at the proxy).
Serve cannot see what is inside a request (images) nor our queue; these add that, per app and replica."""

from __future__ import annotations

# seconds; tiny models answer in tens of milliseconds, 1024 px on a busy GPU in minutes
LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


class ServeMetrics:
    def __init__(self, app: str, replica: str):
        from ray.util import metrics

        tags = {"app": app, "replica": replica}
        self.images = metrics.Counter("simplear_serve_images_generated", description="images answered with a 200",
                                      tag_keys=tuple(tags))
        self.queue_depth = metrics.Gauge("simplear_serve_queue_depth",
                                         description="generation requests admitted by the replica: in a batch or waiting for one",
                                         tag_keys=tuple(tags))
        self.latency = metrics.Histogram("simplear_serve_request_latency_s",
                                         description="seconds from admission to answer of a generation request, by status",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=(*tags, "status"))
        for m in (self.images, self.queue_depth, self.latency):
            m.set_default_tags(tags)

    def answered(self, status: int, seconds: float, images: int) -> None:
        self.latency.observe(seconds, {"status": str(status)})
        if images:
            self.images.inc(images)
