"""PainterNet core: the maths and formats shared by the ComfyUI nodes and the trainer.

Pure PyTorch / numpy / OpenCV. Never imports ComfyUI, the nodes or the trainer (a test enforces it); heavy optional
libraries (diffusers) are imported lazily inside the functions that need them.
"""
import logging

logger = logging.getLogger("painternet")
