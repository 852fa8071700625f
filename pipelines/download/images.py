"""Images as downloaded or ingested: upright (EXIF orientation applied), 8 bits deep (`pipelines.pixels.eight_bit`),
bounded in pixels before any decode."""

from __future__ import annotations

import io

from pipelines.pixels import WIDE, eight_bit

ORIENTATION = 0x0112


def upright(data: bytes, max_pixels: int) -> tuple[bytes, str | None]:
    """(bytes to keep, error): the header is read first, so an image over `max_pixels` is refused undecoded;
    one stored sideways (EXIF orientation) is turned upright, and one deeper than 8 bits scaled to 8 bits
    (`eight_bit`), both re-encoded losslessly (PNG). Bytes PIL cannot read come back as they are, for the
    caller's decoder to judge."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.size[0] * im.size[1] > max_pixels:
                return data, f"image area too large ({im.size[0]}x{im.size[1]} > {max_pixels} pixels, before decoding)"
            turned = im.getexif().get(ORIENTATION, 1) not in (1, None)
            if not turned and im.mode not in WIDE:
                return data, None
            buf = io.BytesIO()
            eight_bit(ImageOps.exif_transpose(im) if turned else im).save(buf, format="PNG")
            return buf.getvalue(), None
    except Exception:  # noqa: BLE001 - not readable here: the caller's decoder gives the reason
        return data, None


def rotate(data: bytes, degrees: int, encode_format: str, quality: int) -> tuple[bytes, int, int]:
    """(bytes, width, height) of the image turned `degrees` counterclockwise, re-encoded in `encode_format`.

    Applied after img2dataset's resize: every resize mode it has (scale, centre crop, border) commutes
    with a quarter turn, so the result is what turning first would give."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        turned = im.rotate(degrees, expand=True)  # PIL turns counterclockwise
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[encode_format]
        if fmt == "JPEG" and turned.mode not in ("RGB", "L"):
            turned = turned.convert("RGB")
        buf = io.BytesIO()
        turned.save(buf, format=fmt, **({"compress_level": quality} if fmt == "PNG" else {"quality": quality}))
        return buf.getvalue(), turned.width, turned.height


def rotation_degrees(value) -> int | None:
    """A Rotation cell as a quarter turn (0, 90, 180 or 270), None when empty or not a whole quarter turn."""
    try:
        degrees = int(round(float(value))) % 360
    except (TypeError, ValueError):
        return None
    return degrees if degrees % 90 == 0 else None
