"""Lets mutmut score `nodes/` (docs/mutation.md).

Why: mutmut names and switches a mutant by the mutated file's path (`nodes.injection.x_apply__mutmut_3`) and its
trampoline compares that name with the running function's ``__module__``. The tests import the pack the way ComfyUI
does, as a package named after its folder, so the node modules run as ``<pack>.nodes.injection``: without this bridge
no mutant of `nodes/` is ever switched on, and no test is ever recorded as reaching one. `scripts/mutation.sh` sets
``PAINTERNET_MUTATION=1``; `tests/conftest.py` then calls :func:`bridge_pack_names`. Pinned to mutmut 3.8.1's
trampoline module (requirements-dev.txt); a mutmut without these names fails the run loudly instead of scoring 0.
"""
from __future__ import annotations


def bridge_pack_names(pack: str) -> None:
    """Translate between mutmut's path names (`nodes.…`) and the pack's runtime names (`<pack>.nodes.…`): the active
    mutant's name gets the pack prefix before the trampoline compares it, and recorded hits lose it."""
    from mutmut.mutation import trampoline

    if getattr(trampoline, "_painternet_bridged", None) == pack:
        return
    active_name = trampoline.get_mutant_under_test
    record_hit = trampoline.record_trampoline_hit
    prefix = pack + "."

    def path_name(name: str | None) -> str | None:
        return name[len(prefix):] if name is not None and name.startswith(prefix) else name

    def mutant_under_test() -> str:
        name = active_name()
        return prefix + name if name.startswith("nodes.") else name

    def record_trampoline_hit(name: str, caller: str | None = None) -> None:
        record_hit(path_name(name), caller=path_name(caller))

    trampoline.get_mutant_under_test = mutant_under_test
    trampoline.record_trampoline_hit = record_trampoline_hit
    trampoline._painternet_bridged = pack
