"""Data: tokenizers, preprocessing to indexed datasets, mixtures, and the trainer's batches."""
