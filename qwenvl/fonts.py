"""Find a font that can draw Chinese as well as Latin text, without ever downloading one.

`make install` installs Debian's `fonts-wqy-zenhei` when it can; any other CJK-capable font on the
machine works too. Set QWENVL_FONT to a .ttf/.ttc/.otf file to choose one explicitly.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from PIL import ImageFont

# Checked in order; the first that exists wins. All of them cover CJK ideographs and ASCII.
KNOWN_CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/simsun.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> Path | None:
    """Path of a CJK-capable font on this machine, or None if there is none."""
    env = os.environ.get("QWENVL_FONT")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"QWENVL_FONT={env!r} is not a file")
        return Path(env)
    for candidate in KNOWN_CJK_FONTS:
        if Path(candidate).is_file():
            return Path(candidate)
    return _ask_fontconfig()


def _ask_fontconfig() -> Path | None:
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    files = sorted(line.split(":")[0].strip() for line in out.stdout.splitlines() if line.strip())
    return Path(files[0]) if files else None


@functools.lru_cache(maxsize=32)
def load_font(size: int, require_cjk: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font of `size` pixels. Falls back to PIL's built-in Latin font unless `require_cjk`."""
    path = find_cjk_font()
    if path is not None:
        return ImageFont.truetype(str(path), size)
    if require_cjk:
        raise RuntimeError(
            "no CJK-capable font found: run `make install` (installs fonts-wqy-zenhei), "
            "install any Noto CJK / WenQuanYi font, or set QWENVL_FONT=/path/to/font.ttc"
        )
    return ImageFont.load_default(size)
