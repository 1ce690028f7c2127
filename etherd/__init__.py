"""etherd: realtime hub for AI agent harnesses."""

__version__ = "0.1.0"
