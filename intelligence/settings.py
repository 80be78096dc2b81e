"""Settings of the intelligence layer (``LAMINA_INTELLIGENCE__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class IntelligenceSettings(BaseModel):
    conversations_path: Path | None = Field(
        default=None, description="SQLite conversation store; default <data_dir>/conversations.db"
    )
    prompts_dir: Path | None = Field(
        default=None, description="Versioned prompt files; default the bundled prompts/"
    )
    planner: Literal["auto", "deterministic", "model"] = Field(
        default="auto",
        description="auto: the model plans when it can call tools, else deterministic",
    )
    history_turns: int = Field(default=6, ge=0, le=50, description="Past messages in the prompt")
    max_message_chars: int = Field(default=8_000, ge=1, description="Longer user messages: 422")
    answer_prompt: str = Field(default="grounded_answer", description="Prompt name in prompts/")
    planner_prompt: str = Field(default="planner", description="Prompt name in prompts/")
