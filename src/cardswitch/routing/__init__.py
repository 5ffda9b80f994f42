"""cardswitch.routing: BIN table, issuer route selection and host failover."""

from cardswitch.routing.bintable import BinTable, BinTableError, Route
from cardswitch.routing.routes import (
    EndpointHealth,
    RouteDecision,
    is_on_us,
    issuer_route,
    pick_host,
    select_routes,
)

__all__ = [
    "BinTable", "BinTableError", "Route", "EndpointHealth", "RouteDecision",
    "is_on_us", "issuer_route", "pick_host", "select_routes",
]
