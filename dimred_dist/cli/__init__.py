"""Command-line entry points (they import transformers; the top-level package does not import them)."""
