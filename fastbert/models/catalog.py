"""Every native class under transformers' name (fastbert.RobertaModel, DistilBertForMaskedLM, ...).

Built from the family table: each family's base model and each transformers head it has. BERT's come
from fastbert.models.bert. Decoder heads (RobertaForCausalLM, ...) are here too; a decoder config
runs transformers' forward through the plain path, with one warning.
"""
from __future__ import annotations

from fastbert.models import bert, modernbert
from fastbert.models.families import FAMILIES
from fastbert.models.native import native_base_class, native_head_class


def _family_classes(family) -> dict[str, type]:
    if family.model_type == "bert":
        names = [family.class_prefix + suffix for suffix in ("Model", *family.heads)]
        return {name: getattr(bert, name) for name in names}
    classes = {family.base.__name__: native_base_class(family)}
    for suffix in family.heads:
        head = native_head_class(family.hf_class(suffix))
        classes[head.__name__] = head
    return classes


CLASSES: dict[str, type] = {name: cls for family in FAMILIES for name, cls in _family_classes(family).items()}
CLASSES.update(modernbert.CLASSES)  # the second layer type (fastbert/models/modernbert.py)
globals().update(CLASSES)


def native_class(model_type: str, suffix: str) -> type:
    """fastbert's class for a config.model_type and a transformers suffix ("Model", "ForMaskedLM", ...)."""
    from fastbert.models.families import family_of_model_type

    if model_type == "modernbert":
        return modernbert.native_class(suffix)
    family = family_of_model_type(model_type)
    name = family.class_prefix + suffix
    if name not in CLASSES:
        raise ValueError(f"fastbert has no {name}: {family.name} models have {', '.join(family.heads)} heads")
    return CLASSES[name]
