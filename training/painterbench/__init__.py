"""PainterBench: ``evaluate.py`` (the CLI), ``metrics`` (region arithmetic and scorers), ``manifest.py`` (builds a
benchmark from images or PainterData shards)."""
