"""Fixtures only the integration tests use (the shared ones are in tests/conftest.py)."""

from tests.integration.sam3_fixtures import tiny_sam3  # noqa: F401
from tests.integration.sam_fixtures import tiny_sam  # noqa: F401  (one session-wide export for every module)
