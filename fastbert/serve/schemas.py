"""Request bodies, in TEI's shapes (and OpenAI's for /v1/embeddings). Pydantic checks the types;
checks it cannot express (empty input, pair shapes) raise FieldError naming the field."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Direction = Literal["Right", "Left", "right", "left"]


class FieldError(ValueError):
    """A request field with a valid type but an unusable value (answered 422, naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"`{field}`: {message}")
        self.field = field


class _Truncating(BaseModel):
    truncate: bool | None = None  # None: the server's --auto-truncate (TEI)
    truncation_direction: Direction = "Right"


class EmbedRequest(_Truncating):
    inputs: str | list[str]
    normalize: bool = True  # TEI's default, whether or not the pipeline has a Normalize module
    prompt_name: str | None = None  # a key of config_sentence_transformers.json's "prompts"
    dimensions: int | None = Field(None, ge=1)


class OpenAIEmbeddingsRequest(BaseModel):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class RerankRequest(_Truncating):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False


class PredictRequest(_Truncating):
    # TEI's untagged shapes: a text, a [text, text] pair, or a list of texts and pairs
    inputs: str | list[str | list[str]]
    raw_scores: bool = False


class TokenizeRequest(BaseModel):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


def text_list(field: str, value: str | list[str]) -> list[str]:
    """A string or a non-empty list of non-empty strings, as a list."""
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise FieldError(field, "must not be empty")
    for index, text in enumerate(texts):
        if not text:
            raise FieldError(field if isinstance(value, str) else f"{field}[{index}]", "must not be an empty string")
    return texts


def predict_inputs(value) -> tuple[list, bool]:
    """(texts or pairs, whether the request was a batch), read as TEI reads `inputs`."""
    if isinstance(value, str) or (len(value) == 2 and all(isinstance(part, str) for part in value)):
        single = value if isinstance(value, str) else tuple(value)
        _check_sequence("inputs", single)
        return [single], False
    if not value:
        raise FieldError("inputs", "must not be empty")
    batch = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            if len(item) != 2:
                raise FieldError(f"inputs[{index}]", f"a pair has 2 texts, got {len(item)}")
            item = tuple(item)
        _check_sequence(f"inputs[{index}]", item)
        batch.append(item)
    return batch, True


def _check_sequence(field: str, sequence) -> None:
    parts = [sequence] if isinstance(sequence, str) else sequence
    if any(not part for part in parts):
        raise FieldError(field, "must not be an empty string")

