"""Input limits every node enforces itself: ComfyUI range-checks widget values but not values arriving through links
(a Primitive, a math node or an API prompt can send anything), so a node's declared min/max would otherwise be a
suggestion. Also the interrupt poll handed to long-running core loops."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from painternet_core.errors import quote


def check_inputs(node: type, values: Mapping[str, Any]) -> None:
    """Refuse (ValueError naming node, input, value and range) any INT/FLOAT/BOOLEAN/STRING/combo value in `values`
    that its declaration in `node.INPUT_TYPES()` does not allow: wrong type, NaN/Inf, or outside min/max."""
    spec = node.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, value in values.items():
        kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
        where = f"{node.__name__}: input {name}={quote(value)}"
        if kind in ("INT", "FLOAT"):
            integer = kind == "INT"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and isinstance(value, float)):
                raise ValueError(f"{where} must be {'an integer' if integer else 'a number'}")
            if not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number (NaN and infinity are refused)")
            low, high = options.get("min", -math.inf), options.get("max", math.inf)
            if not low <= value <= high:
                raise ValueError(f"{where} is outside [{low}, {high}]; linked values are not range-checked by "
                                 "ComfyUI, so fix the node that produces it")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
        elif kind == "STRING" and not isinstance(value, str):
            raise ValueError(f"{where} must be a string")
        elif isinstance(kind, (list, tuple)) and value not in kind:
            raise ValueError(f"{where} is not one of {quote(list(kind))}")


def interrupt_poll() -> Callable[[], None]:
    """ComfyUI's interrupt check (raises InterruptProcessingException after `POST /interrupt`), for core loops that
    take a `check_interrupt` callback: core never imports comfy."""
    import comfy.model_management

    return comfy.model_management.throw_exception_if_processing_interrupted
