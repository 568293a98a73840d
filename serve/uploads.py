"""Read the image parts of a multipart upload into memory, counting bytes, parts and time as they arrive.

The form holds either `file` (one image, the files of one series, or a DICOM study's three sequence series) or the
sequences one by one: `pre_contrast`, `flair` (required), `post_contrast`, each one image or one series' files
(metaseg.imageio.sequences turns either into one Volume). Other fields are skipped, their bytes and parts still counted.

Starlette's form parser spools files over 1 MiB to temporary files on disk and learns the size only at the
end; uploads here never touch the disk, and a body is refused as soon as it crosses a limit, whatever
Content-Length claimed: over the byte limit (413), more parts than allowed (413), slower than the minimum rate
or longer than the total time (408), or more bodies in memory server-wide than allowed (503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from metaseg.imageio import sequences
from metaseg.imageio.limits import Limits
from metaseg.imageio.volume import Volume
from metaseg.imageio.sequences import FIELDS
from serve.config import Settings
from serve.pool import Busy

FIELD = sequences.FILE_FIELD
FLAIR_FIELD = next(field for field, sequence in FIELDS.items() if sequence == sequences.FLAIR)
Files = list[tuple[str, bytes]]  # (file name as uploaded, bytes), in upload order
BODY_GRACE_S = 2.0  # the minimum body rate applies after this long: connection set-up, first packets


def _files(description: str) -> dict:
    return {"type": "array", "items": {"type": "string", "format": "binary"}, "description": description}


# OpenAPI description of the body that `read_files` parses by hand (FastAPI cannot infer it).
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "anyOf": [{"required": [FIELD]}, {"required": [FLAIR_FIELD]}],
                    "properties": {
                        FIELD: _files(
                            "one image (PNG, JPEG, TIFF, DICOM, NIfTI-1), or several `file` parts that are the slices "
                            "of one series; a DICOM study's three series whose descriptions name pre-contrast T1, "
                            "FLAIR and post-contrast T1 are taken as those sequences. Not with the sequence fields"
                        ),
                        **{
                            field: _files(
                                f"the {sequence} sequence: one image or the files of one series, the same slices as "
                                "`flair`" + (" (required when the sequence fields are used)" if field == FLAIR_FIELD
                                             else "; when missing, FLAIR stands in for it")
                            )
                            for field, sequence in FIELDS.items()
                        },
                    },
                }
            }
        },
    }
}


@dataclass(frozen=True)
class Form:
    """The image fields of an upload, `file` or the sequence fields (`flair` among them), with each field's files in
    upload order."""

    fields: dict[str, Files]

    @property
    def files(self) -> Files:
        """Every uploaded image file, field after field."""
        return [file for files in self.fields.values() for file in files]

    def volume(self, limits: Limits) -> Volume:
        """The upload decoded as one Volume (metaseg.imageio.sequences); UserError for bad input. Run it on a pool
        thread."""
        return sequences.volume_of(self.fields, limits)


class BodyMemory:
    """Bytes of request bodies held in memory, all requests together, under one limit; beyond it, 503."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextmanager
    def account(self) -> Iterator[Callable[[int], None]]:
        """A `take(n)` for one request's chunks; what it took is given back when the request ends."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self.held + n > self.limit:
                raise Busy(f"the server holds {self.held} bytes of uploads, its limit is {self.limit}")
            self.held += n
            taken += n

        try:
            yield take
        finally:
            self.held -= taken


class _Parts:
    """python-multipart callbacks that keep the bytes of every part of an image field, by field in upload order; at
    most `max_parts` parts, counted as the parser reaches them (the parser allows 8 header lines of 4 KiB per part)."""

    _NAMES = {name.encode(): name for name in (FIELD, *FIELDS)}

    def __init__(self, max_parts: int):
        self.max_parts = max_parts
        self.parts = 0
        self.fields: dict[str, list[tuple[str, bytearray]]] = {}
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
        self.parts += 1
        if self.parts > self.max_parts:
            raise HTTPException(413, f"the form has more than {self.max_parts} parts")
        self._headers, self._data = {}, None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field = self._NAMES.get(options.get(b"name"))
        if field is not None:
            self._data = bytearray()
            name = options.get(b"filename", b"upload").decode("utf-8", "replace")
            self.fields.setdefault(field, []).append((name, self._data))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:  # other fields are skipped (their bytes still count)
            self._data.extend(data[start:end])

    def _end(self) -> None:
        self.complete = True


async def read_files(request: Request, settings: Settings, take: Callable[[int], None]) -> Form:
    """The uploaded files of each image field; HTTP 400/408/413/415 when the body is too big, too slow or not a form,
    422 when its image fields are not `file` or the sequence fields with `flair`, 503 (Busy) when `take` refuses
    more memory for bodies."""
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/form-data":
        raise HTTPException(415, f"send the image as multipart/form-data with the field '{FIELD}'")
    if not params.get(b"boundary"):
        raise HTTPException(400, "multipart/form-data without a boundary parameter")
    max_bytes = settings.max_upload_bytes
    too_large = HTTPException(413, f"upload is larger than the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    parts = _Parts(settings.max_parts)
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    loop = asyncio.get_running_loop()
    start, received = loop.time(), 0
    end = start + settings.body_timeout_s

    def next_deadline() -> float:  # the body keeps up min_body_rate after the grace time, within the total time
        return min(end, start + BODY_GRACE_S + received / settings.min_body_rate)

    try:
        async with asyncio.timeout_at(next_deadline()) as deadline:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise too_large
                take(len(chunk))
                parser.write(chunk)
                deadline.reschedule(next_deadline())
        parser.finalize()
    except TimeoutError:
        rate = f"{received} bytes in {loop.time() - start:.0f} s"
        detail = (f"the upload arrived too slowly ({rate}; at least {settings.min_body_rate} bytes/s and at most "
                  f"{settings.body_timeout_s:g} s in all)")
        raise HTTPException(408, detail, headers={"Connection": "close"}) from None
    except MultipartParseError as err:
        raise HTTPException(400, f"malformed multipart body: {err}") from None
    except ClientDisconnect:  # nobody reads the answer, but it is not a server error
        raise HTTPException(400, "the client closed the connection during the upload") from None
    if not parts.complete:
        raise HTTPException(400, "multipart body ends before its closing boundary (truncated upload?)")
    fields = _checked(parts.fields)
    return Form({field: [(name, bytes(data)) for name, data in files] for field, files in fields.items()})


def _checked(fields: dict) -> dict:
    """`fields` if they are `file` alone or the sequence fields with `flair`, else HTTP 422 saying what to send."""
    named = ", ".join(f"'{field}'" for field in FIELDS)
    if not fields:
        raise HTTPException(422, f"no '{FIELD}' field in the form: send the image as '{FIELD}' (several for one "
                                 f"series), or the sequences as {named}")
    if FIELD in fields and len(fields) > 1:
        raise HTTPException(422, f"send the image as '{FIELD}' or the sequences as {named}, not both")
    if FIELD not in fields and FLAIR_FIELD not in fields:
        raise HTTPException(422, f"'{FLAIR_FIELD}' is missing: it is required with the other sequence fields, and "
                                 "it stands in for a missing one")
    return fields
