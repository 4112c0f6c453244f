"""The OpenAPI document: versioned paths, response models, problem+json error responses, bearer auth."""

from __future__ import annotations

from fastapi.testclient import TestClient

from metering.api.app import create_app
from metering.config import Settings


def test_openapi_documents_models_errors_and_auth(tmp_path) -> None:
    settings = Settings(env="test", data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        doc = client.get("/openapi.json").json()
    events = doc["paths"]["/v1/events"]["post"]
    assert events["operationId"] == "post_events"
    assert events["security"] == [{"ApiToken": []}]
    assert doc["components"]["securitySchemes"]["ApiToken"]["scheme"] == "bearer"
    ok = events["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/IngestResponse"}
    for status in ("401", "403", "413", "422", "503"):
        content = events["responses"][status]["content"]
        assert list(content) == ["application/problem+json"], status
    assert events["responses"]["422"]["content"]["application/problem+json"]["schema"]["$ref"].endswith(
        "/ValidationProblem"
    )
    batch = doc["components"]["schemas"]["EventBatch"]["properties"]["events"]
    assert batch["items"]["title"] == "UsageEvent" and "event_id" in batch["items"]["required"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    paths = set(doc["paths"])
    assert {"/healthz", "/readyz", "/v1/events", "/v1/usage", "/v1/transfers", "/v1/audit"} <= paths
    assert all(p.startswith("/v1/") for p in paths - {"/healthz", "/readyz"})  # versioned (/metrics is not in it)
    for path, operations in doc["paths"].items():  # every operation documents its errors as problem+json
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert list(response.get("content", {})) in (["application/problem+json"], []), (
                        path, method, status)  # fmt: skip


def test_openapi_lists_the_409_of_a_put_that_races_a_concurrent_create(tmp_path) -> None:
    """PUT of a purpose or a budget answers 409 `conflict` when a concurrent request created the row meanwhile
    (db/unique.flush_or_conflict; docs/api.md's error table): the document must list it, as it does for BYOLLM."""
    settings = Settings(env="test", data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        doc = client.get("/openapi.json").json()
    for path in ("/v1/admin/purposes/{purpose}", "/v1/admin/budgets/{extension_id}",
                 "/v1/admin/users/{tenant_id}/{user_id}/byollm"):  # fmt: skip
        assert "409" in doc["paths"][path]["put"]["responses"], path
    assert "409" in doc["paths"]["/v1/admin/price-overrides"]["post"]["responses"]


def test_openapi_names_the_503_codes_of_invoke_and_the_ledger_export(tmp_path) -> None:
    """docs/api.md's error table: invoking answers 503 `spool_error`, the ledger CSV 503 `too_many_exports`; the
    generic 503 description named only `not_ready` and `database_unavailable`."""
    settings = Settings(env="test", data_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        doc = client.get("/openapi.json").json()
    invoke = doc["paths"]["/v1/extensions/{extension_id}/functions/{function}:invoke"]["post"]["responses"]["503"]
    assert "`spool_error`" in invoke["description"] and "`database_unavailable`" in invoke["description"]
    export = doc["paths"]["/v1/ledger/{period}.csv"]["get"]["responses"]["503"]
    assert "`too_many_exports`" in export["description"]
    assert list(export["content"]) == ["application/problem+json"]
