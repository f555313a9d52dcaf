"""An emulator of the Anthropic Message Batches API (plus Messages, count_tokens and Models): as strict as the
API, with its limits, prompt caching, tool-call cues and fault injection.

Point the unchanged `anthropic` SDK at it with `base_url=`. See docs/emulator.md.
"""

from .app import create_app
from .config import EmulatorConfig
from .server import DEFAULT_PORT, EmulatorThread, serve

__all__ = ["DEFAULT_PORT", "EmulatorConfig", "EmulatorThread", "create_app", "serve"]
