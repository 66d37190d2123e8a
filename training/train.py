"""``python training/train.py`` and ``accelerate launch training/train.py``: the trainer's command line at the path
the project documents and users' launch configs name. The trainer itself lives in ``training/trainer/train.py``;
this file only runs it as ``__main__``, so both paths take the same flags and behave the same."""
import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer", "train.py"),
                   run_name="__main__")
