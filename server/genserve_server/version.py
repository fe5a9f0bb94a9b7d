"""genserve's server version, reported in provenance and KServe's ServerMetadata."""

import importlib.metadata

SERVER_VERSION = "0.1.0"


def package_version() -> str:
    """The installed genserve-server's version; SERVER_VERSION where the package is not installed
    (a checkout on PYTHONPATH: tests, bench), which server/pyproject.toml builds it as."""
    try:
        return importlib.metadata.version("genserve-server")
    except importlib.metadata.PackageNotFoundError:
        return SERVER_VERSION
