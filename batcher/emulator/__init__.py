"""Provider emulator: OpenAI's Files and Batches API, faithful enough for the official SDK.

Run it in-process::

    async with serve_emulator(EmulatorSettings(latency_s=0)) as base_url:
        client = AsyncOpenAI(api_key="test", base_url=base_url, http_client=DefaultAioHttpClient())

or build the app with :func:`create_app` and serve it yourself. ``GET /_emulator/stats`` and
``POST /_emulator/reset`` help tests; :class:`EmulatorSettings` holds latency and fault knobs.
"""

from __future__ import annotations

from batcher.emulator.app import create_app, run_emulator, serve_emulator
from batcher.emulator.http import STATE_KEY
from batcher.emulator.settings import EmulatorSettings
from batcher.emulator.state import EmulatorState

__all__ = ["STATE_KEY", "EmulatorSettings", "EmulatorState", "create_app", "run_emulator", "serve_emulator"]
