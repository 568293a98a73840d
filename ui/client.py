"""The viewer's only way to the model: HTTP calls to the metaseg server, every failure turned into one line.

The model runs once per upload (`probabilities`); the viewer thresholds, measures, draws and writes the mask files
from that answer itself (ui.findings, ui.series_files), so scrolling, a new threshold and the downloads ask the server
nothing.

The server answers problems with a status and a JSON `detail`; an unreachable server, a timeout or a dropped
connection become a sentence that says what to do. Either way the app shows `str(error)`, never a traceback.
A server started with METASEG_API_TOKEN wants it as a bearer token; the viewer sends the same variable's value.
"""

from __future__ import annotations

import io
import os

import httpx
import numpy as np

DEFAULT_SERVER = "http://127.0.0.1:8000"
Files = tuple[tuple[str, bytes], ...]  # (file name, bytes) in upload order; several = the slices of one series
Parts = tuple[tuple[str, Files], ...]  # (multipart field, its files): `file`, or pre_contrast / flair / post_contrast


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

    def probabilities(self, parts: Parts) -> np.ndarray:
        """The lesion probability of every slice as uint8 (frames, rows, cols), round(255 p), in series order at the
        input's size: the model's whole answer, thresholded by the caller."""
        answer = self._upload("/segment/probabilities", parts).content
        try:
            probability = np.load(io.BytesIO(answer), allow_pickle=False)["probability"]
        except Exception:  # whatever numpy and zipfile raise on bytes that are not such an NPZ
            raise ServerError(f"The server at {self.url} did not answer with lesion probabilities (an NPZ holding "
                              "`probability`); is it a metaseg server of the viewer's version?") from None
        if probability.dtype != np.uint8 or probability.ndim != 3:
            raise ServerError(f"The server's probabilities are {probability.dtype} {probability.shape}, not uint8 "
                              "(frames, rows, cols).")
        return probability

    def _upload(self, path: str, parts: Parts) -> httpx.Response:
        files = [(name, (filename, data)) for name, part in parts for filename, data in part]
        return self._request("POST", path, files=files)

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
    if response.status_code in (404, 405):
        return (f"The server does not offer {response.request.url.path} ({response.status_code}); it is older than "
                "the viewer: update and restart it.")
    return f"The server refused the request ({response.status_code} {response.reason_phrase}): {detail}"
