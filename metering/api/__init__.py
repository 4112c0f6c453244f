"""The HTTP service: FastAPI app factory, dependencies (the edge that commits), problem+json errors, routers."""
