"""A figure laid out once and written both as SVG and as PNG, without a plotting or imaging library (none is a
dependency; engine/plots.py writes its SVG by hand the same way).

    fig = Figure(400, 300, "title")
    fig.rect(10, 10, 50, 20, fill="#08306b", opacity=0.5, attrs={"data-weight": "0.25"})
    fig.text(10, 50, "a label", size=10)                      # y is the baseline; anchor start / middle / end
    fig.text(80, 90, "up", size=10, vertical=True)            # reads bottom to top (SVG rotate(-90))
    fig.picture(Picture.read("photo.png"), 0, 100, 200, 150)  # stretched over the box, as the boxes are
    svg_text, png_bytes = fig.svg(), fig.png(scale=2)

Coordinates are SVG user units (y down). The SVG names its font "monospace", whose advance is about 0.6 em, the
width layouts assume (`text_width`); the PNG draws text with the 5 x 9 bitmap font below, each font pixel
`round(size * scale / 10)` pixels wide, so 10-unit text is 12 pixels a character at scale 2. `attrs` go into the
SVG element verbatim (data-* attributes let tests read back what was drawn). PNG files are RGB, 8 bits, one
zlib stream; `decode_png` reads the common kinds (grey, RGB, palette, with alpha; 1-16 bits; not interlaced)
so a picture can be drawn under the PNG's boxes. Other picture formats are embedded in the SVG as they are, and
need Pillow (if installed) for the PNG.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

CHAR_WIDTH = 0.6  # of the font size: monospace advance in the SVG, 6 of 10 font pixels in the PNG


class PictureError(ValueError):
    """A picture file that cannot be read: the message names it."""


# ------------------------------------------------------------------------------------------- bitmap font

# Printable ASCII in 5 x 9 cells: rows 0-6 stand on the baseline, 7-8 are descenders; '#' is ink. Drawn for this
# project (one row per token, missing rows are blank).
_GLYPHS = {
    " ": "", "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..", '"': ".#.#. .#.#.",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.", "$": "..#.. .#### #.#.. .###. ..#.# ####. ..#..",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##", "&": ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#",
    "'": "..#.. ..#..", "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#..", "+": "..... ..#.. ..#.. ##### ..#.. ..#..",
    ",": "..... ..... ..... ..... ..... .##.. ..#.. .#...", "-": "..... ..... ..... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..", "/": "..... ....# ...#. ..#.. .#... #....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "####. ....# ....# .###. ....# ....# ####.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    ":": "..... .##.. .##.. ..... .##.. .##..", ";": "..... .##.. .##.. ..... .##.. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.", "=": "..... ..... ##### ..... #####",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...", "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "@": ".###. #...# ....# .##.# #.#.# #.#.# .###.",
    "A": ".###. #...# #...# ##### #...# #...# #...#", "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.", "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####", "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####", "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.", "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#", "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.", "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#", "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.", "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.", "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.", "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..", "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "[": ".###. .#... .#... .#... .#... .#... .###.", "\\": "..... #.... .#... ..#.. ...#. ....#",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.", "^": "..#.. .#.#. #...#",
    "_": "..... ..... ..... ..... ..... ..... #####", "`": ".#... ..#..",
    "a": "..... ..... .###. ....# .#### #...# .####", "b": "#.... #.... ####. #...# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.", "d": "....# ....# .#### #...# #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.", "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.", "h": "#.... #.... ####. #...# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.", "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.", "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#", "n": "..... ..... ####. #...# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.", "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#", "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.", "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#", "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.", "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.", "z": "..... ..... ##### ...#. ..#.. .#... #####",
    "{": "...#. ..#.. ..#.. .#... ..#.. ..#.. ...#.", "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "}": ".#... ..#.. ..#.. ...#. ..#.. ..#.. .#...", "~": "..... ..... .#... #.#.# ...#.",
}  # fmt: skip
GLYPH_W, GLYPH_H, GLYPH_ASCENT, GLYPH_ADVANCE = 5, 9, 7, 6
_UNKNOWN = "##### #...# #...# #...# #...# #...# #####"  # a box for a character the font lacks


def _glyph(text: str) -> np.ndarray:
    rows = [[c == "#" for c in row] for row in text.split()]
    bitmap = np.zeros((GLYPH_H, GLYPH_W), dtype=bool)
    if rows:
        bitmap[: len(rows)] = rows
    return bitmap


FONT: dict[str, np.ndarray] = {char: _glyph(rows) for char, rows in _GLYPHS.items()}
_BOX = _glyph(_UNKNOWN)


def text_width(text: str, size: float) -> float:
    """Width of `text` at font `size` in user units (both outputs)."""
    return len(text) * CHAR_WIDTH * size


def text_bitmap(text: str, pixel: int) -> np.ndarray:
    """bool [9 * pixel, 6 * pixel * len(text)]: `text` in the bitmap font, each font pixel `pixel` wide."""
    cells = [np.pad(FONT.get(c, _BOX), ((0, 0), (0, GLYPH_ADVANCE - GLYPH_W))) for c in text]
    line = np.concatenate(cells, axis=1) if cells else np.zeros((GLYPH_H, 0), dtype=bool)
    return np.kron(line, np.ones((pixel, pixel), dtype=bool))


# ------------------------------------------------------------------------------------------------ PNG


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> the bytes of an 8-bit RGB PNG: filter Up on every row (a figure's rows mostly repeat the
    one above: a third smaller than no filter), one zlib stream."""
    height, width, channels = rgb.shape
    if channels != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    lines = rgb.reshape(height, width * 3)
    up = np.diff(lines, axis=0, prepend=np.zeros((1, width * 3), np.uint8))  # uint8: wraps mod 256 as PNG's Up
    rows = np.concatenate([np.full((height, 1), 2, np.uint8), up], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))  # fmt: skip


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples a pixel


def _unfilter(data: bytes, height: int, stride: int, bpp: int, where: str) -> np.ndarray:
    """The scanlines of a PNG's inflated IDAT, their filters undone: uint8 [height, stride]."""
    if len(data) < height * (stride + 1):
        raise PictureError(f"{where}: image data ends early ({len(data)} bytes for {height} rows of {stride})")
    rows = np.frombuffer(data[: height * (stride + 1)], np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.int64)
    for y in range(height):
        kind, line = int(rows[y, 0]), rows[y, 1:].astype(np.int64)
        if kind == 0:
            recon = line
        elif kind == 1:  # Sub: a running sum per byte of a pixel
            recon = np.cumsum(np.pad(line, (0, -stride % bpp)).reshape(-1, bpp), axis=0).reshape(-1)[:stride] & 255
        elif kind == 2:  # Up
            recon = (line + previous) & 255
        elif kind in (3, 4):  # Average, Paeth: each byte needs the one a pixel to its left, so byte by byte
            cur, up = line.tolist(), previous.tolist()
            for i in range(stride):
                left = cur[i - bpp] if i >= bpp else 0
                if kind == 3:
                    cur[i] = (cur[i] + ((left + up[i]) >> 1)) & 255
                    continue
                upper_left = up[i - bpp] if i >= bpp else 0
                p = left + up[i] - upper_left
                pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upper_left)
                pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else upper_left)
                cur[i] = (cur[i] + pred) & 255
            recon = np.array(cur, np.int64)
        else:
            raise PictureError(f"{where}: row {y} has an unknown filter type {kind}")
        out[y] = recon
        previous = recon
    return out


def decode_png(data: bytes, where: str = "PNG") -> np.ndarray:
    """The pixels of a PNG file's bytes: uint8 [H, W, 3] (RGB) or [H, W, 4] (with alpha); `where` names it in
    errors. Grey, RGB, palette (with tRNS transparency), grey+alpha and RGBA at 1, 2, 4, 8 or 16 bits; not
    interlaced (Adam7 is refused by name)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise PictureError(f"{where}: not a PNG file")
    pos, header, palette, transparency, idat = 8, None, None, None, []
    while pos + 8 <= len(data):
        (length,), tag = struct.unpack(">I", data[pos: pos + 4]), data[pos + 4: pos + 8]
        body = data[pos + 8: pos + 8 + length]
        if len(body) != length:
            raise PictureError(f"{where}: chunk {tag!r} is cut short (truncated file?)")
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif tag == b"tRNS":
            transparency = np.frombuffer(body, np.uint8)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if header is None or not idat:
        raise PictureError(f"{where}: no {'IHDR' if header is None else 'IDAT'} chunk (truncated file?)")
    width, height, depth, color, _, _, interlace = header
    if color not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise PictureError(f"{where}: unsupported PNG colour type {color} at {depth} bits")
    if interlace:
        raise PictureError(f"{where}: interlaced (Adam7) PNGs are not read; save it without interlacing")
    channels = _PNG_CHANNELS[color]
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as error:
        raise PictureError(f"{where}: corrupt image data ({error})") from None
    stride = math.ceil(width * channels * depth / 8)
    rows = _unfilter(raw, height, stride, max(1, channels * depth // 8), where)
    if depth == 16:
        samples = rows.reshape(height, -1, 2)[:, :, 0]  # the high byte
    elif depth < 8:
        bits = np.unpackbits(rows, axis=1).reshape(height, -1, depth)[:, : width * channels]
        samples = (bits * (1 << np.arange(depth - 1, -1, -1))).sum(-1).astype(np.uint8)
        if color == 0:
            samples = (samples.astype(np.int64) * 255 // ((1 << depth) - 1)).astype(np.uint8)
    else:
        samples = rows
    pixels = samples[:, : width * channels].reshape(height, width, channels)
    if color == 3:
        if palette is None:
            raise PictureError(f"{where}: a palette image without a PLTE chunk")
        index = pixels[:, :, 0]
        if index.max(initial=0) >= len(palette):
            raise PictureError(f"{where}: a pixel indexes colour {int(index.max())} of a {len(palette)}-colour palette")
        rgb = palette[index]
        if transparency is None:
            return rgb
        alpha = np.full(len(palette), 255, np.uint8)
        alpha[: len(transparency)] = transparency[: len(palette)]
        return np.concatenate([rgb, alpha[index][:, :, None]], axis=2)
    if channels <= 2:  # grey (+ alpha)
        grey = np.repeat(pixels[:, :, :1], 3, axis=2)
        return grey if channels == 1 else np.concatenate([grey, pixels[:, :, 1:]], axis=2)
    return np.ascontiguousarray(pixels)


# --------------------------------------------------------------------------------------------- picture

_MIME = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


@dataclass
class Picture:
    """A picture file for a figure: its bytes (embedded in the SVG as they are), its type and size, and its
    pixels where they can be read (PNG always, other formats with Pillow), else None."""

    path: Path
    data: bytes
    mime: str
    width: int
    height: int
    pixels: np.ndarray | None  # uint8 [H, W, 3 or 4]

    @classmethod
    def read(cls, path: str | Path) -> Picture:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise PictureError(f"{path}: cannot read the picture ({error.strerror or error})") from None
        mime = next((m for magic, m in _MIME if data.startswith(magic)), None)
        if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            mime = "image/webp"
        if mime is None:
            raise PictureError(f"{path}: not a PNG, JPEG, GIF or WebP picture")
        if mime == "image/png":
            pixels = decode_png(data, str(path))
        else:
            pixels = _read_with_pillow(path)
        if pixels is not None:
            height, width = pixels.shape[:2]
        else:
            width, height = _jpeg_size(data, path) if mime == "image/jpeg" else (0, 0)
        return cls(path, data, mime, width, height, pixels)


def _read_with_pillow(path: Path) -> np.ndarray | None:
    try:
        from PIL import Image  # optional: not a dependency
    except ImportError:
        return None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
    except Exception as error:  # Pillow raises many kinds for a bad file
        raise PictureError(f"{path}: cannot decode the picture ({error})") from None


def _jpeg_size(data: bytes, path: Path) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame marker."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            break
        marker, (length,) = data[pos + 1], struct.unpack(">H", data[pos + 2: pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5: pos + 9])
            return width, height
        pos += 2 + length
    raise PictureError(f"{path}: a JPEG without a readable frame header (truncated file?)")


# ---------------------------------------------------------------------------------------------- figure


@dataclass
class _Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str | None
    opacity: float
    stroke: str | None
    stroke_width: float
    attrs: dict[str, str]


@dataclass
class _Text:
    x: float
    y: float
    text: str
    size: float
    fill: str
    anchor: str
    vertical: bool
    bold: bool


@dataclass
class _Line:
    x1: float
    y1: float
    x2: float
    y2: float
    stroke: str
    width: float


@dataclass
class _Use:
    picture: int
    x: float
    y: float
    w: float
    h: float


def _rgb(color: str) -> np.ndarray:
    if not (color.startswith("#") and len(color) == 7):
        raise ValueError(f"colours are #rrggbb, got {color!r}")
    return np.array([int(color[i: i + 2], 16) for i in (1, 3, 5)], np.float32) / 255.0


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


@dataclass
class Figure:
    """Shapes in drawing order, written by `svg()` and `png()` (module docstring)."""

    width: float
    height: float
    title: str = ""
    background: str = "#ffffff"
    items: list = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)

    def rect(self, x: float, y: float, w: float, h: float, fill: str | None = None, opacity: float = 1.0,
             stroke: str | None = None, stroke_width: float = 1.0, attrs: dict[str, str] | None = None) -> None:  # fmt: skip
        self.items.append(_Rect(x, y, w, h, fill, opacity, stroke, stroke_width, dict(attrs or {})))

    def text(self, x: float, y: float, text: str, size: float = 10, fill: str = "#000000", anchor: str = "start",
             vertical: bool = False, bold: bool = False) -> None:  # fmt: skip
        if anchor not in ("start", "middle", "end"):
            raise ValueError(f"anchor is start, middle or end, got {anchor!r}")
        self.items.append(_Text(x, y, text, size, fill, anchor, vertical, bold))

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str = "#000000", width: float = 1.0) -> None:
        self.items.append(_Line(x1, y1, x2, y2, stroke, width))

    def picture(self, picture: Picture, x: float, y: float, w: float, h: float) -> None:
        """`picture` stretched over the box (x, y, w, h); the SVG holds its bytes once however often it is used."""
        index = next((i for i, p in enumerate(self.pictures) if p is picture), None)
        if index is None:
            self.pictures.append(picture)
            index = len(self.pictures) - 1
        self.items.append(_Use(index, x, y, w, h))

    # -------------------------------------------------------------------------------------------- SVG

    def svg(self) -> str:
        w, h = _num(self.width), _num(self.height)
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="{w}" '
               f'height="{h}" viewBox="0 0 {w} {h}" font-family="monospace">',
               f"<title>{escape(self.title)}</title>", f'<rect width="{w}" height="{h}" fill="{self.background}"/>']  # fmt: skip
        if self.pictures:
            out.append("<defs>")
            for i, p in enumerate(self.pictures):
                href = f"data:{p.mime};base64,{base64.b64encode(p.data).decode('ascii')}"
                size = f'width="{p.width or 1}" height="{p.height or 1}"'
                out.append(f'<image id="picture{i}" {size} preserveAspectRatio="none" href="{href}" '
                           f'xlink:href="{href}"/>')  # fmt: skip
            out.append("</defs>")
        for item in self.items:
            out.append(self._svg_item(item))
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def _svg_item(self, item) -> str:
        if isinstance(item, _Rect):
            parts = [f'x="{_num(item.x)}" y="{_num(item.y)}" width="{_num(item.w)}" height="{_num(item.h)}"',
                     f'fill="{item.fill}"' if item.fill else 'fill="none"']  # fmt: skip
            if item.fill and item.opacity < 1.0:
                parts.append(f'fill-opacity="{item.opacity:.4f}"')
            if item.stroke:
                parts.append(f'stroke="{item.stroke}" stroke-width="{_num(item.stroke_width)}"')
            parts.extend(f"{name}={quoteattr(value)}" for name, value in item.attrs.items())
            return f"<rect {' '.join(parts)}/>"
        if isinstance(item, _Text):
            where = (f'transform="translate({_num(item.x)} {_num(item.y)}) rotate(-90)"' if item.vertical
                     else f'x="{_num(item.x)}" y="{_num(item.y)}"')  # fmt: skip
            weight = ' font-weight="bold"' if item.bold else ""
            return (f'<text {where} font-size="{_num(item.size)}" text-anchor="{item.anchor}" fill="{item.fill}"'
                    f"{weight}>{escape(item.text)}</text>")  # fmt: skip
        if isinstance(item, _Line):
            return (f'<line x1="{_num(item.x1)}" y1="{_num(item.y1)}" x2="{_num(item.x2)}" y2="{_num(item.y2)}" '
                    f'stroke="{item.stroke}" stroke-width="{_num(item.width)}"/>')  # fmt: skip
        picture = self.pictures[item.picture]
        sx, sy = item.w / (picture.width or 1), item.h / (picture.height or 1)
        return (f'<use href="#picture{item.picture}" xlink:href="#picture{item.picture}" '
                f'transform="translate({_num(item.x)} {_num(item.y)}) scale({sx:.6g} {sy:.6g})"/>')

    # -------------------------------------------------------------------------------------------- PNG

    def png(self, scale: float = 2.0) -> bytes:
        """The figure rasterised at `scale` pixels a unit: the bytes of an RGB PNG."""
        return encode_png(self.raster(scale))

    def raster(self, scale: float = 2.0) -> np.ndarray:
        """uint8 [round(height * scale), round(width * scale), 3]."""
        canvas = np.empty((round(self.height * scale), round(self.width * scale), 3), np.float32)
        canvas[:] = _rgb(self.background)
        for item in self.items:
            if isinstance(item, _Rect):
                self._raster_rect(canvas, item, scale)
            elif isinstance(item, _Text):
                self._raster_text(canvas, item, scale)
            elif isinstance(item, _Line):
                self._raster_line(canvas, item, scale)
            else:
                self._raster_picture(canvas, item, scale)
        return np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)

    @staticmethod
    def _paint(canvas: np.ndarray, x0: int, y0: int, x1: int, y1: int, color: np.ndarray, alpha: float) -> None:
        height, width = canvas.shape[:2]
        x0, x1, y0, y1 = max(x0, 0), min(x1, width), max(y0, 0), min(y1, height)
        if x0 < x1 and y0 < y1:
            region = canvas[y0:y1, x0:x1]
            region += (color - region) * alpha

    def _raster_rect(self, canvas: np.ndarray, item: _Rect, scale: float) -> None:
        x0, y0 = round(item.x * scale), round(item.y * scale)
        x1, y1 = round((item.x + item.w) * scale), round((item.y + item.h) * scale)
        if item.fill:
            self._paint(canvas, x0, y0, x1, y1, _rgb(item.fill), item.opacity)
        if item.stroke:  # four bands of the stroke's width, centred on the outline as SVG's
            color, t = _rgb(item.stroke), max(1, round(item.stroke_width * scale))
            ox0, oy0, ox1, oy1 = x0 - t // 2, y0 - t // 2, x1 - t // 2 + t, y1 - t // 2 + t
            for band in ((ox0, oy0, ox1, oy0 + t), (ox0, oy1 - t, ox1, oy1), (ox0, oy0, ox0 + t, oy1),
                         (ox1 - t, oy0, ox1, oy1)):  # fmt: skip
                self._paint(canvas, *band, color, 1.0)

    def _raster_text(self, canvas: np.ndarray, item: _Text, scale: float) -> None:
        pixel = max(1, round(item.size * scale / 10))
        ink = text_bitmap(item.text, pixel)
        if item.bold:
            ink = ink | np.pad(ink, ((0, 0), (1, 0)))[:, :-1]
        length = ink.shape[1]
        shift = {"start": 0, "middle": length // 2, "end": length}[item.anchor]
        x, y = round(item.x * scale), round(item.y * scale)
        if item.vertical:  # reads bottom to top: the glyphs' tops face left
            ink = np.rot90(ink)
            top, left = y - length + shift, x - GLYPH_ASCENT * pixel
        else:
            top, left = y - GLYPH_ASCENT * pixel, x - shift
        height, width = canvas.shape[:2]
        rows, cols = np.nonzero(ink)
        rows, cols = rows + top, cols + left
        keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        canvas[rows[keep], cols[keep]] = _rgb(item.fill)

    def _raster_line(self, canvas: np.ndarray, item: _Line, scale: float) -> None:
        color, t = _rgb(item.stroke), max(1, round(item.width * scale))
        x1, y1, x2, y2 = (v * scale for v in (item.x1, item.y1, item.x2, item.y2))
        steps = max(1, math.ceil(max(abs(x2 - x1), abs(y2 - y1))))
        for k in range(steps + 1):
            x, y = round(x1 + (x2 - x1) * k / steps), round(y1 + (y2 - y1) * k / steps)
            self._paint(canvas, x - t // 2, y - t // 2, x - t // 2 + t, y - t // 2 + t, color, 1.0)

    def _raster_picture(self, canvas: np.ndarray, item: _Use, scale: float) -> None:
        picture = self.pictures[item.picture]
        if picture.pixels is None:
            raise PictureError(f"{picture.path}: a {picture.mime} picture is drawn into the PNG only when Pillow is "
                               "installed (pip install pillow); convert it to PNG, or write the SVG only")  # fmt: skip
        x0, y0 = round(item.x * scale), round(item.y * scale)
        x1, y1 = round((item.x + item.w) * scale), round((item.y + item.h) * scale)
        height, width = canvas.shape[:2]
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, width), max(y0, 0), min(y1, height)
        if cx0 >= cx1 or cy0 >= cy1:
            return
        src = picture.pixels
        cols = ((np.arange(cx0, cx1) - x0 + 0.5) * src.shape[1] / (x1 - x0)).astype(np.int64).clip(0, src.shape[1] - 1)
        rows = ((np.arange(cy0, cy1) - y0 + 0.5) * src.shape[0] / (y1 - y0)).astype(np.int64).clip(0, src.shape[0] - 1)
        patch = src[rows][:, cols].astype(np.float32) / 255.0  # nearest neighbour
        region = canvas[cy0:cy1, cx0:cx1]
        if patch.shape[2] == 4:
            alpha = patch[:, :, 3:]
            region += (patch[:, :, :3] - region) * alpha
        else:
            region[:] = patch
