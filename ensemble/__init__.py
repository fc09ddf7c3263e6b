"""feedserve: LLM dual-encoder feed retrieval served by NVIDIA Triton (see README.md)."""
