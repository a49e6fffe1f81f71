"""``log:``: wandb and the progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe.config.fields import choice, positive


@dataclass
class LogConfig:
    SECTION: ClassVar[str] = "log"
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "moe"
    wandb_group: str | None = None
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        choice(self, "wandb", ("disabled", "offline", "online"))
        positive(self, "log_every")
