"""The branch optimizer, by name: torch AdamW (foreach or fused), bitsandbytes' or torchao's 8-bit AdamW.

Why a named factory shared by ``train.py`` and ``bench/gpu_train.py``: the benchmark must time exactly the optimizer
the trainer builds, and each 8-bit option needs its own import error naming the package to install.

Which 8-bit AdamW: both keep the two Adam moments in 8 bits with block-wise scales (≈ 2 bytes/param instead of 8).
bitsandbytes ships precompiled kernels (a ~43 MB wheel; CUDA, and in 0.50 the CPU too); torchao's is plain PyTorch
compiled with ``torch.compile`` on first use (a ~3.4 MB wheel, CPU too, one compilation per distinct parameter shape
at the first step). Both optimizers' states survive ``torch.load(weights_only=True)``, as accelerate's
``load_state`` reads them. ``--use_8bit_adam`` keeps meaning bitsandbytes, as in diffusers' scripts.

torchao cannot live next to diffusers 0.36.x: that release's torchao hook imports names torchao 0.17+ no longer has
and then fails with a NameError, so ``import diffusers`` itself breaks; :func:`check_optimizer` says so before
anything is loaded.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["OPTIMIZERS", "check_optimizer", "build_optimizer"]

#: Names accepted by ``--optimizer`` and :func:`build_optimizer`.
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_fused", "adamw8bit_bnb", "adamw8bit_torchao")


#: The first diffusers release whose torchao hook survives a current torchao.
TORCHAO_MIN_DIFFUSERS = (0, 37)


def check_optimizer(name: str) -> None:
    """Raise ValueError, naming the fix, when optimizer ``name`` cannot run here; imports nothing.

    Why before training starts: a missing package would otherwise surface after the base model has loaded, and
    torchao next to diffusers < 0.37 breaks ``import diffusers`` with an unrelated-looking NameError.
    """
    import importlib.metadata
    import importlib.util

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    package = {"adamw8bit_bnb": "bitsandbytes", "adamw8bit_torchao": "torchao"}.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"--optimizer {name} needs {package} (pip install {package}); use --optimizer adamw to keep "
                         "torch AdamW.")
    if name == "adamw8bit_torchao":
        version = importlib.metadata.version("diffusers")
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < TORCHAO_MIN_DIFFUSERS:
            raise ValueError(f"--optimizer adamw8bit_torchao needs diffusers >= 0.37 (installed: {version}, whose "
                             "import fails while torchao is installed); upgrade diffusers or use --optimizer "
                             "adamw8bit_bnb.")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float,
                    betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``params`` with AdamW hyper-parameters."""
    kwargs: dict[str, Any] = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if name == "adamw8bit_bnb":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError("--optimizer adamw8bit_bnb (--use_8bit_adam) needs bitsandbytes (pip install "
                             "bitsandbytes); use --optimizer adamw to keep torch AdamW.") from error
        return bnb.optim.AdamW8bit(params, **kwargs)
    if name == "adamw8bit_torchao":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as error:
            raise ValueError("--optimizer adamw8bit_torchao needs torchao (pip install torchao); use --optimizer "
                             "adamw to keep torch AdamW.") from error
        return AdamW8bit(params, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
