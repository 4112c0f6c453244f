"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with their JavaScript, CSS and favicon served by the app itself.

FastAPI's own pages load them from a CDN (and ReDoc its fonts from Google), so they were blank on a machine
without internet. The app is built with ``docs_url=None, redoc_url=None`` and ``install`` adds the same routes
(same paths, no authentication, ``/docs/oauth2-redirect``, not in the OpenAPI document) with FastAPI's
``get_swagger_ui_html`` / ``get_redoc_html`` pointed at ``/docs/assets/``: the files the ``fastapi-offline``
package ships (``swagger-ui-dist`` 5, ``redoc`` 2 standalone, a favicon), served by Starlette's ``StaticFiles``.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
ASSETS_PACKAGE = ("fastapi_offline", "static")  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png


def install(app: FastAPI) -> None:
    """Serve the two pages and their assets. ``app`` is built with ``docs_url=None, redoc_url=None``."""
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the docs pages need the app's OpenAPI document (openapi_url)")
    app.mount(ASSETS_URL, StaticFiles(packages=[ASSETS_PACKAGE]), name="docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    # Plain routes, as FastAPI adds its own pages: GET and HEAD, outside the OpenAPI document and the app's
    # dependencies (no token; reject_nul guards the API's parameters, not these pages').
    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    app.add_route(OAUTH2_REDIRECT_URL, oauth2_redirect, include_in_schema=False)
    app.add_route(REDOC_URL, redoc, include_in_schema=False)


def _root_path(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")
