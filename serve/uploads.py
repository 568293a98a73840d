"""Read the `file` parts of a multipart upload into memory, counting bytes as they arrive.

Starlette's form parser spools files over 1 MiB to temporary files on disk and learns the size only at the
end; uploads here never touch the disk, and a body over the limit is refused as soon as it crosses it,
whatever Content-Length claimed.
"""

from __future__ import annotations

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

FIELD = "file"
Files = list[tuple[str, bytes]]  # (file name as uploaded, bytes), in upload order

# OpenAPI description of the body that `read_files` parses by hand (FastAPI cannot infer it).
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one image (PNG, JPEG, TIFF, DICOM, NIfTI-1), or several `file` parts "
                            "that are the slices of one series",
                        }
                    },
                }
            }
        },
    }
}


class _Parts:
    """python-multipart callbacks that keep the bytes of every `file` part, in upload order."""

    def __init__(self):
        self.files: list[tuple[str, bytearray]] = []
        self.complete = False
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._data: bytearray | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._data = {}, None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == FIELD.encode():
            self._data = bytearray()
            self.files.append((options.get(b"filename", b"upload").decode("utf-8", "replace"), self._data))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:  # other fields are skipped (their bytes still count)
            self._data.extend(data[start:end])

    def _end(self) -> None:
        self.complete = True


async def read_files(request: Request, max_bytes: int) -> Files:
    """The uploaded files as (file name, bytes); HTTP 413/415/400/422 when the body is too big or not a form."""
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/form-data":
        raise HTTPException(415, f"send the image as multipart/form-data with the field '{FIELD}'")
    if not params.get(b"boundary"):
        raise HTTPException(400, "multipart/form-data without a boundary parameter")
    too_large = HTTPException(413, f"upload is larger than the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    parts = _Parts()
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as err:
        raise HTTPException(400, f"malformed multipart body: {err}") from None
    except ClientDisconnect:  # nobody reads the answer, but it is not a server error
        raise HTTPException(400, "the client closed the connection during the upload") from None
    if not parts.complete:
        raise HTTPException(400, "multipart body ends before its closing boundary (truncated upload?)")
    if not parts.files:
        detail = f"no '{FIELD}' field in the form: send the image as '{FIELD}' (several for one series)"
        raise HTTPException(422, detail)
    return [(name, bytes(data)) for name, data in parts.files]
