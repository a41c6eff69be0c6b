"""The command-line interface: ``mlxq submit|status|results|cancel|worker|jobs``."""

from .main import cli, main

__all__ = ["cli", "main"]
