"""The FastAPI app: loads the configured bundle once at startup and serves /health, /info and /segment.

    uvicorn serve.main:app          # settings from METASEG_* variables; or `metaseg serve --bundle ...`
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import metaseg
from serve import model
from serve.config import get_settings
from serve.errors import add_handlers
from serve.pool import InferencePool
from serve.routers import health, info, segment

log = logging.getLogger(__name__)

# Their INFO/WARNING messages quote UIDs and attribute values (a patient's name, for instance); keep them out of
# the server's log.
_TAG_QUOTING_LOGGERS = ("pydicom", "highdicom")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model and start the inference pool once; settings honour `app.dependency_overrides`."""
    settings = app.dependency_overrides.get(get_settings, get_settings)()
    app.state.engine, app.state.test_metrics = model.load(settings)
    app.state.pool = InferencePool(settings.pool_size, settings.queue_limit)
    quieted = {name: logging.getLogger(name).level for name in _TAG_QUOTING_LOGGERS}
    for name in quieted:
        logging.getLogger(name).setLevel(logging.ERROR)
    log.info(
        "serving %s with %d inference thread(s), queue of %d", app.state.engine.name, settings.pool_size,
        settings.queue_limit,
    )
    try:
        yield
    finally:
        app.state.pool.shutdown()
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)


def create_app() -> FastAPI:
    app = FastAPI(
        title="metaseg",
        summary="Brain-MRI metastasis segmentation with a MONAI bundle",
        description="Upload a slice (PNG, JPEG, TIFF, DICOM, NIfTI-1) or the slices of one series as multipart "
        "field `file`. Research use only; not for diagnostic purposes.",
        version=metaseg.__version__,
        lifespan=lifespan,
        generate_unique_id_function=lambda route: f"{route.tags[0]}-{route.name}",
    )
    add_handlers(app)
    for router in (health.router, info.router, segment.router):
        app.include_router(router)
    return app


app = create_app()
