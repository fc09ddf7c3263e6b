"""Clients of a feedserve Triton deployment: online (retrieve, embed) and batch (corpus -> index)."""
