"""Shared test fixtures."""

from hub_fixtures import *  # noqa: F403  (Hub emulator and card fixtures)
