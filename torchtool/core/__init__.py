"""The shared core: plain functions and classes, no Typer and no printing.

Import the submodule you need (``torchtool.core.features``, ``torchtool.core.models``...);
this package itself imports nothing heavy.
"""
