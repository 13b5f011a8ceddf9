"""Fixtures for every test: the real services of tests/services.py (PostgreSQL, S3 over HTTP)."""

from tests.services import *  # noqa: F401,F403  (fixtures are found by name)
