"""Vapora: live progress of workflows in the browser."""

__version__ = "0.1.0"
