"""Every problem with an upload becomes a 4xx with a JSON `detail`; only a bug in metaseg may give a 5xx.

metaseg.imageio raises one UserError type with a readable message; the status follows from what the message
says is wrong:
    413  too large: bytes, pixels per frame, frames, files, decompressed size, decompression bombs
    415  not a format or encoding the server decodes (unknown image, unsupported transfer syntax or pixel type)
    400  everything else: empty, truncated, corrupt, inconsistent slices of a series
The server's own checks add 415 (not multipart, or a DICOM SEG asked for a non-DICOM upload), 422 (missing
`file` field, threshold or slice out of range, a DICOM source a SEG cannot reference) and 503 + Retry-After
(inference pool saturated).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from metaseg.errors import UserError
from serve.pool import RETRY_AFTER_S, PoolSaturated
from serve.schemas import ErrorDetail

log = logging.getLogger(__name__)

_STATUS_BY_PROBLEM = (
    (re.compile(r"more than \d+|exceeds the limit|too many files|decompression bomb"), 413),
    (re.compile(r"not a recognised image|unsupported|no decoder installed|does not hold a NIfTI"), 415),
)

# For `responses=` of the upload routes, so that /docs lists the error answers. The schema is inline: a `model`
# would be documented under the route's own media type (image/png for the mask).
ERROR_RESPONSES = {
    status: {"description": text, "content": {"application/json": {"schema": ErrorDetail.model_json_schema()}}}
    for status, text in (
        (400, "corrupt, truncated or inconsistent upload"),
        (413, "upload, image or frame count over the server's limits"),
        (415, "not multipart/form-data, or an image format/encoding the server does not decode"),
        (422, "missing `file` field, or a query parameter out of range"),
        (503, "inference pool saturated; retry after the Retry-After header's seconds"),
    )
}


def status_for(error: UserError) -> int:
    message = str(error)
    for pattern, status in _STATUS_BY_PROBLEM:
        if pattern.search(message):
            return status
    return 400


async def _user_error(request: Request, error: UserError) -> JSONResponse:
    status = status_for(error)
    log.info("%s %s: refused upload with %d", request.method, request.url.path, status)  # no message: it names files
    return JSONResponse({"detail": str(error)}, status_code=status)


async def _saturated(request: Request, error: PoolSaturated) -> JSONResponse:
    log.warning("%s %s: pool saturated, answered 503", request.method, request.url.path)
    detail = f"the server is busy; retry in {RETRY_AFTER_S} s"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


def add_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(PoolSaturated, _saturated)
