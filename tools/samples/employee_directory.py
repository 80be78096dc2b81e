"""Sample read-only tool: the company directory, as a plain typed function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from tools.contracts import RiskLevel, ToolCaller
from tools.plugins import tool

Department = Literal["Engineering", "Finance", "Human Resources", "IT", "Sales"]


@dataclass(frozen=True, slots=True)
class Employee:
    name: str
    email: str
    department: Department
    manager: str | None
    phone_ext: str


# One tenant's directory, in code so the sample runs offline. Keyed by tenant:
# a caller only ever sees the people of their own organisation.
DIRECTORIES: dict[str, tuple[Employee, ...]] = {
    "contoso": (
        Employee("Megan Bowen", "megan.bowen@contoso.com", "Sales", None, "4101"),
        Employee("Alex Wilber", "alex.wilber@contoso.com", "Sales", "Megan Bowen", "4102"),
        Employee("Adele Vance", "adele.vance@contoso.com", "Engineering", None, "4201"),
        Employee("Lee Gu", "lee.gu@contoso.com", "Engineering", "Adele Vance", "4202"),
        Employee("Diego Siciliani", "diego.siciliani@contoso.com", "Finance", None, "4301"),
        Employee(
            "Isaiah Langer", "isaiah.langer@contoso.com", "Finance", "Diego Siciliani", "4302"
        ),
        Employee("Nestor Wilke", "nestor.wilke@contoso.com", "IT", None, "4401"),
        Employee("Patti Fernandez", "patti.fernandez@contoso.com", "Human Resources", None, "4501"),
        Employee("Lidia Holloway", "lidia.holloway@contoso.com", "IT", "Nestor Wilke", "4402"),
    ),
}


@tool(risk=RiskLevel.READ, roles={"employee"})
def lookup_employee(
    caller: ToolCaller,
    query: Annotated[str, Field(min_length=2, description="Part of a name or email address")],
    department: Annotated[Department | None, "Only people in this department"] = None,
    limit: Annotated[int, Field(ge=1, le=25, description="Most people to return")] = 5,
) -> list[Employee]:
    """Find colleagues in the company directory by name or email address.

    Returns each match's name, email, department, manager and phone extension.
    """
    needle = query.casefold()
    matches = [
        person
        for person in DIRECTORIES.get(caller.tenant_id, ())
        if (needle in person.name.casefold() or needle in person.email.casefold())
        and (department is None or person.department == department)
    ]
    return matches[:limit]
