"""HTTP routers: health (unversioned, no auth) and the versioned API under /v1."""
