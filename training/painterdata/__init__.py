"""PainterData: ``captions.py`` (the local-caption CLI) and ``shards`` (the BrushData / PainterData shard format)."""
