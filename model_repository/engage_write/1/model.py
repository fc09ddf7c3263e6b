"""Thin Triton entry point: the logic lives in feedserve.triton.engage_write."""

from feedserve.triton.engage_write import TritonPythonModel  # noqa: F401
