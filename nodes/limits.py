"""The one place where node inputs are checked against their V3 schema at run time, and the interrupt poll handed to
long-running core loops.

A node's schema (`define_schema`) declares each widget's type, min/max and options; ComfyUI 0.3.75 enforces min/max
only for values typed into a widget, and for V3 combos not even that (its validator looks for a *list* as the input
type, while a V3 combo is declared as "COMBO" with an `options` list). Values arriving through a link — a Primitive,
a math node, an API prompt — reach `execute` unchecked. So every node's `execute` starts with
`check_inputs(cls, locals())`, which refuses what the schema does not allow with a ValueError naming node, input,
value and range, instead of a raw exception deep in the code (e.g. an OverflowError from a 10**400 seed). Nodes with
combos also define `validate_inputs` through `widget_check`, so a typed-in value that is not an option (a branch
file that is gone) is refused when the prompt is queued, as ComfyUI does for V1 combos.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from painternet_core.errors import quote


def _schema_inputs(node: type) -> dict[str, Any]:
    return {i.id: i for i in node.define_schema().inputs or []}


def check_inputs(node: type, values: Mapping[str, Any]) -> None:
    """Refuse any INT/FLOAT/BOOLEAN/STRING/COMBO value in `values` that `node`'s V3 schema does not allow: wrong
    type, NaN/Inf, outside min/max, not one of the options. Names the schema does not declare (`cls`) and socket
    inputs (MODEL, IMAGE, …) are the node's own business and are skipped."""
    from comfy_api.v0_0_2 import io

    declared = _schema_inputs(node)
    node_id = node.define_schema().node_id
    for name, value in values.items():
        spec = declared.get(name)
        if spec is None or (value is None and spec.optional):
            continue
        where = f"{node_id}: input {name}={quote(value)}"
        if isinstance(spec, (io.Int.Input, io.Float.Input)):
            integer = isinstance(spec, io.Int.Input)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and isinstance(value, float)):
                raise ValueError(f"{where} must be {'an integer' if integer else 'a number'}")
            # Python ints are exact at any size and compare exactly with floats; math.isfinite(10**400) would raise.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number (NaN and infinity are refused)")
            low = spec.min if spec.min is not None else -math.inf
            high = spec.max if spec.max is not None else math.inf
            if not low <= value <= high:
                raise ValueError(f"{where} is outside [{low}, {high}]; linked values are not range-checked by "
                                 "ComfyUI, so fix the node that produces it")
        elif isinstance(spec, io.Boolean.Input) and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
        elif isinstance(spec, io.String.Input) and not isinstance(value, str):
            raise ValueError(f"{where} must be a string")
        elif isinstance(spec, io.Combo.Input) and value not in spec.options:
            raise ValueError(f"{where} is not one of {quote(list(spec.options))}; pick one of them (a file list "
                             "shows its models folder: copy the file there and refresh the node list)")


def widget_check(node: type, values: Mapping[str, Any]) -> bool | str:
    """`check_inputs` as a V3 `validate_inputs` result: True, or the message ComfyUI shows when it refuses the prompt
    before running it. ComfyUI 0.3.75 passes the typed-in values here and None for linked ones (checked later, in
    `execute`); a node defines `validate_inputs` for its combos, which that ComfyUI otherwise never checks."""
    try:
        check_inputs(node, {name: value for name, value in values.items() if value is not None})
    except ValueError as err:
        return str(err)
    return True


def interrupt_poll() -> Callable[[], None]:
    """ComfyUI's interrupt check (raises InterruptProcessingException after `POST /interrupt`), for core loops that
    take a `check_interrupt` callback: core never imports comfy."""
    import comfy.model_management

    return comfy.model_management.throw_exception_if_processing_interrupted
