"""Thin Triton entry point: the logic lives in feedserve.triton.index_write."""

from feedserve.triton.index_write import TritonPythonModel  # noqa: F401
