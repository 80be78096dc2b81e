"""Settings of the tools layer (``LAMINA_TOOLS__*``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ToolsSettings(BaseModel):
    load_entry_points: bool = Field(
        default=True, description="Discover plugins in the 'lamina.tools' entry-point group"
    )
    enabled: list[str] | None = Field(
        default=None, description="Only these tools (by name); default all discovered"
    )
    default_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="Per-call timeout of tools that set none"
    )
    max_output_chars: int = Field(
        default=20_000, ge=100, description="Longer tool output is truncated"
    )
