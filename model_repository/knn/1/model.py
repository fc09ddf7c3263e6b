"""Thin Triton entry point: the logic lives in feedserve.triton.knn."""

from feedserve.triton.knn import TritonPythonModel  # noqa: F401
