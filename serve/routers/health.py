"""Liveness for load balancers and the benchmark: the model is loaded and how busy the pool is."""

from fastapi import APIRouter

from serve.deps import EngineDep, PoolDep
from serve.schemas import Health

router = APIRouter(prefix="/health", tags=["health"])


@router.get("", response_model=Health)
def health(engine: EngineDep, pool: PoolDep) -> Health:
    """The server is up and its model is loaded."""
    return Health(
        model=engine.name, version=str(engine.metadata.get("version", "")), busy=pool.admitted, capacity=pool.capacity
    )
