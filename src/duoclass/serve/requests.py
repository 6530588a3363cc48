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
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Sequence

from duoclass.serve.settings import ServeSettings

log = logging.getLogger("duoclass")
# The image formats training reads (data.sources.IMAGE_EXTS), by their first bytes. Anything else is
# refused before Pillow sees it, so no other decoder (and no external program) ever runs on an upload.
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"P5", "ppm"), (b"P6", "ppm"),
         (b"P2", "ppm"), (b"P3", "ppm"))
SMALL_JSON = 64 * 1024  # bodies up to this size are parsed on the event loop; larger ones in a thread, bounded
EXPLAIN_METHODS = ("auto", "gradcam", "gradcam++", "occlusion", "ig")  # infer.explain.METHODS, without importing it
MAX_TARGET_CHARS = 200


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
@dataclass(frozen=True)
class BodySpec:
    """What one route's body holds besides its items (predict: top_k; explain: method and target): the pydantic
    model of its JSON form, each option's parser for a multipart field (its string -> the value, or a RequestError),
    and the most items it takes with the flag that sets it. The routes share one body parser (app.read_items)."""

    model: Any
    options: Mapping[str, Callable[[str], Any]]
    max_items: int
    flag: str

    @property
    def fields(self) -> tuple[str, ...]:
        return ("text", "texts", "image", "images", *self.options)

    def hint(self) -> str:
        """How the optional fields read in a message: "top_k", "method and target"."""
        return " and ".join(self.options)


def parse_top_k(value: str) -> int:
    try:
        top_k = int(value)
    except ValueError:
        raise RequestError(422, f"top_k: got {value[:20]!r}; send a whole number >= 1", "invalid_request") from None
    if top_k < 1:
        raise RequestError(422, f"top_k: got {top_k}; send a whole number >= 1", "invalid_request")
    return top_k


def parse_method(value: str) -> str:
    if value not in EXPLAIN_METHODS:
        raise RequestError(422, f"method: got {value[:20]!r}; choose one of {', '.join(EXPLAIN_METHODS)}",
                           "invalid_request")
    return value


def parse_target(value: str) -> str:
    if not value or len(value) > MAX_TARGET_CHARS:
        raise RequestError(422, f"target: {len(value)} characters; send a class name (1 to {MAX_TARGET_CHARS})",
                           "invalid_request")
    return value


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
_WS = re.compile(r"[ \t\n\r]*")
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
FIELDS = ("text", "texts", "image", "images", "top_k")


def bounded_json(body: bytes, max_items: int, max_chars: dict[str, int], fields: Sequence[str] = FIELDS,
                 flag: str = "--max-items") -> dict[str, Any]:
    """The predict body as a dict, read so that a large body costs time in proportion to what the limits allow,
    never to its size: one flat object of the known fields, whose lists hold strings and are read no further
    than max_items + 1 entries; a string longer than its field's limit (max_chars) is refused without being
    copied. Anything else is a 400/422 at once. (json.loads, or pydantic, of a 14 MB list holds the event loop,
    and every other connection, for most of a second.) `fields`: the body's known fields; `flag`: the setting
    that sets max_items, for the message."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not valid JSON (not UTF-8 at byte {e.start}); send UTF-8 JSON",
                           "invalid_request") from None
    return _JsonReader(text, max_items, max_chars, tuple(fields), flag).body()


class _JsonReader:
    """The reader of `bounded_json`: `i` is the position in `s`, each method reads one thing from there."""

    def __init__(self, s: str, max_items: int, max_chars: dict[str, int], fields: tuple[str, ...] = FIELDS,
                 flag: str = "--max-items"):
        self.s, self.i, self.max_items, self.max_chars = s, 0, max_items, max_chars
        self.fields, self.flag = fields, flag

    def syntax(self, what: str) -> RequestError:
        return RequestError(400, f"the body is not valid JSON ({what} at character {self.i}); send e.g. "
                                 "{\"text\": \"...\"} or {\"image\": \"<base64>\"}", "invalid_request")

    def at(self, chars: str) -> bool:
        """Skip white space; whether the next character is one of `chars`."""
        self.i = _WS.match(self.s, self.i).end()  # type: ignore[union-attr]
        return self.i < len(self.s) and self.s[self.i] in chars

    def expect(self, char: str, what: str) -> None:
        if not self.at(char):
            raise self.syntax(what)
        self.i += 1

    def string(self, field: str, where: str) -> str:
        s, i = self.s, self.i
        end = s.find('"', i + 1)
        if end < 0:
            raise self.syntax("an unterminated string")
        limit = self.max_chars.get(field)
        if s.find("\\", i + 1, end) < 0:  # no escapes: the string is the slice, and its length is known uncopied
            self.too_long(field, where, end - i - 1, limit)
            self.i = end + 1
            return s[i + 1 : end]
        try:
            value, self.i = json.decoder.scanstring(s, i + 1)
        except json.JSONDecodeError as e:
            self.i = e.pos
            raise self.syntax(e.msg.lower()) from None
        self.too_long(field, where, len(value), limit)
        return value

    @staticmethod
    def too_long(field: str, where: str, n: int, limit: int | None) -> None:
        if limit is not None and n > limit:
            raise RequestError(422, f"{where}: {n:,} characters; at most {limit:,} (the server's limit)",
                               "too_large" if field.startswith("image") else "invalid_request")

    def strings(self, key: str) -> list[str]:
        """A list of strings, refused at its entry max_items + 1."""
        self.i += 1  # the [
        items: list[str] = []
        if self.at("]"):
            self.i += 1
            return items
        while True:
            if len(items) == self.max_items:
                raise RequestError(422, f"{key}: more than {self.max_items} items; at most {self.max_items} per "
                                        f"request ({self.flag})", "invalid_request")
            if not self.at('"'):
                raise RequestError(422, f"{key}[{len(items)}]: expected a string", "invalid_request")
            items.append(self.string(key, f"{key}[{len(items)}]"))
            if self.at("]"):
                self.i += 1
                return items
            self.expect(",", "expected ',' or ']'")

    def value(self, key: str) -> Any:
        if self.at('"'):
            return self.string(key, key)
        if self.at("["):
            return self.strings(key)
        if self.at("{"):
            raise RequestError(422, f"{key}: expected a string, a number or a list of strings", "invalid_request")
        m = _SCALAR.match(self.s, self.i)
        if not m:
            raise self.syntax("an unexpected character")
        self.i = m.end()
        return json.loads(m.group())

    def body(self) -> dict[str, Any]:
        if not self.at("{"):
            raise RequestError(422, "the body must be a JSON object, e.g. {\"text\": \"...\"}", "invalid_request")
        self.i += 1
        out: dict[str, Any] = {}
        if self.at("}"):
            self.i += 1
        else:
            while True:
                if not self.at('"'):
                    raise self.syntax("expected a field name")
                key = self.string("", "a field name")
                if key not in self.fields:
                    raise RequestError(422, f"{key[:40]}: unknown field; send one of text, texts, image, images "
                                            f"(and optionally {' and '.join(self.fields[4:])})", "invalid_request")
                self.expect(":", "expected ':'")
                out[key] = self.value(key)
                if self.at("}"):
                    self.i += 1
                    break
                self.expect(",", "expected ',' or '}'")
        if _WS.match(self.s, self.i).end() != len(self.s):  # type: ignore[union-attr]
            raise self.syntax("extra data after the object")
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


def _validation_message(errors: list[dict[str, Any]], options: str = "top_k", items_flag: str = "--max-items"
                        ) -> tuple[int, str]:
    """(status, one line) for pydantic errors: 400 for a body that is not JSON, else 422 naming each field.
    `options`: the body's optional fields, as a message names them; `items_flag`: the setting of its item limit."""
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        why = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return 400, f"the body is not valid JSON ({why}); send e.g. {{\"text\": \"...\"}} or {{\"image\": \"<base64>\"}}"
    limits = {"string_too_long": {"text": "--max-text-chars", "texts": "--max-text-chars", "image": "--max-image-bytes",
                                  "images": "--max-image-bytes"},
              "too_long": {"texts": items_flag, "images": items_flag}}
    parts = []
    for e in errors[:5]:
        loc = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(e.get("loc", ())))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = f"unknown field; send one of text, texts, image, images (and optionally {options})"
        flag = limits.get(e.get("type", ""), {}).get(str((e.get("loc") or ("",))[0]))
        if flag:
            msg += f" (the server's limit, {flag})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


def b64_chars(settings: ServeSettings) -> int:
    """The longest base64 text of an image within --max-image-bytes (with room for a data: URL prefix)."""
    return math.ceil(settings.max_image_bytes / 3) * 4 + 256


# Long on purpose: every pydantic model of the API in one place, its limits beside the settings they come from.
def _schemas(settings: ServeSettings) -> Any:
    """The pydantic models of the API (built per app: their limits are the app's settings)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

    b64_chars_ = b64_chars(settings)
    text_field = Field(None, max_length=settings.max_text_chars, description="one text to classify")
    image_field = Field(None, min_length=1, max_length=b64_chars_, description="one image file, base64 (or a data: URL)")

    def inputs(max_items: int) -> Any:
        """The items of a body: exactly one of text, texts (text models) or image, images (image models)."""

        class Inputs(BaseModel):
            # The fields are typed without null (a JSON null is refused) and default to None, meaning "not sent";
            # the schema's oneOf says what the validator below checks.
            model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
                "oneOf": [{"required": [k]} for k in ("text", "texts", "image", "images")]})
            text: str = text_field  # type: ignore[assignment]
            texts: list[Annotated[str, Field(max_length=settings.max_text_chars)]] = Field(  # type: ignore[assignment]
                None, min_length=1, max_length=max_items, description="several texts")
            image: str = image_field  # type: ignore[assignment]
            images: list[Annotated[str, Field(min_length=1, max_length=b64_chars_)]] = Field(  # type: ignore[assignment]
                None, min_length=1, max_length=max_items, description="several base64 images")

            @model_validator(mode="after")
            def _one_input(self) -> Any:
                given = [k for k in ("text", "texts", "image", "images") if getattr(self, k) is not None]
                if len(given) != 1:
                    raise ValueError("send exactly one of text, texts, image, images" +
                                     (f" (got {', '.join(given)})" if given else ""))
                return self

        return Inputs

    class PredictRequest(inputs(settings.max_items)):  # type: ignore[misc]
        """Exactly one of text, texts (text models) or image, images (image models)."""

        top_k: int = Field(1, ge=1, le=1000, strict=False, description="how many labels to return per item, best first")

        @field_validator("top_k", mode="before")
        @classmethod
        def _whole_number(cls, v: Any) -> Any:  # 3 and 3.0 are the same JSON integer; "3", true and 3.5 are not
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError("Input should be a valid integer")
            return int(v)

    class ExplainRequest(inputs(settings.max_explain_items)):  # type: ignore[misc]
        """Exactly one of text, texts (text models) or image, images (image models); optionally the method and the
        class to explain."""

        method: Literal[EXPLAIN_METHODS] = Field(  # type: ignore[valid-type]
            "auto", description="auto: Grad-CAM for CNN image models, integrated gradients for transformer text "
                                "models, occlusion otherwise (the only method the onnx backends have)")
        target: str = Field(None, min_length=1, max_length=MAX_TARGET_CHARS,  # type: ignore[assignment]
                            description="the class to explain (default: each item's predicted label)")

    class Score(BaseModel):
        label: str
        score: float

    class ItemResult(BaseModel):
        label: str = Field(description="the predicted class, or \"abstained\" when `abstained` is true")
        score: float = Field(description="the calibrated probability of the most probable class")
        abstained: bool = Field(description="true when the top probability is under the server's --abstain-below: "
                                            "then `label` is \"abstained\", never a class")
        set: Optional[list[str]] = Field(None, description="the conformal prediction set (classes, most probable first) "
                                                           "when the model has a conformal calibration; holds the true "
                                                           "class with the model card's promised probability")
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

    class Token(BaseModel):
        text: str
        start: int = Field(description="where the word or token starts in the text (in Unicode code points)")
        end: int
        score: float = Field(description="its attribution: > 0 speaks for the target class, < 0 against it")

    class Explanation(BaseModel):
        label: Optional[str] = Field(description="the predicted class (null when the item failed)")
        target: Optional[str] = Field(description="the class explained: `target` when sent, else `label`")
        score: Optional[float] = Field(description="the calibrated probability of the target class")
        method: str = Field(description="the method used (auto resolved): gradcam, gradcam++, occlusion or ig")
        error: Optional[str] = Field(description="why this item has no explanation (it could not be read), or null")
        heatmap_png: Optional[str] = Field(None, description="images: base64 PNG (RGBA) of the attributions at the "
                                                             "model's input size, to lay over the image")
        attributions: Optional[list[list[float]]] = Field(None, description="images: the attribution map, rows of "
                                                                            "the model's input size, 4 digits")
        tokens: Optional[list[Token]] = Field(None, description="texts: each word or token with its attribution")

    class ExplainResponse(BaseModel):
        model: str
        explanations: list[Explanation] = Field(description="one per item, in request order")
        latency_ms: float = Field(description="time in the server, waiting for the explanation pool included")

    return types.SimpleNamespace(PredictRequest=PredictRequest, PredictResponse=PredictResponse, ErrorBody=ErrorBody,
                                 ExplainRequest=ExplainRequest, ExplainResponse=ExplainResponse)


def _content_length(content_length: Optional[str]) -> Optional[int]:
    if content_length is None:
        return None
    try:
        return int(content_length)
    except ValueError:
        return None
