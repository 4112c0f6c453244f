"""/docs (Swagger UI) and /redoc (ReDoc) work offline: their HTML names no other origin (they loaded their viewer
from a CDN and ReDoc its fonts from Google, so both were blank without internet) and the app serves every script,
stylesheet and icon they load, without a token, like the pages and /openapi.json."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from tests.integration.api.conftest import assert_problem

ABSOLUTE_URL = re.compile(r"https?://|//[\w.-]+\.\w", re.IGNORECASE)  # http(s)://... or protocol-relative //host.tld


class _Loads(HTMLParser):
    """What a page loads: (kind, url) for each <script src>, <link rel=stylesheet> and <link rel=icon>."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {name: value or "" for name, value in attrs}
        if tag == "script" and attr.get("src"):
            self.loads.append(("script", attr["src"]))
        elif tag == "link":
            rel = set(attr.get("rel", "").lower().split())
            kind = "stylesheet" if "stylesheet" in rel else "icon" if "icon" in rel else f"link {sorted(rel)}"
            self.loads.append((kind, attr.get("href", "")))


def loads_of(html: str) -> list[tuple[str, str]]:
    parser = _Loads()
    parser.feed(html)
    return parser.loads


def assert_same_origin_page(client: TestClient, path: str) -> str:
    response = client.get(path)  # no Authorization header: the pages are public, as before
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert ABSOLUTE_URL.findall(response.text) == [], path
    return response.text


@pytest.mark.parametrize(
    ("path", "kinds", "viewer"),
    [
        ("/docs", {"script", "stylesheet", "icon"}, "SwaggerUIBundle"),
        ("/redoc", {"script", "icon"}, "Redoc"),
    ],
)
def test_docs_pages_load_everything_from_the_app(client, path, kinds, viewer) -> None:
    html = assert_same_origin_page(client, path)
    loads = loads_of(html)
    assert {kind for kind, _url in loads} == kinds, loads
    for kind, url in loads:
        assert url.startswith("/") and not url.startswith("//"), (path, url)
        asset = client.get(url)
        assert asset.status_code == 200, (url, asset.text[:200])
        content_type = asset.headers["content-type"]
        if kind == "script":
            assert re.match(r"(text|application)/javascript\b", content_type), (url, content_type)
            assert len(asset.content) > 100_000 and viewer in asset.text, url  # the viewer's bundle, not a stub
        elif kind == "stylesheet":
            assert content_type.startswith("text/css"), (url, content_type)
            assert len(asset.content) > 10_000 and ".swagger-ui" in asset.text, url
        else:
            assert content_type == "image/png" and asset.content.startswith(b"\x89PNG\r\n\x1a\n"), (url, content_type)
    spec = re.search(r"""url: '([^']+)'|spec-url="([^"]+)\"""", html)
    assert spec is not None, html
    assert (spec[1] or spec[2]) == "/openapi.json"
    document = client.get("/openapi.json")
    assert document.status_code == 200 and document.json()["info"]["title"] == "metering"


def test_swagger_ui_oauth2_redirect_is_served_and_names_no_other_origin(client) -> None:
    docs = client.get("/docs").text
    assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in docs
    assert "oauth2" in assert_same_origin_page(client, "/docs/oauth2-redirect")


def test_a_missing_docs_asset_is_a_404_problem(client) -> None:
    assert_problem(client.get("/docs/assets/nothing.js"), 404, "not_found")
