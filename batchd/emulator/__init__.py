"""An emulator of the Anthropic Message Batches API (plus POST /v1/messages) with fault injection.

Point the unchanged `anthropic` SDK at it with `base_url=`. See docs/emulator.md.
"""

from .app import create_app
from .config import EmulatorConfig
from .server import DEFAULT_PORT, EmulatorThread, serve

__all__ = ["DEFAULT_PORT", "EmulatorConfig", "EmulatorThread", "create_app", "serve"]
