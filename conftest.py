"""pytest settings for the docstring examples of plugin/ (make test runs them beside tests/)."""

from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

REPO = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _examples_run_in_the_repository(request, monkeypatch):
    """The examples name shipped configs whose data paths (``datasets/kuairand/...``) are relative
    to the repository, where a user runs them: they run there whatever pytest's working directory."""
    if isinstance(request.node, DoctestItem):
        monkeypatch.chdir(REPO)
