"""zimage-pipeline: a message-driven Z-Image-Turbo worker for enterprise content pipelines."""

from __future__ import annotations

__version__ = "0.1.0"
