"""A small real "orders" API (FastAPI) for OpenAPI tool tests; it serves its own
``/openapi.json`` and records the headers of every request it receives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

API_KEY = "key-123"
BEARER_TOKEN = "bearer-456"
ENTRA_TOKEN = "entra-token-789"
KNOWN_ITEMS = ("widget", "gadget", "sprocket")


class OrderIn(BaseModel):
    item: str = Field(description="What to order")
    quantity: int = Field(ge=1, le=100, description="How many")
    note: str | None = None


class Order(OrderIn):
    id: int
    status: Literal["open", "shipped"] = "open"


@dataclass
class OrdersService:
    orders: dict[int, Order] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    """Headers of every request (lower-case names), in order."""
    entra_token: str = ENTRA_TOKEN

    def __post_init__(self) -> None:
        self.orders[1] = Order(id=1, item="widget", quantity=2)
        self.orders[2] = Order(id=2, item="gadget", quantity=1, status="shipped")

    def app(self) -> FastAPI:
        service = self
        app = FastAPI(title="Orders", version="1.0")

        @app.middleware("http")
        async def record(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            service.requests.append(dict(request.headers))
            return await call_next(request)

        def authorized(
            x_api_key: Annotated[str | None, Header()] = None,
            authorization: Annotated[str | None, Header()] = None,
        ) -> None:
            accepted = {f"Bearer {BEARER_TOKEN}", f"Bearer {service.entra_token}"}
            if x_api_key != API_KEY and authorization not in accepted:
                raise HTTPException(401, "missing or wrong credentials")

        @app.get("/readyz", include_in_schema=False)
        def ready() -> dict[str, bool]:
            return {"ok": True}

        @app.get("/orders/{order_id}", operation_id="getOrder", summary="Get one order")
        def get_order(order_id: int) -> Order:
            if order_id not in service.orders:
                raise HTTPException(404, f"order {order_id} not found")
            return service.orders[order_id]

        @app.get(
            "/orders",
            operation_id="listOrders",
            summary="List orders",
            description="Orders, newest first, optionally only those with a status.",
        )
        def list_orders(
            status: Literal["open", "shipped"] | None = None,
            limit: Annotated[int, Field(ge=1, le=50)] = 10,
            x_tenant: Annotated[str | None, Header(description="Tenant to scope to")] = None,
        ) -> list[Order]:
            found = [o for o in service.orders.values() if status is None or o.status == status]
            return sorted(found, key=lambda o: -o.id)[:limit]

        @app.post("/orders", operation_id="createOrder", summary="Place an order", status_code=201)
        def create_order(order: OrderIn) -> Order:
            if order.item not in KNOWN_ITEMS:
                raise HTTPException(422, f"unknown item {order.item!r}; known: {KNOWN_ITEMS}")
            created = Order(id=max(service.orders, default=0) + 1, **order.model_dump())
            service.orders[created.id] = created
            return created

        @app.delete(
            "/orders/{order_id}",
            operation_id="deleteOrder",
            summary="Cancel an order",
            status_code=204,
            dependencies=[Depends(authorized)],
        )
        def delete_order(order_id: int) -> Response:
            if service.orders.pop(order_id, None) is None:
                raise HTTPException(404, f"order {order_id} not found")
            return Response(status_code=204)

        @app.get("/files/{name}", operation_id="getFile", summary="A file's name, echoed")
        def get_file(name: str) -> dict[str, str]:
            return {"name": name}

        @app.get("/reports/daily", operation_id="dailyReport", summary="Slow report")
        async def daily_report() -> dict[str, str]:
            await asyncio.sleep(3)
            return {"report": "done"}

        @app.get("/fail", operation_id="failHard", summary="Always fails")
        def fail() -> JSONResponse:
            return JSONResponse(
                {"error": "Traceback: db password=hunter2 at 10.1.2.3"}, status_code=500
            )

        @app.get("/echo-auth", operation_id="echoAuth", summary="Rejects, echoing the request")
        def echo_auth(
            authorization: Annotated[str | None, Header()] = None,
            x_api_key: Annotated[str | None, Header()] = None,
        ) -> JSONResponse:
            return JSONResponse(
                {"detail": f"bad request from {authorization} / {x_api_key}"}, status_code=400
            )

        @app.get("/moved", operation_id="getMoved", summary="Redirects to the metadata service")
        def moved() -> RedirectResponse:
            return RedirectResponse("http://169.254.169.254/latest/meta-data/")

        return app
