"""Figures a suite collects while it runs and prints at the end (the reliability and Docker
suites' sizes, times and faults)."""
from __future__ import annotations

from collections.abc import Callable

import pytest


def figures_plugin(title: str) -> tuple[Callable, Callable]:
    """A session fixture `figures` (a list of lines to add to) and the pytest_terminal_summary
    hook that prints them under `title`; a conftest binds both by those names."""
    key = pytest.StashKey[list]()

    @pytest.fixture(scope="session")
    def figures(pytestconfig) -> list[str]:
        """Lines for the summary at the end of the run."""
        return pytestconfig.stash.setdefault(key, [])

    def pytest_terminal_summary(terminalreporter, config) -> None:
        lines = config.stash.get(key, [])
        if lines:
            terminalreporter.write_sep("=", title)
            for line in lines:
                terminalreporter.write_line(line)

    return figures, pytest_terminal_summary
