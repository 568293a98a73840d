"""The viewer's only way to the model: HTTP calls to the metaseg server, every failure turned into one line.

The server answers problems with a status and a JSON `detail`; an unreachable server, a timeout or a dropped
connection become a sentence that says what to do. Either way the app shows `str(error)`, never a traceback.
A server started with METASEG_API_TOKEN wants it as a bearer token; the viewer sends the same variable's value.
"""

from __future__ import annotations

import os

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8000"
Files = tuple[tuple[str, bytes], ...]  # (file name, bytes) in upload order; several = the slices of one series


class ServerError(Exception):
    """The server refused the request or could not be asked; the message is meant for the user."""


class Unreachable(ServerError):
    """Nothing answers at the server's address."""


class Client:
    def __init__(
        self, url: str, transport: httpx.BaseTransport | None = None, timeout_s: float = 300, token: str | None = None
    ):
        """`token`: the server's bearer token; default METASEG_API_TOKEN, unset or empty: none is sent."""
        self.url = url.rstrip("/")
        # Segmenting a long series on a CPU takes a while; connecting must not.
        timeout = httpx.Timeout(timeout_s, connect=5)
        token = os.environ.get("METASEG_API_TOKEN") if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, transport=transport, timeout=timeout, headers=headers)

    def health(self) -> dict:
        return self._request("GET", "/health", timeout=5).json()

    def info(self) -> dict:
        return self._request("GET", "/info", timeout=5).json()

    def segment(self, files: Files, threshold: float) -> dict:
        """Findings for every slice: lesions with areas in px and mm², totals, volume, inference time."""
        return self._upload("/segment", files, threshold=threshold).json()

    def mask(self, files: Files, threshold: float, slice_index: int) -> bytes:
        """One slice's 0/255 mask as PNG, at the input's own size."""
        return self._upload("/segment/mask", files, threshold=threshold, slice=slice_index).content

    def overlay(self, files: Files, threshold: float, slice_index: int) -> bytes:
        """One slice as the server draws it: gray with the lesion in red, as PNG."""
        return self._upload("/segment/overlay", files, threshold=threshold, slice=slice_index).content

    def seg(self, files: Files, threshold: float) -> bytes:
        """All slices as a DICOM Segmentation; the server refuses non-DICOM input."""
        return self._upload("/segment/seg", files, threshold=threshold).content

    def _upload(self, path: str, files: Files, **params) -> httpx.Response:
        parts = [("file", (name, data)) for name, data in files]
        return self._request("POST", path, files=parts, params=params)

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise Unreachable(
                f"No metaseg server answers at {self.url}. Start it with `metaseg serve` (or start both with "
                "`make serve-ui`), or point the viewer at it: `metaseg ui --server URL`."
            ) from None
        except httpx.TimeoutException:
            raise ServerError(f"The server at {self.url} did not answer in time; try fewer slices.") from None
        except httpx.TransportError as err:
            raise ServerError(f"The connection to the server at {self.url} failed: {err}") from None
        if response.is_error:
            raise ServerError(_refusal(response))
        return response


def _refusal(response: httpx.Response) -> str:
    """The server's `detail` with its status; FastAPI's validation errors are a list of messages."""
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        detail = response.text.strip()[:300] or response.reason_phrase
    if isinstance(detail, list):
        detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
    if response.status_code == 401:
        return (f"The server asks for an API token (401): {detail} Start the viewer with METASEG_API_TOKEN set "
                "to the server's token.")
    if response.status_code == 503:
        return f"The server is busy (503): {detail}"
    return f"The server refused the request ({response.status_code} {response.reason_phrase}): {detail}"
