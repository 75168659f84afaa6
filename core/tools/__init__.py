"""Command-line tools beside the engine: benchmarks, evaluation, tokenization, synthetic models."""
