"""Triton python-backend models. Each `model_repository/<name>/1/model.py` only re-exports one
`TritonPythonModel` from here; the logic below works on numpy arrays and is testable without a
server."""
