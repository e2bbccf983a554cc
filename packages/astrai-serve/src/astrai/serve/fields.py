"""Field types shared by the OpenAI and Anthropic request schemas.

Both protocols carry text either as a plain string or as a list of `{"type": "text", "text": ...}`
parts/blocks, and both take a list of stop strings. Keeping these here gives the two schemas identical
rules (and identical error messages) for them.

Like the official APIs, the schemas are strict (`STRICT`): `"max_tokens": "4"`, `"max_tokens": true` and
`"stream": "yes"` are refused rather than coerced (an integer is still accepted where a number is asked
for). Text must be valid Unicode: JSON can carry a lone surrogate (`"\\ud800"`), which no tokenizer can
encode, so `Text` refuses it with a message that says so. Counts are bounded by `MAX_COUNT`, the largest
value the engine holds in its int32 tensors.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from astrai.inference.task import MAX_COUNT  # the largest top_k / max_tokens the engine holds

MAX_STOP_SEQUENCES = 16

# Schema config shared by every request model: unknown fields ignored (clients send many optional ones),
# no NaN/inf, no coercion of strings or booleans into numbers and vice versa.
STRICT = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


def _check_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"the text contains a lone surrogate (\\u{ord(bad):04x}) at character {exc.start}; "
            "text must be valid Unicode (surrogates only in pairs)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_check_unicode)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
TopK = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class TextBlock(BaseModel):
    """A `{"type": "text", "text": ...}` content part (OpenAI) or block (Anthropic).

    Any other type (images, audio, documents, tool use/results, thinking) fails validation.
    """

    model_config = STRICT  # unknown fields: e.g. Anthropic's cache_control, citations

    type: Literal["text"]
    text: Text


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


StopSequences = Annotated[list[Text], AfterValidator(_check_stop_sequences)]
