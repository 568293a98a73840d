"""Server settings, read once from `METASEG_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from metaseg.conventions import BEST_FILE
from metaseg.imageio import Limits

_MiB = 2**20


class Settings(BaseSettings):
    """Which model to serve and how much one request and the whole server may take on."""

    model_config = SettingsConfigDict(env_prefix="METASEG_", env_ignore_empty=True, extra="ignore")

    bundle: str | None = Field(None, description="shipped bundle name or local bundle folder; unset: the recorded best")
    weights: Path | None = Field(None, description="model.pt to load instead of the bundle's or the record's")
    best_record: Path = Field(BEST_FILE, description="best-model record written by `metaseg compare`")
    spatial_size: int | None = Field(None, ge=16, description="network input size, for weights trained at another size")
    max_upload_bytes: int = Field(64 * _MiB, ge=1, description="request body limit, all files together")
    max_pixels: int = Field(4096 * 4096, ge=1, description="pixels per frame")
    max_frames: int = Field(512, ge=1, description="frames per upload, all files together")
    pool_size: int = Field(2, ge=1, description="inference threads")
    queue_limit: int = Field(32, ge=0, description="requests waiting for a thread before new ones get 503")

    def limits(self) -> Limits:
        """The decoder's limits; a single file may use the whole request budget."""
        return Limits(
            max_bytes=self.max_upload_bytes,
            max_pixels=self.max_pixels,
            max_frames=self.max_frames,
            max_files=self.max_frames,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
