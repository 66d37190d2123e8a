"""PainterNet training-side code, one sub-room per job (DESIGN §1):

* ``training.trainer``      the trainer: ``train.py`` (CLI), the loss and optimizer step (``step``), checkpoints,
                            data pipeline, tiny presets;
* ``training.inference``    diffusers-side inference shared by validation, PainterBench and the benchmarks: base
                            loading, prompt and VAE encoding, the reference inpaint loop;
* ``training.painterbench`` PainterBench: ``evaluate.py`` (CLI), ``metrics``, ``manifest.py`` (benchmark builder);
* ``training.painterdata``  PainterData: ``captions.py`` (CLI) and ``shards``, the one owner of the BrushData /
                            PainterData shard format.

Import rules (tests/test_rooms.py): PainterBench and PainterData never import the trainer; the trainer imports the
inference module, never PainterBench. Everything imports ``painternet_core``, nothing imports ``nodes`` or ComfyUI.
"""
