"""Every problem with a request becomes a 4xx with a JSON `detail` string; only a bug in metaseg may give a 5xx.

The status follows from the exception's class (metaseg.errors), never from its message:
    413  TooLarge: bytes, parts, pixels per frame, frames, files, decoded memory, decompressed size, DICOM
         elements, decode time (a file that costs too much to decode is the client's to fix)
    415  Unsupported: not an image format or encoding the server decodes
    422  Mismatch: sequences of other geometry, several DICOM series that are not a study's three sequences
    400  any other UserError: empty, truncated, corrupt, inconsistent slices of a series
The server's own checks add 401 (bearer token missing or wrong), 408 (body slower than the minimum rate or
longer than the total time), 415 (not multipart, or a DICOM SEG asked for a non-DICOM upload), 422 (no `file` or
`flair` field, or `file` beside the sequence fields, threshold or slice out of range, a DICOM source a SEG cannot
reference) and 503 + Retry-After (Busy: queue full, no thread free in time, too many bodies in memory, inference
past its deadline: the server's load, not the request's fault). Validation errors are one string too, so that every
error answer matches the one documented schema, ErrorDetail.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from metaseg.errors import Mismatch, TooLarge, Unsupported, UserError
from serve.pool import RETRY_AFTER_S, Busy
from serve.schemas import ErrorDetail

log = logging.getLogger(__name__)

STATUS_BY_CATEGORY = {TooLarge: 413, Unsupported: 415, Mismatch: 422, UserError: 400}


def _json(text: str) -> dict:
    return {"description": text, "content": {"application/json": {"schema": ErrorDetail.model_json_schema()}}}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


# For `responses=` of the routes, so that /docs lists the error answers. The schema is inline: a `model` would be
# documented under the route's own media type (image/png for the mask).
ERROR_RESPONSES = {
    status: _json(text)
    for status, text in (
        (400, "corrupt, truncated or inconsistent upload"),
        (408, "the upload arrived slower than the minimum rate, or took longer than the total time"),
        (413, "upload, parts, image, frames, decoded memory or decoding time over the server's limits"),
        (415, "not multipart/form-data, or an image format/encoding the server does not decode"),
        (422, "no `file` or `flair` field, sequences that do not match, a query parameter out of range, or a DICOM "
              "SEG the source cannot support"),
    )
} | {
    503: _json("the server is busy (queue full, no thread free in time, too many bodies in memory, or inference past "
               "its deadline); retry after Retry-After seconds") | {"headers": RETRY_AFTER}
}
UNAUTHORIZED = {401: _json("missing or wrong bearer token (only when the server has METASEG_API_TOKEN)")}


def status_for(error: UserError) -> int:
    """The status of the most specific category the error belongs to."""
    return next(STATUS_BY_CATEGORY[cls] for cls in type(error).__mro__ if cls in STATUS_BY_CATEGORY)


async def _user_error(request: Request, error: UserError) -> JSONResponse:
    status = status_for(error)
    log.info("%s %s: refused upload with %d", request.method, request.url.path, status)  # no message: it names files
    return JSONResponse({"detail": str(error)}, status_code=status)


async def _busy(request: Request, error: Busy) -> JSONResponse:
    log.warning("%s %s: busy, answered 503", request.method, request.url.path)
    detail = f"the server is busy ({error}); retry in {RETRY_AFTER_S} s"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI answers a list of error objects; here it is one line, as ErrorDetail documents."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ())[1:]) or "request"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)


def add_handlers(app: FastAPI) -> None:
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(Busy, _busy)
    app.add_exception_handler(RequestValidationError, _invalid)
