"""Dependencies as `Annotated` aliases: settings, the loaded engine, the inference pool, and the admitted upload."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request

from metaseg.engine import Engine
from serve.config import Settings, get_settings
from serve.pool import InferencePool
from serve.uploads import Files, read_files


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_pool(request: Request) -> InferencePool:
    return request.app.state.pool


def get_report_metrics(request: Request) -> dict[str, float] | None:
    return request.app.state.test_metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
PoolDep = Annotated[InferencePool, Depends(get_pool)]
ReportMetricsDep = Annotated[dict[str, float] | None, Depends(get_report_metrics)]


async def admitted_files(request: Request, pool: PoolDep, settings: SettingsDep) -> AsyncIterator[Files]:
    """The uploaded files, read only once the request holds a place in the pool (else 503 before any byte)."""
    async with pool.admission():
        yield await read_files(request, settings.max_upload_bytes)


Upload = Annotated[Files, Depends(admitted_files)]
Threshold = Annotated[
    float, Query(ge=0, le=1, allow_inf_nan=False, description="lesion where the probability exceeds this")
]
SliceIndex = Annotated[
    int, Query(alias="slice", ge=0, description="0-based slice of a series or multi-frame image, in series order")
]
