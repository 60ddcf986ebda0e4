"""Shared pytest configuration: the header says which torch build the suite runs on (`make setup` may fall back
from the CPU build to another one; see README, Install)."""


def pytest_report_header(config):
    from importlib import metadata

    version = metadata.version("torch")
    gpu = sorted(d.metadata["Name"] for d in metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
    build = "CPU build" if not gpu and "+cu" not in version else f"GPU build, {len(gpu)} nvidia-* packages"
    return f"torch {version} ({build})"
