"""Server settings, read once from `METASEG_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from metaseg.conventions import BEST_FILE
from metaseg.imageio.limits import Limits, request_limits
from serve.schemas import UploadLimits

_MiB = 2**20


class Settings(BaseSettings):
    """Which model to serve, who may use it, and how much one request and the whole server may take on."""

    model_config = SettingsConfigDict(env_prefix="METASEG_", env_ignore_empty=True, extra="ignore")

    bundle: str | None = Field(None, description="shipped bundle name or local bundle folder; unset: the recorded best")
    weights: Path | None = Field(None, description="model.pt to load instead of the bundle's or the record's")
    best_record: Path = Field(BEST_FILE, description="best-model record written by `metaseg compare`")
    spatial_size: int | None = Field(None, ge=16, description="network input size, for weights trained at another size")
    # access
    api_token: SecretStr | None = Field(None, description="bearer token every endpoint but /health requires")
    docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json (behind the token when one is set)")
    # one request: bytes, parts, decoded memory, time
    max_upload_bytes: int = Field(64 * _MiB, ge=1, description="request body limit, all files together")
    max_parts: int = Field(1024, ge=1, description="multipart parts per request, counted while the body is parsed")
    max_pixels: int = Field(
        2048 * 2048, ge=1, description="pixels per frame; the model's preprocessing takes ~80 bytes per pixel of the "
        "frame it works on (measured), ~330 MiB at this default"
    )
    max_frames: int = Field(512, ge=1, description="frames per upload, all files together")
    max_decoded_bytes: int = Field(
        256 * _MiB, ge=1, description="memory budget per request, from the headers before decoding: frames x rows x "
        "columns x (samples x bytes per sample + 8 for two float32 copies)"
    )
    inflate_factor: int = Field(4, ge=1, description="a .nii.gz or deflated DICOM may inflate to this x max_upload_bytes")
    max_dicom_elements: int = Field(200_000, ge=100, description="DICOM data elements per request, all files together")
    body_timeout_s: float = Field(60, gt=0, description="most seconds to receive a request body (else 408)")
    min_body_rate: int = Field(
        16 * 1024, ge=1, description="bytes per second a body must keep up after its first 2 s (else 408)"
    )
    decode_timeout_s: float = Field(
        30, gt=0, description="most seconds to decode an upload (else 413: the file costs too much to decode)"
    )
    inference_timeout_s: float = Field(
        120, gt=0, description="most seconds of inference per request (else 503 + Retry-After: the server's load)"
    )
    # the whole server
    pool_size: int = Field(2, ge=1, description="inference threads")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads of the model's thread (torch); unset: torch's default, one per core"
    )
    queue_limit: int = Field(64, ge=0, description="received requests waiting for a thread before new ones get 503")
    queue_timeout_s: float = Field(30, gt=0, description="most seconds a received request waits for a thread (else 503)")
    max_buffered_bytes: int = Field(
        512 * _MiB, ge=1, description="request bodies held in memory at once, all requests together (beyond: 503)"
    )

    def upload_limits(self) -> UploadLimits:
        """What one upload may cost, as GET /info shows it: all the viewer needs to decode as the server does."""
        return UploadLimits(**self.model_dump(include=set(UploadLimits.model_fields)))

    def limits(self) -> Limits:
        """The decoder's limits, through the one function the viewer uses too."""
        return request_limits(**self.upload_limits().model_dump())


@lru_cache
def get_settings() -> Settings:
    return Settings()
