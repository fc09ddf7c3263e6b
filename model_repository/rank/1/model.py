"""Thin Triton entry point: the logic lives in feedserve.triton.rank."""

from feedserve.triton.rank import TritonPythonModel  # noqa: F401
