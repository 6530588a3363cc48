"""Request parsing and validation: JSON and multipart bodies, base64, image magic bytes, sizes; every
client mistake becomes a `RequestError` (a 4xx JSON answer).
"""
import base64
import binascii
import json
import logging
import re
import math
import types
from typing import Annotated, Any, Mapping, Optional

from duoclass.serve.settings import ServeSettings

log = logging.getLogger("duoclass")
# The image formats training reads (data.sources.IMAGE_EXTS), by their first bytes. Anything else is
# refused before Pillow sees it, so no other decoder (and no external program) ever runs on an upload.
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"P5", "ppm"), (b"P6", "ppm"),
         (b"P2", "ppm"), (b"P3", "ppm"))
SMALL_JSON = 64 * 1024  # bodies up to this size are parsed on the event loop; larger ones in a thread, bounded


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
def image_format(data: bytes) -> str | None:
    """The image format these bytes start like (a name of settings.IMAGE_FORMATS), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for m, name in MAGIC if data.startswith(m)), None)


def _sniff(data: bytes, what: str, formats: str | None = None) -> None:
    """Refuse, before any decoder sees them, bytes that are no image of the formats the server accepts."""
    if not data:
        raise RequestError(422, f"{what}: empty (0 bytes); send the image file's content", "bad_image")
    fmt = image_format(data)
    if fmt is None:
        raise RequestError(422, f"{what}: not an image (unrecognised file content); send a PNG, JPEG, GIF, BMP, "
                                "TIFF, WebP or PPM/PGM file", "bad_image")
    if formats is not None and fmt not in formats.split(","):
        raise RequestError(415, f"{what}: a {fmt.upper()} image, and this server takes {formats} (--image-formats)",
                           "unsupported_media_type")


# --- a JSON body, read with work bounded by the limits rather than by its size ------------------------------
_WS = " \t\n\r"
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
FIELDS = ("text", "texts", "image", "images", "top_k")


def bounded_json(body: bytes, max_items: int, max_chars: dict[str, int]) -> dict[str, Any]:
    """The predict body as a dict, read so that a large body costs time in proportion to what the limits allow,
    never to its size: one flat object of the known fields, whose lists hold strings and are read no further
    than max_items + 1 entries; a string longer than its field's limit (max_chars) is refused without being
    copied. Anything else is a 400/422 at once. (json.loads, or pydantic, of a 14 MB list holds the event loop,
    and every other connection, for most of a second.)"""
    try:
        s = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not valid JSON (not UTF-8 at byte {e.start}); send UTF-8 JSON",
                           "invalid_request") from None

    def syntax(i: int, what: str) -> RequestError:
        return RequestError(400, f"the body is not valid JSON ({what} at character {i}); send e.g. "
                                 "{\"text\": \"...\"} or {\"image\": \"<base64>\"}", "invalid_request")

    def skip(i: int) -> int:
        while i < len(s) and s[i] in _WS:
            i += 1
        return i

    def string(i: int, field: str, where: str) -> tuple[str, int]:
        end = s.find('"', i + 1)
        if end < 0:
            raise syntax(i, "an unterminated string")
        limit = max_chars.get(field)
        if "\\" not in s[i + 1 : end] if end - i < 4096 else s.find("\\", i + 1, end) < 0:  # no escapes: a slice
            if limit is not None and end - i - 1 > limit:
                raise RequestError(422, f"{where}: {end - i - 1:,} characters; at most {limit:,} (the server's limit)",
                                   "too_large" if field.startswith("image") else "invalid_request")
            return s[i + 1 : end], end + 1
        try:
            value, j = json.decoder.scanstring(s, i + 1)
        except json.JSONDecodeError as e:
            raise syntax(e.pos, e.msg.lower()) from None
        if limit is not None and len(value) > limit:
            raise RequestError(422, f"{where}: {len(value):,} characters; at most {limit:,} (the server's limit)",
                               "too_large" if field.startswith("image") else "invalid_request")
        return value, j

    def scalar(i: int, where: str) -> tuple[Any, int]:
        m = _SCALAR.match(s, i)
        if not m:
            raise RequestError(422, f"{where}: expected a string, a number or a list of strings", "invalid_request") \
                if i < len(s) and s[i] in "{[" else syntax(i, "an unexpected character")
        return json.loads(m.group()), m.end()

    i = skip(0)
    if i >= len(s) or s[i] != "{":
        raise RequestError(422, "the body must be a JSON object, e.g. {\"text\": \"...\"}", "invalid_request")
    out: dict[str, Any] = {}
    i = skip(i + 1)
    if i < len(s) and s[i] == "}":
        return out
    while True:
        if i >= len(s) or s[i] != '"':
            raise syntax(i, "expected a field name")
        key, i = string(i, "", "a field name")
        if key not in FIELDS:
            raise RequestError(422, f"{key[:40]}: unknown field; send one of text, texts, image, images (and optionally "
                                    "top_k)", "invalid_request")
        i = skip(i)
        if i >= len(s) or s[i] != ":":
            raise syntax(i, "expected ':'")
        i = skip(i + 1)
        if i < len(s) and s[i] == '"':
            out[key], i = string(i, key, key)
        elif i < len(s) and s[i] == "[":
            items: list[Any] = []
            i = skip(i + 1)
            if i < len(s) and s[i] == "]":
                i += 1
            while i < len(s) and s[i - 1] != "]":
                where = f"{key}[{len(items)}]"
                if len(items) == max_items:
                    raise RequestError(422, f"{key}: more than {max_items} items; at most {max_items} per request "
                                            "(--max-items)", "invalid_request")
                if s[i] != '"':
                    raise RequestError(422, f"{where}: expected a string", "invalid_request")
                value, i = string(i, key, where)
                items.append(value)
                i = skip(i)
                if i < len(s) and s[i] in ",]":
                    i = skip(i + 1) if s[i] == "," else i + 1
                else:
                    raise syntax(i, "expected ',' or ']'")
            out[key] = items
        else:
            out[key], i = scalar(i, key)
        i = skip(i)
        if i < len(s) and s[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(s) and s[i] == "}":
            break
        raise syntax(i, "expected ',' or '}'")
    if skip(i + 1) != len(s):
        raise syntax(skip(i + 1), "extra data after the object")
    return out


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


def b64_chars(settings: ServeSettings) -> int:
    """The longest base64 text of an image within --max-image-bytes (with room for a data: URL prefix)."""
    return math.ceil(settings.max_image_bytes / 3) * 4 + 256


def _schemas(settings: ServeSettings) -> Any:
    """The pydantic models of the API (built per app: their limits are the app's settings)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    b64_chars_ = b64_chars(settings)
    text_field = Field(None, max_length=settings.max_text_chars, description="one text to classify")
    image_field = Field(None, min_length=1, max_length=b64_chars_, description="one image file, base64 (or a data: URL)")

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
        images: list[Annotated[str, Field(min_length=1, max_length=b64_chars_)]] = Field(  # type: ignore[assignment]
            None, min_length=1, max_length=settings.max_items, description="several base64 images")
        top_k: int = Field(1, ge=1, le=1000, strict=False, description="how many labels to return per item, best first")

        @field_validator("top_k", mode="before")
        @classmethod
        def _whole_number(cls, v: Any) -> Any:  # 3 and 3.0 are the same JSON integer; "3", true and 3.5 are not
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError("Input should be a valid integer")
            return int(v)

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
