"""The HTTP routes, one module per resource: `videos` (everything under /v1/videos) and `system`
(/health, /v1/models, /metrics)."""

from wan_spmd.server.routes.system import system_router
from wan_spmd.server.routes.videos import videos_router

__all__ = ["system_router", "videos_router"]
