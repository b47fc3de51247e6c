"""Every program in examples/ runs and prints what it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import run_program

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "asyncio_example.py": ["101 calls, 1 backend call"],
    "rendered_pages.py": [
        "2 pages cached, rendered 2 times in all, <h1>About</h1><p>We cache &lt;rendered&gt;"
    ],
    "trio_example.py": ["50 gets, 1 load: b'<html>/index</html>'", "report=b'ready'"],
    "fastapi_app.py": ["20 concurrent requests, 1 handler call: ['COALESCED', 'MISS']",
                       "then: HIT", "with If-None-Match: 304", "after: MISS",
                       'aiovmc_entries{cache="pages"}'],
    "aiohttp_app.py": ["20 concurrent requests, 1 handler call: ['COALESCED', 'MISS']",
                       "then: HIT, max-age=300", "invalidated: 1", "after: MISS"],
    "litestar_app.py": ["3 requests, 1 handler call: [{'report': 1}, {'report': 1}, {'report': 1}]",
                        "a session from any worker: b'logged in'"],
}


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} >= set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str) -> None:
    done = run_program(EXAMPLES / name)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    for line in EXPECTED[name]:
        assert line in done.stdout, done.stdout
