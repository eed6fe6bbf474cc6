"""Shared constants of the reliability tests."""
import fastbert

# Backends that run on CPU tensors here: "torch" always, "cpp" when fastbert._C is built.
CPU_BACKENDS = [name for name in ("torch", "cpp") if fastbert.available_backends()[name] is True]
