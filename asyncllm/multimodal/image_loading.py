"""Images from callers, safely: inline `data:` URLs, bytes or PIL images, never a fetched URL.

A server that fetched `image_url`s would make requests on a client's behalf, into its own
network (SSRF): remote and file URLs are refused with the rule named, as are images whose
encoded size or pixel count passes the caps (checked from the header, before decoding, so a
decompression bomb costs nothing). Chat messages' image parts are split from their text here,
so templates see transformers' `{"type": "image"}` parts.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from asyncllm.errors import InvalidRequestError

MAX_IMAGE_BYTES = 20 * 2**20  # OpenAI's per-image limit
MAX_IMAGE_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

_DATA_URL_RULE = ("images are taken only inline, as data: URLs (data:image/png;base64,...); remote and file "
                  "URLs are never fetched (that would let a request reach the server's network: SSRF)")


def decode_data_url(url: str, param: str) -> bytes:
    if not url.startswith("data:"):
        raise InvalidRequestError(f"{param}: {_DATA_URL_RULE}", param=param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.startswith("image/") or not header.endswith(";base64"):
        raise InvalidRequestError(f"{param}: a data: URL must be data:image/<format>;base64,<data>", param=param)
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequestError(f"{param}: the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{param}: the data: URL is not valid base64", param=param) from None


def load_image(source: Any, param: str):
    """A caller's image (PIL image, encoded bytes, or a data: URL) → an RGB PIL image within the caps."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        _check_pixels(source.size, param)
        return source.convert("RGB")
    if isinstance(source, str):
        source = decode_data_url(source, param)
    if not isinstance(source, (bytes, bytearray)):
        raise InvalidRequestError(f"{param}: an image must be a data: URL, bytes or a PIL image, "
                                  f"not {type(source).__name__}", param=param)
    if len(source) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(f"{param}: the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB", param=param)
    try:
        image = Image.open(io.BytesIO(source), formats=FORMATS)
        _check_pixels(image.size, param)  # from the header: nothing decoded yet
        image.load()
    except InvalidRequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequestError(f"{param}: not a readable image ({', '.join(FORMATS)}): {exc}",
                                  param=param) from None
    return image.convert("RGB")


def _check_pixels(size: tuple[int, int], param: str) -> None:
    width, height = size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise InvalidRequestError(f"{param}: the image is {width}x{height}; at most {MAX_IMAGE_PIXELS:,} pixels "
                                  "are accepted", param=param)


def split_image_parts(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Chat messages → (the messages with each image part as `{"type": "image"}`, the images' sources
    in order). Image parts: OpenAI's `image_url` (`{"url": ...}` or the URL itself), vLLM's
    `image_pil`, transformers' `image` (`image` or `url`). Messages without images are kept as given."""
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(_is_image_part(p) for p in content):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if _is_image_part(part):
                images.append(_image_source(part, f"messages[{i}].content[{j}]"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "image_pil", "image")


def _image_source(part: dict[str, Any], param: str) -> Any:
    kind = part["type"]
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise InvalidRequestError(f"{param}: image_url needs a url", param=param)
        return url
    source = part.get(kind) if kind == "image_pil" else part.get("image", part.get("url"))
    if source is None:
        raise InvalidRequestError(f"{param}: an {kind} part needs its image", param=param)
    return source
