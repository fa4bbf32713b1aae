"""qwenvl.images: sources, policy refusals, hostile files, mode conversion, pixel parity, digests.

Network traffic stays on 127.0.0.1 (a throwaway http.server in a thread); every private-address
refusal is decided by the resolution step before any connection is attempted.
"""
from __future__ import annotations

import base64
import dataclasses
import doctest
import http.server
import io
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

import qwenvl.images as images
from qwenvl.images import (
    TRUSTED, UNTRUSTED, ImageError, ImagePolicy, image_digest, load_image, preprocess_v1,
    preprocess_v1_batch, to_rgb,
)

REPO = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "fixtures" / "qwen_vl_tiny"
TINY_IMAGES = ["img_a.png", "img_b.png", "img_c.png", "img_d.png"]
IMG_A = TINY / "img_a.png"


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reference_rgb(path: Path) -> np.ndarray:
    """What the official code feeds the model: Image.open(path).convert('RGB')."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims width x height RGB pixels; its pixel data is garbage."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------
# Pixel parity with the reference, preprocessing, digests


@pytest.mark.parametrize("name", TINY_IMAGES)
def test_pixels_match_reference_fixture(name: str, tiny_pixels: dict[str, torch.Tensor]) -> None:
    pixels = preprocess_v1(load_image(TINY / name), 112)
    assert pixels.shape == (3, 112, 112) and pixels.dtype == torch.float32
    assert (pixels - tiny_pixels[name]).abs().max().item() <= 1e-6


def test_batch_is_the_stack_of_singles(tiny_pixels: dict[str, torch.Tensor]) -> None:
    batch = preprocess_v1_batch([load_image(TINY / n) for n in TINY_IMAGES], 112)
    assert batch.shape == (4, 3, 112, 112)
    expected = torch.stack([tiny_pixels[n] for n in TINY_IMAGES])
    assert (batch - expected).abs().max().item() <= 1e-6
    assert preprocess_v1_batch([], 448).shape == (0, 3, 448, 448)


def test_preprocess_refuses_non_rgb_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="RGB"):
        preprocess_v1(Image.new("RGBA", (4, 4)), 112)
    for size in (0, -3, 11.5):
        with pytest.raises(ValueError, match="image_size"):
            preprocess_v1(Image.new("RGB", (4, 4)), size)  # type: ignore[arg-type]


def test_image_digest_tracks_content_mode_and_size() -> None:
    a, b = load_image(IMG_A), load_image(IMG_A.read_bytes())
    assert image_digest(a) == image_digest(b) and len(image_digest(a)) == 64
    changed = a.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in a.getpixel((0, 0))))
    assert image_digest(changed) != image_digest(a)
    assert image_digest(Image.new("L", (2, 2))) != image_digest(Image.new("L", (4, 1)))
    assert image_digest(Image.new("L", (2, 2))) != image_digest(Image.new("P", (2, 2)))
    p1, p2 = Image.new("P", (2, 2)), Image.new("P", (2, 2))
    p2.putpalette([255, 0, 0] * 256)
    assert image_digest(p1) != image_digest(p2)


def test_docstring_examples_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = doctest.testmod(images, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 15


# --------------------------------------------------------------------------------------------------
# Every source kind


def test_path_str_path_and_bytes_sources_agree() -> None:
    expected = reference_rgb(IMG_A)
    data = IMG_A.read_bytes()
    for source in (str(IMG_A), IMG_A, data, bytearray(data), memoryview(data)):
        img = load_image(source)
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), expected), type(source)


@pytest.mark.parametrize("header", [
    "data:image/png;base64,", "data:image;base64,", "data:;base64,", "DATA:IMAGE/PNG;BASE64,",
    "data:image/png;charset=binary;base64,", "  data:application/octet-stream;base64,",
])
def test_data_uri_headers(header: str) -> None:
    uri = header + base64.b64encode(IMG_A.read_bytes()).decode()
    assert np.array_equal(np.asarray(load_image(uri, UNTRUSTED)), reference_rgb(IMG_A))


def test_data_uri_payload_variants() -> None:
    b64 = base64.b64encode(IMG_A.read_bytes()).decode()
    variants = {
        "wrapped at 76 columns": "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),
        "padding stripped": b64.rstrip("="),
        "url-safe alphabet": base64.urlsafe_b64encode(IMG_A.read_bytes()).decode(),
        "percent-encoded": b64.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D"),
    }
    for what, payload in variants.items():
        img = load_image("data:image/png;base64," + payload, UNTRUSTED)
        assert np.array_equal(np.asarray(img), reference_rgb(IMG_A)), what


def test_pil_source_is_normalised_and_left_untouched() -> None:
    source = Image.new("RGBA", (5, 3), (1, 2, 3, 4))
    img = load_image(source, UNTRUSTED)
    assert img is not source and img.mode == "RGB" and img.getpixel((4, 2)) == (1, 2, 3)
    assert source.mode == "RGBA" and source.getpixel((0, 0)) == (1, 2, 3, 4)
    rgb = Image.new("RGB", (2, 2), (9, 9, 9))
    assert load_image(rgb) is not rgb


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="unsupported source type int"):
        load_image(123)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Local files: policy and filesystem errors


def test_local_files_refused_under_untrusted() -> None:
    for source in (str(IMG_A), IMG_A, "/etc/passwd", "relative/cat.png"):
        with pytest.raises(ImageError, match="reading local files is not allowed") as e:
            load_image(source, UNTRUSTED)
        assert "data: URI" in str(e.value)


@pytest.fixture()
def jail(tmp_path: Path) -> tuple[Path, ImagePolicy]:
    """tmp/allowed/ok.png inside the allowed dir, tmp/secret.png outside it."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(IMG_A.read_bytes())
    (tmp_path / "secret.png").write_bytes(IMG_A.read_bytes())
    return allowed, dataclasses.replace(UNTRUSTED, allow_local_files=True, allowed_dirs=(allowed,))


def test_allowed_dirs_admit_files_inside(jail: tuple[Path, ImagePolicy]) -> None:
    allowed, policy = jail
    assert load_image(allowed / "ok.png", policy).size == (80, 60)
    assert load_image(str(allowed / "sub" / ".." / "ok.png"), policy).size == (80, 60)


def test_dotdot_escape_refused(jail: tuple[Path, ImagePolicy]) -> None:
    allowed, policy = jail
    with pytest.raises(ImageError, match="outside the allowed directories") as e:
        load_image(str(allowed / ".." / "secret.png"), policy)
    assert "secret.png" in str(e.value)


def test_symlink_escape_refused(jail: tuple[Path, ImagePolicy]) -> None:
    allowed, policy = jail
    (allowed / "link.png").symlink_to(allowed.parent / "secret.png")
    (allowed / "linkdir").symlink_to(allowed.parent, target_is_directory=True)
    for sneaky in (allowed / "link.png", allowed / "linkdir" / "secret.png"):
        with pytest.raises(ImageError, match="outside the allowed directories"):
            load_image(sneaky, policy)


def test_symlink_inside_allowed_dir_is_fine(jail: tuple[Path, ImagePolicy]) -> None:
    allowed, policy = jail
    (allowed / "alias.png").symlink_to(allowed / "ok.png")
    assert load_image(allowed / "alias.png", policy).size == (80, 60)


def test_file_not_found_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot resolve the path"):
        load_image("cat\x00.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image("/dev/zero")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ImageError, match="cannot resolve the path"):
        load_image(tmp_path / "loop")


def test_bare_base64_path_gets_a_hint() -> None:
    b64 = base64.b64encode(IMG_A.read_bytes()).decode()
    with pytest.raises(ImageError, match="prefix it with 'data:image/png;base64,'") as e:
        load_image(b64)
    assert len(str(e.value)) < 400  # the source is shortened, not dumped


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked.png"
    locked.write_bytes(IMG_A.read_bytes())
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the kernel's answer explicit instead

        def deny(path, flags, *args):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(images.os, "open", deny)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(locked)


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


def test_file_over_byte_cap(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(IMG_A.read_bytes())
    with pytest.raises(ImageError, match=r"file is [\d,]+ bytes, more than .*max_bytes=100"):
        load_image(path, dataclasses.replace(TRUSTED, max_bytes=100))


# --------------------------------------------------------------------------------------------------
# Broken and hostile files


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")


def test_text_file_renamed_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("just some notes, not a picture\n")
    with pytest.raises(ImageError, match="not an image in a supported format") as e:
        load_image(tmp_path / "notes.png")
    assert "notes.png" in str(e.value) and "just some" in str(e.value)


def test_html_error_page_is_named() -> None:
    with pytest.raises(ImageError, match="HTML"):
        load_image(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>")


def test_corrupt_bytes() -> None:
    data = bytearray(IMG_A.read_bytes())
    data[60:80] = b"\xff" * 20  # inside the compressed pixel data
    with pytest.raises(ImageError, match="corrupt"):
        load_image(bytes(data))
    with pytest.raises(ImageError, match="not an image"):
        load_image(os.urandom(256))


def test_truncated_png() -> None:
    data = IMG_A.read_bytes()
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("policy", [TRUSTED, UNTRUSTED], ids=["trusted", "untrusted"])
def test_decompression_bomb_refused_from_the_header(policy: ImagePolicy) -> None:
    bomb = png_header_claiming(50_000, 50_000)
    assert len(bomb) < 100
    with pytest.raises(ImageError, match="too many pixels") as e:
        load_image(bomb, policy)
    assert "2500000000" in str(e.value) and f"max_pixels={policy.max_pixels:,}" in str(e.value)


def test_policy_pixel_cap_is_checked_before_decoding() -> None:
    fake = png_header_claiming(6000, 6000)  # 36 M pixels: under Pillow's limit, over UNTRUSTED's
    with pytest.raises(ImageError, match=r"6000x6000 = 36,000,000 pixels .* max_pixels=25,000,000"):
        load_image(fake, UNTRUSTED)
    # The same bytes under a bigger cap get as far as decoding, and fail there: the cap came first.
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(fake, TRUSTED)


def test_pixel_cap_applies_to_pil_sources_too() -> None:
    with pytest.raises(ImageError, match="max_pixels=10"):
        load_image(Image.new("RGB", (4, 4)), dataclasses.replace(UNTRUSTED, max_pixels=10))
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", (0, 5)))


def test_unsupported_format_under_untrusted() -> None:
    tiff = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)), "TIFF")
    assert load_image(tiff, TRUSTED).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageError, match="supported format.*reads PNG, JPEG, WEBP, GIF, BMP"):
        load_image(tiff, UNTRUSTED)
    with pytest.raises(ImageError, match="PDF"):
        load_image(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", TRUSTED)
    with pytest.raises(ImageError, match="HEIC"):
        load_image(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", TRUSTED)


def test_eps_is_not_opened_even_when_trusted() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="PostScript"):
        load_image(eps, TRUSTED)


# --------------------------------------------------------------------------------------------------
# Orientation, frames, modes


def test_exif_rotated_jpeg_comes_out_upright() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    loaded = load_image(png_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_gives_first_frame(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = png_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3
    assert load_image(data, UNTRUSTED).getpixel((4, 4)) == (255, 0, 0)


def _palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    if transparent:
        img.info["transparency"] = 1
    return img


MODE_CASES = {
    "RGBA": (Image.new("RGBA", (6, 4), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, as the reference
    "LA": (Image.new("LA", (6, 4), (100, 0)), (100, 100, 100)),
    "P": (_palette_image(False), (200, 100, 50)),
    "P+transparency": (_palette_image(True), (200, 100, 50)),
    "CMYK": (Image.new("CMYK", (6, 4), (0, 0, 0, 0)), (255, 255, 255)),
    "L": (Image.new("L", (6, 4), 77), (77, 77, 77)),
    "I;16": (Image.new("I;16", (6, 4), 32896), (128, 128, 128)),  # 32896 / 257 = 128, not clipped to 255
    "I": (Image.new("I", (6, 4), 65535), (255, 255, 255)),
    "F": (Image.new("F", (6, 4), 0.5), (128, 128, 128)),
    "1": (Image.new("1", (6, 4), 1), (255, 255, 255)),
    "PA": (Image.new("PA", (6, 4), (0, 255)), (0, 0, 0)),
    "YCbCr": (Image.new("YCbCr", (6, 4), (255, 128, 128)), (255, 255, 255)),
}


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_every_mode_gives_rgb_of_the_right_size(mode: str) -> None:
    source, pixel = MODE_CASES[mode]
    img = load_image(source)
    assert img.mode == "RGB" and img.size == source.size
    assert img.getpixel((0, 0)) == pixel


@pytest.mark.parametrize("mode,fmt", [
    ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("P+transparency", "PNG"), ("P+transparency", "GIF"),
    ("CMYK", "JPEG"), ("L", "PNG"), ("I;16", "PNG"), ("1", "PNG"), ("I;16", "TIFF"), ("F", "TIFF"),
])
def test_modes_survive_a_file_round_trip(mode: str, fmt: str) -> None:
    source, pixel = MODE_CASES[mode]
    data = png_bytes(source, fmt)
    img = load_image(data, TRUSTED)
    assert img.mode == "RGB" and img.size == source.size
    assert np.abs(np.asarray(img, dtype=int) - np.array(pixel)).max() <= 2  # JPEG may round a little


def test_rgba_and_palette_follow_the_reference_convert() -> None:
    for mode in ("RGBA", "LA", "P+transparency"):
        data = png_bytes(MODE_CASES[mode][0], "PNG")
        with Image.open(io.BytesIO(data)) as ref:
            expected = np.asarray(ref.convert("RGB"))
        assert np.array_equal(np.asarray(load_image(data)), expected), mode


def test_sixteen_bit_grey_uses_the_full_range() -> None:
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = load_image(png_bytes(Image.fromarray(ramp), "PNG"))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]
    wide = Image.fromarray(np.array([[-1000.0, 0.0, 1000.0]], dtype=np.float32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]


def test_unconvertible_mode_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="cannot convert pixel mode 'La'"):
        load_image(Image.new("La", (2, 2)))


# --------------------------------------------------------------------------------------------------
# data: URIs that are wrong


def test_bad_data_uris() -> None:
    cases = {
        "data:image/png;base64,@@@not*base64@@@": "bad base64",
        "data:image/png;base64,iVBORw0KGgo=": "not an image",
        "data:image/png;base64,": "no data",
        "data:image/png,rawpixels": "only base64 data URIs",
        "data:image/png;base64": "no ','",
        "data:image/png;base64,5Lit5paH": "not an image",  # valid base64 of non-image bytes
        "data:image/png;base64,中文": "bad base64",
    }
    for uri, message in cases.items():
        with pytest.raises(ImageError, match=message):
            load_image(uri, UNTRUSTED)


def test_data_uri_over_byte_cap_is_refused_before_decoding() -> None:
    uri = "data:image/png;base64," + "A" * 4000
    with pytest.raises(ImageError, match=r"decoded data URI is 3,000 bytes, more than .*max_bytes=1,000"):
        load_image(uri, dataclasses.replace(UNTRUSTED, max_bytes=1000))


def test_bytes_over_byte_cap() -> None:
    with pytest.raises(ImageError, match="max_bytes=10"):
        load_image(IMG_A.read_bytes(), dataclasses.replace(UNTRUSTED, max_bytes=10))


# --------------------------------------------------------------------------------------------------
# URLs: schemes and addresses (no connection is ever attempted)


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "FILE:///etc/passwd", "file:/etc/passwd", "ftp://example.com/a.png",
    "gopher://example.com/_GET", "ws://example.com/a.png", "sftp://example.com/a.png",
])
@pytest.mark.parametrize("policy", [TRUSTED, UNTRUSTED], ids=["trusted", "untrusted"])
def test_non_http_schemes_refused(url: str, policy: ImagePolicy) -> None:
    with pytest.raises(ImageError, match="only http:// and https:// URLs are fetched"):
        load_image(url, policy)


@pytest.fixture()
def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a TCP connection fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(images.socket, "create_connection", refuse)


@pytest.mark.parametrize("url,kind", [
    ("http://127.0.0.1/a.png", "loopback"),
    ("http://localhost:8000/a.png", "loopback"),
    ("http://[::1]/a.png", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/a.png", "private"),
    ("https://192.168.1.20/a.png", "private"),
    ("http://172.16.5.4/a.png", "private"),
    ("http://[::ffff:127.0.0.1]/a.png", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://0.0.0.0/a.png", "unspecified"),
    ("http://[::]/a.png", "unspecified"),
    ("http://2130706433/a.png", "loopback"),  # 127.0.0.1 as one integer
    ("http://127.1/a.png", "loopback"),
    ("http://[fe80::1]/a.png", "link-local"),
    ("http://[fc00::1]/a.png", "private"),
    ("http://224.0.0.1/a.png", "multicast"),
    ("http://100.64.0.1/a.png", "not globally routable"),  # carrier-grade NAT
    ("http://[2002:7f00:1::]/a.png", "loopback"),  # 6to4 wrapping 127.0.0.1
    ("http://[64:ff9b::a00:1]/a.png", "private"),  # NAT64 wrapping 10.0.0.1
])
def test_private_addresses_refused_under_untrusted(url: str, kind: str, no_connections: None) -> None:
    with pytest.raises(ImageError, match=f"a {kind} address") as e:
        load_image(url, UNTRUSTED)
    assert "allow_private_urls=True" in str(e.value)


def test_hostname_resolving_to_private_is_refused(monkeypatch: pytest.MonkeyPatch, no_connections: None) -> None:
    import ipaddress

    answers = {"intranet.example": ["10.1.2.3"], "mixed.example": ["93.184.216.34", "192.168.0.9"]}
    monkeypatch.setattr(images, "resolve_host",
                        lambda host, port: [ipaddress.ip_address(a) for a in answers[host]])
    with pytest.raises(ImageError, match="'intranet.example' resolves to 10.1.2.3, a private address"):
        load_image("https://intranet.example/cat.png", UNTRUSTED)
    with pytest.raises(ImageError, match="resolves to 192.168.0.9"):  # one bad answer is enough
        load_image("https://mixed.example/cat.png", UNTRUSTED)


def test_address_refusal_allows_public_addresses() -> None:
    import ipaddress

    for public in ("93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert images.address_refusal(ipaddress.ip_address(public)) is None, public


def test_urls_refused_when_policy_says_so() -> None:
    with pytest.raises(ImageError, match="fetching URLs is not allowed"):
        load_image("https://example.com/a.png", dataclasses.replace(UNTRUSTED, allow_urls=False))


def test_url_with_credentials_or_no_host() -> None:
    with pytest.raises(ImageError, match="credentials"):
        load_image("http://user:pw@example.com/a.png", UNTRUSTED)
    with pytest.raises(ImageError, match="no host"):
        load_image("http:///a.png", UNTRUSTED)
    with pytest.raises(ImageError, match="malformed URL"):
        load_image("http://example.com:99999/a.png", UNTRUSTED)


# --------------------------------------------------------------------------------------------------
# URLs: a real fetch from a local server


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    stopping: threading.Event
    seen: list[tuple[str, str | None]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
             length: int | None = -1) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client hung up on purpose (byte cap)
            pass

    def trickle(self) -> None:
        self.send_response(200)
        self.end_headers()
        for _ in range(200):  # one byte every 50 ms for at most 10 s
            if self.server.stopping.wait(0.05):
                return
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        png = IMG_A.read_bytes()
        routes = {
            "/img.png": lambda: self.send(200, png, {"Content-Type": "image/png"}),
            "/img%20name.png": lambda: self.send(200, png),
            "/redirect": lambda: self.send(302, headers={"Location": "/img.png"}),
            "/redirect-absolute": lambda: self.send(
                301, headers={"Location": f"http://127.0.0.1:{self.server.server_port}/redirect"}),
            "/loop": lambda: self.send(302, headers={"Location": "/loop"}),
            "/to-file": lambda: self.send(302, headers={"Location": "file:///etc/passwd"}),
            "/to-metadata": lambda: self.send(302, headers={"Location": "http://169.254.169.254/latest/"}),
            "/no-location": lambda: self.send(302),
            "/html": lambda: self.send(200, b"<html><body>Forbidden</body></html>", {"Content-Type": "text/html"}),
            "/big": lambda: self.send(200, b"\0" * 2**20),
            "/big-undeclared": lambda: self.send(200, b"\0" * 2**20, length=None),
            "/short": lambda: self.send(200, png[:50], length=len(png)),
            "/slow": lambda: self.server.stopping.wait(10.0) or self.send(200, png),
            "/trickle": self.trickle,
        }
        routes.get(self.path, lambda: self.send(404, b"not here"))()


@pytest.fixture(scope="module")
def server() -> str:
    """http://127.0.0.1:PORT of a local server; stops at teardown, or by itself after 120 s."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.stopping, srv.seen = threading.Event(), []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, srv.shutdown)
    watchdog.daemon = True
    watchdog.start()
    yield f"http://127.0.0.1:{srv.server_port}", srv
    srv.stopping.set()
    watchdog.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


LOCAL = dataclasses.replace(UNTRUSTED, allow_private_urls=True, url_timeout_s=5.0)


def test_url_fetch(server) -> None:
    base, _ = server
    expected = reference_rgb(IMG_A)
    for url in (f"{base}/img.png", f"{base}/img name.png", f"{base}/redirect", f"{base}/redirect-absolute"):
        assert np.array_equal(np.asarray(load_image(url, LOCAL)), expected), url
    assert np.array_equal(np.asarray(load_image(f"{base}/img.png")), expected)  # TRUSTED allows loopback


def test_url_refused_under_untrusted_even_when_it_is_up(server, no_connections: None) -> None:
    base, _ = server
    with pytest.raises(ImageError, match="a loopback address"):
        load_image(f"{base}/img.png", UNTRUSTED)


def test_fetch_connects_to_the_checked_address_and_sends_the_host(server, monkeypatch) -> None:
    import ipaddress

    base, srv = server
    port = srv.server_port
    calls = []

    def resolver(host: str, p: int):
        calls.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(images, "resolve_host", resolver)
    load_image(f"http://images.test:{port}/img.png", LOCAL)
    assert calls == ["images.test"]  # resolved once; http.client never resolved it again
    assert srv.seen[-1] == ("/img.png", f"images.test:{port}")


def test_redirect_targets_are_rechecked(server, monkeypatch) -> None:
    base, _ = server
    real = images.address_refusal
    # Pretend 127.0.0.1 is public so the first hop passes the UNTRUSTED check.
    monkeypatch.setattr(images, "address_refusal", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    policy = dataclasses.replace(UNTRUSTED, url_timeout_s=5.0)
    assert load_image(f"{base}/redirect", policy).size == (80, 60)
    with pytest.raises(ImageError, match=r"169\.254\.169\.254, a link-local address") as e:
        load_image(f"{base}/to-metadata", policy)
    assert "redirected from" in str(e.value)
    with pytest.raises(ImageError, match="scheme 'file://' is not allowed"):
        load_image(f"{base}/to-file", policy)


@pytest.mark.parametrize("path,message", [
    ("/missing", "HTTP 404 Not Found"),
    ("/loop", "more than max_redirects=3 redirects"),
    ("/no-location", "redirect without a Location header"),
    ("/html", "looks like text/HTML"),
    ("/short", "download incomplete"),
])
def test_url_failures(server, path: str, message: str) -> None:
    base, _ = server
    with pytest.raises(ImageError, match=message) as e:
        load_image(base + path, LOCAL)
    assert "127.0.0.1" in str(e.value)


@pytest.mark.parametrize("path,message", [
    ("/big", r"download \(Content-Length\) is 1,048,576 bytes"),
    ("/big-undeclared", r"download \(so far\) is [\d,]+ bytes, more than .*max_bytes=100,000"),
])
def test_oversized_download_refused(server, path: str, message: str) -> None:
    base, _ = server
    with pytest.raises(ImageError, match=message):
        load_image(base + path, dataclasses.replace(LOCAL, max_bytes=100_000))


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_timeout_bounds_the_whole_fetch(server, path: str) -> None:
    base, _ = server
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"timed out \(the image policy allows 0.3 s per fetch\)"):
        load_image(base + path, dataclasses.replace(LOCAL, url_timeout_s=0.3))
    # Both would take 10 s without a deadline on the whole fetch (/trickle never stalls 0.3 s); a generous
    # bound keeps this a behaviour check, not a speed check.
    assert time.monotonic() - start < 5


def test_connection_refused_is_an_image_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(ImageError, match="network error"):
        load_image(f"http://127.0.0.1:{port}/a.png", LOCAL)


# --------------------------------------------------------------------------------------------------
# Policy objects


def test_presets() -> None:
    assert not UNTRUSTED.allow_local_files and UNTRUSTED.allow_urls and not UNTRUSTED.allow_private_urls
    assert TRUSTED.allow_local_files and TRUSTED.allow_urls and TRUSTED.allow_private_urls
    assert TRUSTED.allowed_dirs == () and "EPS" not in (TRUSTED.formats or ())
    assert UNTRUSTED.max_pixels < TRUSTED.max_pixels and UNTRUSTED.max_bytes < TRUSTED.max_bytes
    assert ImagePolicy() == UNTRUSTED  # safe by default
    with pytest.raises(dataclasses.FrozenInstanceError):
        UNTRUSTED.allow_local_files = True  # type: ignore[misc]


def test_policy_validation() -> None:
    bad = [
        dict(max_pixels=0), dict(max_bytes=-1), dict(url_timeout_s=0), dict(max_redirects=-1),
        dict(formats=("JPG",)), dict(formats="PNG"), dict(allowed_dirs="/tmp"),
        dict(allowed_dirs=("/tmp",)),  # without allow_local_files
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            ImagePolicy(**kwargs)
    policy = ImagePolicy(allow_local_files=True, allowed_dirs=["/tmp"], formats=["png"])
    assert policy.allowed_dirs == (Path("/tmp"),) and policy.formats == ("PNG",)


def test_image_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)


# --------------------------------------------------------------------------------------------------
# Hostile inputs


PNG = IMG_A.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=512),
    st.builds(lambda i, b: PNG[:i] + b + PNG[i + len(b):], st.integers(0, len(PNG)), st.binary(max_size=16)),
))
def test_hostile_bytes_give_rgb_or_image_error(data: bytes) -> None:
    try:
        img = load_image(data, UNTRUSTED)
    except ImageError:
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_hostile_strings_under_untrusted_never_touch_disk_or_network(text: str) -> None:
    def no_dns(host: str, port: int):
        raise socket.gaierror(-2, "resolution disabled in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "resolve_host", no_dns)
        mp.setattr(images, "_read_regular_file", lambda *a, **k: pytest.fail("a file was read"))
        for source in (text, "data:;base64," + text, "http://" + text):
            try:
                load_image(source, UNTRUSTED)
            except ImageError:
                pass


def test_background_composites_transparency_for_qwen2_vl_and_empty_source_is_named():
    """v1 drops alpha (its reference); Qwen2-VL's loader composites onto white, as transformers does."""
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buf, "PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(buf.getvalue(), background=(255, 255, 255)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match="the source is empty"):
        load_image("  ")
