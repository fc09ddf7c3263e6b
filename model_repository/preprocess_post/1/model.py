"""Thin Triton entry point: the logic lives in feedserve.triton.preprocess."""

from feedserve.triton.preprocess import TritonPythonModel  # noqa: F401
