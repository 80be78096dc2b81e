"""Sample high-risk tool: a semantic-kernel plugin class, used unchanged except for
Lamina's ``@tool_policy``. Importing this module imports semantic-kernel."""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from semantic_kernel.functions import kernel_function

from tools.contracts import RiskLevel
from tools.sk_adapter import tool_policy

Priority = Literal["low", "normal", "high", "urgent"]


class ServiceDeskPlugin:
    """Opens IT service-desk tickets (kept in memory in this sample)."""

    def __init__(self, first_number: int = 1001) -> None:
        self._numbers = itertools.count(first_number)
        self.tickets: dict[str, dict[str, str]] = {}

    # High risk: a ticket lands in a people's queue, and urgent ones page the
    # on-call engineer, so a person confirms before it is filed. Any employee
    # may file one; service-desk agents (who may be contractors without the
    # employee role) file them on others' behalf.
    @tool_policy(risk=RiskLevel.HIGH, roles={"employee", "servicedesk.agent"})
    @kernel_function(description="Open a service-desk ticket and return its number and status.")
    async def create_ticket(
        self,
        title: Annotated[str, "One-line summary of the problem or request"],
        description: Annotated[str, "What happened, what was expected, and any error text"],
        priority: Annotated[Priority, "How urgent it is; 'urgent' pages the on-call engineer"] = (
            "normal"
        ),
    ) -> dict[str, str]:
        ticket_id = f"SD-{next(self._numbers)}"
        ticket = {
            "id": ticket_id,
            "title": title,
            "description": description,
            "priority": priority,
            "status": "new",
        }
        self.tickets[ticket_id] = ticket
        return {"id": ticket_id, "status": "new", "priority": priority}
