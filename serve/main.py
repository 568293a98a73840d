"""The FastAPI app: loads the configured bundle once at startup and serves /health, /info and /segment.

    uvicorn --factory serve.main:create_app     # settings from METASEG_* variables; or `metaseg serve --bundle ...`

Importing this module changes nothing in the process and builds no app: `create_app` does, and `metaseg serve`
(serve/command.py) tunes malloc (serve/allocator.py) before uvicorn starts.

With METASEG_API_TOKEN set, every route but /health needs `Authorization: Bearer <token>`, the API documents
(/openapi.json, /docs, /redoc) included, which a browser therefore cannot open: turn them off with
METASEG_DOCS=false, or read /openapi.json with the header.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse

import metaseg
from serve import allocator, model
from serve.config import Settings, get_settings
from serve.deps import token_guard
from serve.errors import UNAUTHORIZED, add_handlers
from serve.pool import InferencePool, on_model_thread, set_torch_threads
from serve.routers import health, info, segment
from serve.uploads import BodyMemory

log = logging.getLogger(__name__)

# Their INFO/WARNING messages quote UIDs and attribute values (a patient's name, for instance); keep them out of
# the server's log.
_TAG_QUOTING_LOGGERS = ("pydicom", "highdicom")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model on the model thread, set torch's thread count there and warm it up (the first request then
    pays no one-time set-up), and start the inference pool; settings honour `app.dependency_overrides`."""
    settings = app.dependency_overrides.get(get_settings, get_settings)()
    app.state.torch_threads = set_torch_threads(settings.torch_threads)
    app.state.engine, app.state.recorded = on_model_thread(model.load, settings)
    on_model_thread(app.state.engine.warm_up)
    app.state.pool = InferencePool(settings.pool_size, settings.queue_limit, settings.queue_timeout_s)
    app.state.body_memory = BodyMemory(settings.max_buffered_bytes)
    quieted = {name: logging.getLogger(name).level for name in _TAG_QUOTING_LOGGERS}
    for name in quieted:
        logging.getLogger(name).setLevel(logging.ERROR)
    log.info(
        "serving %s (%d model(s), %d torch thread(s)) with %d inference thread(s), queue of %d, %s, malloc %s",
        app.state.engine.name, len(app.state.engine.models), app.state.torch_threads, settings.pool_size,
        settings.queue_limit, "bearer token required" if settings.api_token else "no token",
        allocator.in_effect() or "as it was",
    )
    try:
        yield
    finally:
        app.state.pool.shutdown()
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (default: the METASEG_* environment); they also decide which routes need a token
    and whether the API documents are served, so they are read here and not only per request."""
    if settings is None:
        settings = get_settings()
    guard = [Depends(token_guard(settings.api_token))] if settings.api_token else []
    public_docs = settings.docs and not guard
    app = FastAPI(
        title="metaseg",
        summary="Brain-MRI metastasis segmentation with a MONAI bundle",
        description="Upload a slice (PNG, JPEG, TIFF, DICOM, NIfTI-1) or the slices of one series as multipart "
        "field `file`, or the sequences in the fields `pre_contrast`, `flair`, `post_contrast`. Research use only; "
        "not for diagnostic purposes.",
        version=metaseg.__version__,
        lifespan=lifespan,
        generate_unique_id_function=lambda route: f"{route.tags[0]}-{route.name}",
        openapi_url="/openapi.json" if public_docs else None,
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
    )
    app.dependency_overrides[get_settings] = lambda: settings
    add_handlers(app)
    app.include_router(health.router)
    for router in (info.router, segment.router):
        app.include_router(router, dependencies=guard, responses=UNAUTHORIZED if guard else None)
    if settings.docs and guard:
        _add_guarded_docs(app, guard)
    return app


def _add_guarded_docs(app: FastAPI, guard: list) -> None:
    """/openapi.json, /docs and /redoc behind the token, as FastAPI would serve them without one."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard, tags=["docs"])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guard, tags=["docs"])
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False, dependencies=guard, tags=["docs"])
    def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

