"""Session-wide real Triton for the test suite (registered via pytest_plugins in conftest.py).

One tritonserver on free ports serves the demo models (deploy/triton/models) and the test-only
ones (tests/triton_models: fraud_sleepy, fraud_faulty, fraud_wide, typed_echo). Tests use
`triton.url`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from understudy_demo.triton import TritonServer

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODELS = ROOT / "deploy" / "triton" / "models"
TEST_MODELS = ROOT / "tests" / "triton_models"


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A running TritonServer; `.url` is its http://127.0.0.1:PORT base URL."""
    log_file = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer([DEMO_MODELS, TEST_MODELS], log_file=log_file)
    with server:
        yield server
