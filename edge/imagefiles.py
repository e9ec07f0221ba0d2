"""Image files read safely: the size from the header, refused above a pixel limit before
anything is decoded, then decoded from the very bytes that were checked.

A decoder allocates what the header says: a 1.2 MB PNG can hold 20000 x 20000 pixels, 1.2 GB
once decoded to BGR. Image folders and references accept JPEG, PNG, BMP and WebP; a file whose
header is none of them is refused too (OpenCV would otherwise decode TIFF, PNM, ... unchecked).
"""

import struct

from edge.errors import SourceError

DEFAULT_MAX_PIXELS = 4096 * 4096    # config `max_image_pixels`
FORMATS = "JPEG, PNG, BMP or WebP"

# JPEG start-of-frame markers (baseline, progressive, lossless, ...): they hold the size.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data):
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:              # fill byte
            at += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:   # no length
            at += 2
            continue
        if marker == 0xDA:              # start of scan: no frame header before it
            return None
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in _SOF:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        at += 2 + length
    return None


def _webp(data):
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def format_of(data):
    """"JPEG", "PNG", "BMP" or "WebP" from the first 12 bytes of a file (its signature),
    None for anything else (a video container, TIFF, ...)."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def size(data):
    """(width, height) from the header of JPEG, PNG, BMP or WebP bytes; None otherwise."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26:
        header = struct.unpack("<I", data[14:18])[0]
        if header == 12:                # BITMAPCOREHEADER: 16-bit sides
            return struct.unpack("<HH", data[18:22])
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)        # a negative height: rows top-down
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    return None


def check(data, what, max_pixels, max_side=None):
    """(width, height) of image bytes, from the header; SourceError when it is not one of
    the formats read, or larger than `max_pixels` (or `max_side` a side)."""
    found = size(data)
    if found is None:
        raise SourceError("{}: not a {} image (or its header is damaged)".format(what, FORMATS))
    width, height = found
    if width * height > max_pixels:
        raise SourceError("{}: {}x{} pixels, over the limit of {} (max_image_pixels); scale it "
                          "down or raise max_image_pixels".format(what, width, height,
                                                                   max_pixels))
    if max_side is not None and max(width, height) > max_side:
        raise SourceError("{}: {}x{} pixels; at most {} pixels a side".format(
            what, width, height, max_side))
    return width, height


def decode(data, what, max_pixels, max_side=None):
    """(H, W, 3) uint8 BGR from image bytes, checked first (see `check`)."""
    import cv2
    import numpy as np
    check(data, what, max_pixels, max_side)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise SourceError("{}: cannot be decoded (corrupt or not an image)".format(what))
    return image


def read(path, what, max_pixels, max_side=None):
    """The BGR image in a file, checked and decoded from the bytes read once."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SourceError("{}: cannot be read ({})".format(what, e.strerror or e))
    return decode(data, what, max_pixels, max_side)
