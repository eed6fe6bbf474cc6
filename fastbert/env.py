"""The one rule for fastbert's boolean environment switches (FASTBERT_NO_EXT, FASTBERT_PLANS, ...).

No imports beyond the standard library: setup.py loads this file by path, before torch or the package
can be imported. docs/configuration.md lists every switch.
"""
from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def parse_flag(name: str, value: str) -> bool:
    """`value` of the variable `name` as a boolean (case and surrounding spaces ignored); ValueError naming
    both and the accepted spellings for anything else, so a typo never silently means the default."""
    word = value.strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean: use one of {', '.join(TRUE)} (on) or "
                     f"{', '.join(FALSE[:-1])} or an empty value (off)")


def flag(name: str, default: bool = False) -> bool:
    """The boolean environment variable `name`; `default` when it is unset."""
    value = os.environ.get(name)
    return default if value is None else parse_flag(name, value)
