"""Small PNGs for the edit tests, written with the standard library alone."""

import struct
import zlib


def png(w, h, pixel, alpha=False):
    """PNG bytes of w x h where pixel(x, y) gives (r, g, b, a); alpha kept when `alpha`."""
    channels = 4 if alpha else 3
    rows = b"".join(
        b"\x00" + bytes(v for x in range(w) for v in pixel(x, y)[:channels]) for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 6 if alpha else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def disc(w, h):
    """A red disc on white."""
    r2 = (h / 3) ** 2
    return png(w, h, lambda x, y: (220, 20, 20, 255) if (x - w / 2) ** 2 + (y - h / 2) ** 2 < r2
               else (255, 255, 255, 255))


def left_half_mask(w, h):
    """OpenAI's mask: fully transparent (to repaint) on the left half."""
    return png(w, h, lambda x, y: (0, 0, 0, 0 if x < w // 2 else 255), alpha=True)


def size_of(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def idat(data: bytes) -> bytes:
    """The PNG's image data chunks, joined: equal for equal pixels whatever the text chunks
    (receipts) say."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = b"", 8
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        if data[i + 4:i + 8] == b"IDAT":
            out += data[i + 8:i + 8 + n]
        i += 12 + n
    return out
