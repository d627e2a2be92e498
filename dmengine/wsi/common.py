"""What every route module of the API shares (L5): the engine's services under an app key.

Routes reach the L4 services (broker, jobs, content) through these accessors, and the store
only where no service stands in front of it (device and capability records).
"""
from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from ..broker import Broker
from ..bulk import Jobs
from ..content import ContentService
from ..store.base import Store


class Services(Protocol):
    """What the API needs from the assembled engine (dmengine.engine.Engine provides it)."""

    api_key: str
    registry: Any                      # prometheus CollectorRegistry
    broker: Broker | None
    store: Store | None
    content: ContentService | None


ENGINE: web.AppKey[Services] = web.AppKey("engine")


def engine_of(request: web.Request) -> Services:
    return request.app[ENGINE]


def broker_of(request: web.Request) -> Broker:
    broker = request.app[ENGINE].broker
    assert broker is not None
    return broker


def jobs_of(request: web.Request) -> Jobs:
    return broker_of(request).jobs


def store_of(request: web.Request) -> Store:
    store = request.app[ENGINE].store
    assert store is not None
    return store


def content_of(request: web.Request) -> ContentService:
    content = request.app[ENGINE].content
    assert content is not None
    return content


__all__ = ["Services", "ENGINE", "engine_of", "broker_of", "jobs_of", "store_of", "content_of"]
