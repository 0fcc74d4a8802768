"""A tiny PNG writer (zlib + struct) and the labelled picture of the demo's prediction strip
(column names and a class-colour legend drawn with Pillow, a dependency anyway)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

# Distinct colours for class ids 0..; 255 (ignore) is drawn white.
PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
], dtype=np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8."""
    label = np.asarray(label)
    out = PALETTE[np.where(label == 255, 0, label) % len(PALETTE)]
    out[label == 255] = 255
    return out


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected an (H, W, 3) array, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


# Picture furniture, in output pixels: a header band for the column names (at least HEADER_HEIGHT;
# taller when narrow columns need names on several lines), legend rows below.
HEADER_HEIGHT = 22
LEGEND_ROW_HEIGHT = 20
SWATCH = 14
MARGIN = 6
TEXT = (0, 0, 0)
OUTLINE = (96, 96, 96)


def _font(size: int = 13):
    """Pillow's built-in font (no font file on disk needed), scaled where Pillow can scale it."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def legend_entries(class_names: list[str], show_ignore: bool) -> list[tuple[str, tuple]]:
    """(name, colour) per class as colorize() draws it, plus the ignore label if shown."""
    entries = [(f"{k} {name}", tuple(int(v) for v in PALETTE[k % len(PALETTE)])) for k, name in enumerate(class_names)]
    if show_ignore:
        entries.append(("255 ignore", (255, 255, 255)))
    return entries


def _legend_rows(draw, entries, width: int, font) -> list[list[tuple[int, str, tuple]]]:
    """Entries placed left to right, wrapped to the picture width: rows of (x, name, colour)."""
    rows, row, x = [], [], MARGIN
    for name, colour in entries:
        w = SWATCH + 4 + _text_width(draw, name, font) + 12
        if row and x + w > width - MARGIN:
            rows.append(row)
            row, x = [], MARGIN
        row.append((x, name, colour))
        x += w
    if row:
        rows.append(row)
    return rows


def _header_layout(draw, names: list[str], width: int):
    """(font, lines per name, header height): the largest font size at which every column name fits
    its column on one line, else the names split into words over several lines."""
    for size in (13, 12, 11, 10, 9):
        font = _font(size)
        if all(_text_width(draw, name, font) <= width for name in names):
            return font, [[name] for name in names], HEADER_HEIGHT
    font = _font(9)
    lines = [name.split() or [name] for name in names]
    line_height = 11
    return font, lines, max(HEADER_HEIGHT, line_height * max(map(len, lines)) + 6)


def label_picture(path: str, body: np.ndarray, column_names: list[str], *, tile_width: int, gap: int,
                  class_names: list[str], show_ignore: bool = False) -> tuple[int, int]:
    """Write `body` (H, W, 3) with the column names centred above its columns (each tile_width
    wide, gap apart) and a legend of the class colours below it. Returns (header height, legend
    height) in pixels. Text is drawn with Pillow's built-in font: no plotting library needed."""
    from PIL import Image, ImageDraw

    body = np.ascontiguousarray(body, dtype=np.uint8)
    h, w, _ = body.shape
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head_font, head_lines, header_height = _header_layout(scratch, column_names, tile_width - 2)
    font = _font()
    rows = _legend_rows(scratch, legend_entries(class_names, show_ignore), w, font)
    legend_height = len(rows) * LEGEND_ROW_HEIGHT + MARGIN
    canvas = Image.new("RGB", (w, header_height + h + legend_height), (255, 255, 255))
    canvas.paste(Image.fromarray(body), (0, header_height))
    draw = ImageDraw.Draw(canvas)
    for k, lines in enumerate(head_lines):
        centre = k * (tile_width + gap) + tile_width // 2
        draw.multiline_text((centre, header_height // 2), "\n".join(lines), fill=TEXT, font=head_font,
                            anchor="mm", align="center", spacing=1)
    top = header_height + h + MARGIN // 2
    for r, row in enumerate(rows):
        y = top + r * LEGEND_ROW_HEIGHT + (LEGEND_ROW_HEIGHT - SWATCH) // 2
        for x, name, colour in row:
            draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=colour, outline=OUTLINE)
            draw.text((x + SWATCH + 4, y + SWATCH // 2), name, fill=TEXT, font=font, anchor="lm")
    write_png(path, np.asarray(canvas))
    return header_height, legend_height
