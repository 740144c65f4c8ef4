"""OpenAI chat-completion requests -> what the model takes (messages with image markers, PIL images,
generation settings), and the errors OpenAI's API gives for bad ones (APIError: status, message,
type, param).

Images come as `image_url` content parts: `data:` URLs (base64 PNG, JPEG or WebP) always; `file://`
paths only with `allow_local`; `http(s)` only with `allow_remote`, fetched with a timeout and a size
limit. An image over the size limit is 413; bytes that are not an image or not valid base64 are 400.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from multimodal.conversation import IMAGE_MARKER

ROLES = ("system", "user", "assistant")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class APIError(Exception):
    """An error for the client, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImagePolicy:
    allow_local: bool = False
    allow_remote: bool = False
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    images: list[Image.Image]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False


def _decode_image(data: bytes, policy: ImagePolicy, where: str) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise APIError(413, f"{where}: the image has {len(data)} bytes, over the limit of {policy.max_bytes}",
                       param="messages")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise APIError(400, f"{where}: {image.format} images are not accepted; send PNG, JPEG or WebP",
                               param="messages")
            image.load()
            return image.convert("RGB")
    except APIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise APIError(400, f"{where}: the bytes are not a readable image ({error})", param="messages") from None


def load_image_url(url: str, policy: ImagePolicy, where: str) -> Image.Image:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{where}: a data URL must be base64 (data:image/png;base64,...)", param="messages")
        if len(payload) > policy.max_bytes * 4 // 3 + 4:
            raise APIError(413, f"{where}: the image is over the limit of {policy.max_bytes} bytes", param="messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the data URL", param="messages") from None
        return _decode_image(data, policy, where)
    scheme = urlparse(url).scheme
    if scheme == "file":
        if not policy.allow_local:
            raise APIError(400, f"{where}: file:// images are refused (start the server with --allow-local-images)",
                           param="messages")
        try:
            with open(unquote(urlparse(url).path), "rb") as file:
                data = file.read(policy.max_bytes + 1)
        except OSError as error:
            raise APIError(400, f"{where}: cannot read {url}: {error.strerror}", param="messages") from None
        return _decode_image(data, policy, where)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise APIError(400, f"{where}: remote images are refused (start the server with --allow-remote-images)",
                           param="messages")
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:  # noqa: S310 - allowed by flag
                data = response.read(policy.max_bytes + 1)
        except OSError as error:
            raise APIError(400, f"{where}: cannot fetch {url}: {error}", param="messages") from None
        return _decode_image(data, policy, where)
    raise APIError(400, f"{where}: unsupported image URL scheme {scheme or url[:16]!r}", param="messages")


def _content(message: dict[str, Any], index: int, policy: ImagePolicy, images: list[Image.Image]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts", param="messages")
    pieces = []
    for number, part in enumerate(content):
        where = f"messages[{index}].content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise APIError(400, f"{where}: image_url needs a url", param="messages")
            images.append(load_image_url(url, policy, where))
            pieces.append(IMAGE_MARKER)
        else:
            raise APIError(400, f"{where}: parts are text or image_url, got {kind!r}", param="messages")
    return "\n".join(pieces)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", param=name)
    return float(value)


def parse_chat_request(body: Any, policy: ImagePolicy, default_max_tokens: int = 256) -> ChatRequest:
    """The request's messages (image parts become image markers, in order), images and settings;
    APIError for what OpenAI's API would refuse."""
    if not isinstance(body, dict):
        raise APIError(422, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(422, "messages must be a non-empty list", param="messages")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    images: list[Image.Image] = []
    converted = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"messages[{index}] needs a role among {ROLES}", param="messages")
        converted.append({"role": message["role"], "content": _content(message, index, policy, images)})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", param="stream")
    return ChatRequest(converted, images, max_tokens, _number(body, "temperature", 1.0, 0.0, 2.0),
                       _number(body, "top_p", 1.0, 0.0, 1.0), seed, stop, stream)
