"""Command-line tools: model building, evaluation and benchmarks. Run them as ``python -m tools.<name>``."""
