"""Shared pytest configuration.

Every test marked ``anyio`` runs once per backend listed in `anyio_backend`.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test on asyncio and on trio."""
    return str(request.param)
