"""Field types shared by the OpenAI and Anthropic request schemas.

Both protocols carry text either as a plain string or as a list of `{"type": "text", "text": ...}`
parts/blocks, and both take a list of stop strings. Keeping these here gives the two schemas identical
rules (and identical error messages) for them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

MAX_STOP_SEQUENCES = 16


class TextBlock(BaseModel):
    """A `{"type": "text", "text": ...}` content part (OpenAI) or block (Anthropic).

    Any other type (images, audio, documents, tool use/results, thinking) fails validation.
    """

    model_config = ConfigDict(extra="ignore")  # e.g. Anthropic's cache_control, citations

    type: Literal["text"]
    text: str


def joined_text(content: str | list[TextBlock] | None) -> str:
    """The text of a string or a list of text blocks, blocks joined with newlines; `None` is empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(block.text for block in content)


def _check_stop_sequences(stops: list[str]) -> list[str]:
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must be non-empty strings")
    return stops


StopSequences = Annotated[list[str], AfterValidator(_check_stop_sequences)]
