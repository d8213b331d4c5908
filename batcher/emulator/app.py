"""Building and serving the emulator app.

``create_app`` gives an :class:`aiohttp.web.Application` (for ``aiohttp.test_utils.TestServer`` or
any runner); ``serve_emulator`` runs it in-process on a free port and yields the ``/v1`` base URL;
``run_emulator`` serves until cancelled (for the CLI).

One app serves both APIs: OpenAI's Files and Batches (:mod:`batcher.emulator.openai_api`) and Anthropic's
Messages and Message Batches under ``/v1/messages`` (:mod:`batcher.emulator.anthropic_api`). The Anthropic SDK
takes the server root as its ``base_url``: the URL ``serve_emulator`` yields, without ``/v1``.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from batcher.emulator.anthropic_api import add_anthropic_routes, anthropic_middleware, is_anthropic_path
from batcher.emulator.http import STATE_KEY, Handler
from batcher.emulator.openai_api import add_routes, openai_middleware
from batcher.emulator.settings import EmulatorSettings
from batcher.emulator.state import EmulatorState

logger = logging.getLogger(__name__)

__all__ = ["create_app", "run_emulator", "serve_emulator"]


@web.middleware
async def _provider_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each API's own authentication, fault injection and error format, chosen by path."""
    if is_anthropic_path(request.path):
        return await anthropic_middleware(request, handler)
    return await openai_middleware(request, handler)


def create_app(settings: EmulatorSettings) -> web.Application:
    """Build the emulator app.

    Files live in ``settings.data_dir``, or in a temporary directory removed when the app shuts down.
    The app's state is ``app[STATE_KEY]`` (:class:`~batcher.emulator.state.EmulatorState`).

    Args:
        settings: Behaviour and fault knobs.

    Returns:
        The aiohttp application, not yet running.
    """
    owns_dir = settings.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="batcher-emulator-")) if owns_dir else Path(str(settings.data_dir))
    app = web.Application(middlewares=[_provider_middleware])
    app[STATE_KEY] = EmulatorState(settings, data_dir)
    add_routes(app)
    add_anthropic_routes(app)

    if owns_dir:

        async def _remove_data_dir(_app: web.Application) -> None:
            await asyncio.to_thread(shutil.rmtree, data_dir, True)

        app.on_cleanup.append(_remove_data_dir)
    return app


@asynccontextmanager
async def serve_emulator(settings: EmulatorSettings, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the emulator in-process for the duration of the block.

    Args:
        settings: Behaviour and fault knobs.
        host: Interface to bind.
        port: Port to bind; ``0`` picks a free one.

    Yields:
        The base URL for the OpenAI SDK, e.g. ``"http://127.0.0.1:54321/v1"``.
    """
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = _bound_port(runner)
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{bound_port}/v1"
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the emulator is not bound to a TCP port")


async def run_emulator(host: str, port: int, settings: EmulatorSettings) -> None:
    """Serve the emulator until the task is cancelled.

    Args:
        host: Interface to bind.
        port: Port to bind (``0`` picks a free one; the URL is logged).
        settings: Behaviour and fault knobs.
    """
    async with serve_emulator(settings, host, port) as url:
        logger.info("batch emulator listening on %s (Anthropic SDK base_url: %s)", url, url.removesuffix("/v1"))
        await asyncio.Event().wait()
