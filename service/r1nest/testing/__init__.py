"""Fakes that really behave, shared by the test suites of several areas (importable, no pytest)."""
