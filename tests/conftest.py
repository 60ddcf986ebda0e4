"""Shared pytest configuration: every run names the torch build it ran on (`make setup` may fall back from the CPU
build to another one; see docs/development.md, Install in detail)."""


def torch_build() -> str:
    from importlib import metadata

    version = metadata.version("torch")
    gpu = sorted(d.metadata["Name"] for d in metadata.distributions()
                 if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
    build = "CPU build" if not gpu and "+cu" not in version else f"GPU build, {len(gpu)} nvidia-* packages"
    return f"torch {version} ({build})"


def pytest_report_header(config):
    return torch_build()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # also under -q, which hides the header
    terminalreporter.write_line(f"ran on {torch_build()}")
