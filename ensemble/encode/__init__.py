"""Token batches -> L2-normalised embeddings, behind one `Encoder` protocol (feedserve.encode.base):
PyTorch (the reference, and the GPU runtime), ONNX Runtime (CPU serving), TensorRT (GPU plans)."""
