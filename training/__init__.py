"""Fine-tuning the dual encoder (issue 3): data, InfoNCE training with negatives and Matryoshka."""
