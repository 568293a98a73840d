"""Dependencies as `Annotated` aliases: settings, the loaded engine, the inference pool, the received upload, and
the bearer-token guard."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from metaseg.inference.engine import Engine
from serve.config import Settings, get_settings
from serve.model import Recorded
from serve.pool import InferencePool
from serve.uploads import BodyMemory, Form, read_files


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_pool(request: Request) -> InferencePool:
    return request.app.state.pool


def get_body_memory(request: Request) -> BodyMemory:
    return request.app.state.body_memory


def get_recorded(request: Request) -> Recorded:
    return request.app.state.recorded


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
PoolDep = Annotated[InferencePool, Depends(get_pool)]
RecordedDep = Annotated[Recorded, Depends(get_recorded)]


async def received_files(
    request: Request, settings: SettingsDep, memory: Annotated[BodyMemory, Depends(get_body_memory)]
) -> AsyncIterator[Form]:
    """The uploaded files of each image field (`file`, or the sequence fields), read in full before the request asks
    for an inference thread; their bytes count against the server-wide body memory until the response is sent."""
    with memory.account() as take:
        yield await read_files(request, settings, take)


Upload = Annotated[Form, Depends(received_files)]
Threshold = Annotated[
    float | None,
    Query(ge=0, le=1, allow_inf_nan=False, description="lesion where the probability is at least this; default: "
          "the bundle's chosen threshold (GET /info `inference_steps`)"),
]
SliceIndex = Annotated[
    int, Query(alias="slice", ge=0, description="0-based slice of a series or multi-frame image, in series order")
]

_bearer = HTTPBearer(auto_error=False, description="the server's METASEG_API_TOKEN")


def token_guard(token: SecretStr) -> Callable:
    """A dependency that lets a request through only with `Authorization: Bearer <token>` (constant-time compare)."""
    expected = token.get_secret_value().encode()

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise HTTPException(401, "this server needs a bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token
