"""Installed versions of distributions, read from their metadata (a leaf: imports nothing of the package)."""
from __future__ import annotations


def installed_version(dist: str, missing: str = "not installed") -> str:
    """The installed version of distribution ``dist``, or ``missing``, without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return missing
