"""Request parsing and validation: JSON and multipart bodies, base64, image magic bytes, sizes; every
client mistake becomes a `RequestError` (a 4xx JSON answer).
"""
import base64
import binascii
import logging
import math
import types
from typing import Annotated, Any, Mapping, Optional

from duoclass.serve.settings import ServeSettings

log = logging.getLogger("duoclass")
# The image formats training reads (data.sources.IMAGE_EXTS), by their first bytes. Anything else is
# refused before Pillow sees it, so no other decoder (and no external program) ever runs on an upload.
MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
         (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"P5", "PGM"), (b"P6", "PPM"),
         (b"P2", "PGM"), (b"P3", "PPM"))


class RequestError(Exception):
    """A request the server will not answer with a prediction: HTTP status, one-line message, metrics kind."""

    def __init__(self, status: int, message: str, kind: str, headers: Mapping[str, str] | None = None,
                 items: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.headers = dict(headers or {})
        self.items = items

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.items is not None:
            out["items"] = self.items
        return out


# --- request parsing --------------------------------------------------------------------------
def _sniff(data: bytes, what: str) -> None:
    if not data:
        raise RequestError(422, f"{what}: empty (0 bytes); send the image file's content", "bad_image")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return
    if not any(data.startswith(m) for m, _ in MAGIC):
        raise RequestError(422, f"{what}: not an image (unrecognised file content); send a PNG, JPEG, GIF, BMP, "
                                "TIFF, WebP or PPM/PGM file", "bad_image")


def _b64(s: str, what: str, limit: int) -> bytes:
    if s.startswith("data:"):  # a data URL, as a browser's FileReader makes
        head, _, s = s.partition(",")
        if ";base64" not in head:
            raise RequestError(422, f"{what}: a data URL must be base64 (data:image/png;base64,...)", "bad_image")
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{what}: not valid base64; encode the image file's bytes with standard base64",
                           "bad_image") from None
    if len(data) > limit:
        raise RequestError(413, f"{what}: {len(data):,} bytes; at most {limit:,} per image (--max-image-bytes)", "too_large")
    return data


def _validation_message(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """(status, one line) for pydantic errors: 400 for a body that is not JSON, else 422 naming each field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        why = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return 400, f"the body is not valid JSON ({why}); send e.g. {{\"text\": \"...\"}} or {{\"image\": \"<base64>\"}}"
    limits = {"string_too_long": {"text": "--max-text-chars", "texts": "--max-text-chars", "image": "--max-image-bytes",
                                  "images": "--max-image-bytes"},
              "too_long": {"texts": "--max-items", "images": "--max-items"}}
    parts = []
    for e in errors[:5]:
        loc = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(e.get("loc", ())))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field; send one of text, texts, image, images (and optionally top_k)"
        flag = limits.get(e.get("type", ""), {}).get(str((e.get("loc") or ("",))[0]))
        if flag:
            msg += f" (the server's limit, {flag})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def _schemas(settings: ServeSettings) -> Any:
    """The pydantic models of the API (built per app: their limits are the app's settings)."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    b64_chars = math.ceil(settings.max_image_bytes / 3) * 4 + 256  # room for a data: URL prefix and line breaks
    text_field = Field(None, max_length=settings.max_text_chars, description="one text to classify")
    image_field = Field(None, max_length=b64_chars, description="one image file, base64 (or a data: URL)")

    class PredictRequest(BaseModel):
        """Exactly one of text, texts (text models) or image, images (image models)."""

        # The fields are typed without null (a JSON null is refused) and default to None, meaning "not sent";
        # the schema's oneOf says what the validator below checks.
        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
            "oneOf": [{"required": [k]} for k in ("text", "texts", "image", "images")]})
        text: str = text_field  # type: ignore[assignment]
        texts: list[Annotated[str, Field(max_length=settings.max_text_chars)]] = Field(  # type: ignore[assignment]
            None, min_length=1, max_length=settings.max_items, description="several texts")
        image: str = image_field  # type: ignore[assignment]
        images: list[Annotated[str, Field(max_length=b64_chars)]] = Field(  # type: ignore[assignment]
            None, min_length=1, max_length=settings.max_items, description="several base64 images")
        top_k: int = Field(1, ge=1, le=1000, description="how many labels to return per item, best first")

        @model_validator(mode="after")
        def _one_input(self) -> "PredictRequest":
            given = [k for k in ("text", "texts", "image", "images") if getattr(self, k) is not None]
            if len(given) != 1:
                raise ValueError("send exactly one of text, texts, image, images" +
                                 (f" (got {', '.join(given)})" if given else ""))
            return self

    class Score(BaseModel):
        label: str
        score: float

    class ItemResult(BaseModel):
        label: str
        score: float = Field(description="the probability of `label`")
        top_k: list[Score] = Field(description="the top_k labels with their probabilities, best first")
        warning: Optional[str] = Field(None, description="why the label is only a guess (e.g. no known word), or null")

    class PredictResponse(BaseModel):
        model: str
        predictions: list[ItemResult] = Field(description="one per item, in request order")
        latency_ms: float = Field(description="time in the server, queueing and batching included")

    class ItemError(BaseModel):
        index: int
        error: str

    class ErrorBody(BaseModel):
        error: str = Field(description="what went wrong and how to fix it")
        items: Optional[list[ItemError]] = Field(None, description="the failing items of a prediction request")

    return types.SimpleNamespace(PredictRequest=PredictRequest, PredictResponse=PredictResponse, ErrorBody=ErrorBody)


def _content_length(content_length: Optional[str]) -> Optional[int]:
    if content_length is None:
        return None
    try:
        return int(content_length)
    except ValueError:
        return None
