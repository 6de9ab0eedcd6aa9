"""The version of cellgen (part of every generated module's key)."""

__version__ = "0.1.0"
