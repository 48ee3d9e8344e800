"""The server's settings; ``python -m serving`` reads its defaults from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.predictor import default_threads

if TYPE_CHECKING:  # SQLAlchemy is imported only when the prediction log is on
    from serving.feedback import FeedbackSettings
    from serving.follow import FollowSettings
    from serving.http.management_api import ManagementSettings
    from serving.http.security import SecuritySettings


@dataclass(frozen=True)
class ServerConfig:
    """Addresses, batching, limits and threads; the defaults are the measured choices (README).

    The image pixel budget is not here: each Predictor holds it (``Predictor.load``).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int | None = 8082  # None: no metrics listener (the registry still counts)
    max_batch_size: int = 8
    max_batch_delay_ms: float = 5.0
    max_queue: int = 64  # requests admitted per model version: preprocessing + queued + running
    max_body_bytes: int = 20 * 1024 * 1024
    request_timeout_s: float = 30.0
    preprocess_threads: int = field(default_factory=default_threads)
    # The engine variant every version is loaded with (serving.engines): "auto" is the
    # fastest one the version's export validated that this machine can run.
    engine: str = "auto"
    precision: str = "auto"
    # Batches run at once per version, each on threads / streams intra-op threads.
    streams: int = 1
    # Per connection (uvicorn bounds none of this itself): the request line and headers must
    # arrive within header_timeout_s, the body within body_timeout_s of them; past
    # max_connections open connections new requests get 503.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 512
    feedback: FeedbackSettings | None = None  # the prediction log (--feedback-db); None: off
    management: ManagementSettings | None = None  # the management API's listener; None: off
    follow: FollowSettings | None = None  # MLflow aliases to follow (--follow); None: off
    security: SecuritySettings | None = None  # token, Host check, feedback rate limit
    # SIGTERM: seconds in-flight requests get to finish. The stops after it are bounded
    # too (management listener 5 s, batchers 3 s, feedback store 4 s: dataplane.STOP_*_S),
    # so the process exits within 27 s, inside Kubernetes' default 30 s grace period.
    drain_s: float = 15.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "preprocess_threads",
                     "max_connections", "streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_delay_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_batch_delay_ms must be >= 0 and request_timeout_s > 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError(f"header_timeout_s and body_timeout_s must be > 0, got "
                             f"{self.header_timeout_s}, {self.body_timeout_s}")
