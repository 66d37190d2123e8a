"""The PainterNet trainer: ``train.py`` (the CLI), ``step`` (loss and optimizer step), ``checkpoints``, ``data``,
``presets`` (tiny CPU models)."""
