"""Print the installed fastbert's base requirements pinned to their declared lower bounds.

CI installs these into a venv beside the newest releases and runs the model tests on them, so a
lower bound in setup.py is one that ran. torch and triton are left out: CI's torch is the pinned CPU
build, and their lower bounds are the GPU machine's versions (scripts/gpu_validation.sh runs there).
"""
from __future__ import annotations

import importlib.metadata
import re

SKIPPED = {"torch", "triton"}


def lower_bound_pins() -> list[str]:
    pins = []
    for requirement in importlib.metadata.requires("fastbert") or []:
        if ";" in requirement and "extra ==" in requirement:
            continue
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        if match and match.group(1).lower() not in SKIPPED:
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


if __name__ == "__main__":
    print(" ".join(lower_bound_pins()))
