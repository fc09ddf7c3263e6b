"""Thin Triton entry point: the logic lives in feedserve.triton.encoder."""

from feedserve.triton.encoder import TritonPythonModel  # noqa: F401
