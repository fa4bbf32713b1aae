"""Images in: load from a path, URL, data URI, bytes or PIL image under an explicit ImagePolicy, then
turn the RGB image into model pixels (Qwen-VL v1: square bicubic resize + OpenAI-CLIP normalisation).

Every loading failure is an `ImageError` (a ValueError) whose message names the source and says what
to do. The policy decides where images may come from (local files, which directories, URLs, private
network addresses) and how big they may be (encoded bytes, decoded pixels, allowed formats):

    >>> img = load_image("tests/fixtures/qwen_vl_tiny/img_a.png")            # TRUSTED by default
    >>> preprocess_v1(img, 448).shape
    torch.Size([3, 448, 448])
    >>> load_image("/etc/passwd", UNTRUSTED)                                 # doctest: +SKIP
    ImageError: cannot load image /etc/passwd: reading local files is not allowed by this image policy ...

URL fetching resolves the host once, refuses non-public addresses unless the policy allows them, and
connects to exactly the address it checked (so DNS rebinding cannot swap it), re-checking every
redirect. Proxies (HTTP_PROXY etc.) are deliberately not used: a proxy would do its own resolution.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "ImageError", "ImagePolicy", "TRUSTED", "UNTRUSTED", "ImageSource", "load_image", "to_rgb",
    "preprocess_v1", "preprocess_v1_batch", "image_digest", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
    "WEB_FORMATS", "COMMON_FORMATS",
]

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# OpenAI CLIP normalisation constants (openai/CLIP clip.py `_transform`), used unchanged by Qwen-VL's
# visual.py `image_transform` (reference notes §5.1).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# What OpenAI's chat API accepts (PNG, JPEG, WebP, GIF) plus BMP: mature, widely fuzzed decoders.
# Pillow reports phone JPEGs with a multi-picture block as "MPO"; they are opened through "JPEG".
WEB_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Everything a person may reasonably point the CLI at. EPS is left out on purpose: Pillow decodes it
# by running Ghostscript, which is not something a downloaded file should be able to trigger.
COMMON_FORMATS = WEB_FORMATS + ("TIFF", "AVIF", "JPEG2000", "PPM", "TGA", "ICO", "PSD", "QOI", "SGI", "PCX", "DDS")

USER_AGENT = "qwenvl-image-loader/0.1 (+https://github.com/QwenLM/Qwen-VL)"
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: last 32 bits are IPv4


class ImageError(ValueError):
    """An image could not be loaded; the message names the source and what to do about it."""


def _error(name: str, problem: str) -> ImageError:
    """The one message shape: 'cannot load image <source>: <problem>'."""
    return ImageError(f"cannot load image {name}: {problem}")


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how big they may be. The defaults are the UNTRUSTED ones.

    Change one field with `dataclasses.replace(UNTRUSTED, allow_local_files=True, allowed_dirs=(p,))`.
    """

    # Local files are off: a server that reads `<img>/etc/shadow</img>` from user text is a file leak.
    allow_local_files: bool = False
    # Directories local files must lie in, after resolving symlinks and `..`; empty = anywhere.
    allowed_dirs: tuple[Path, ...] = ()
    # Public http(s) URLs are the normal way to send an image to a server.
    allow_urls: bool = True
    # Loopback, private, link-local (cloud metadata 169.254.169.254), multicast, reserved: SSRF targets.
    allow_private_urls: bool = False
    # Total budget for one fetch, redirects included (DNS lookup excepted: the OS resolver has no timeout).
    url_timeout_s: float = 10.0
    max_redirects: int = 3
    # Encoded size from any source (download, data URI, bytes, file). 20 MiB: OpenAI's per-image limit.
    max_bytes: int = 20 * 2**20
    # Decoded size, checked from the header before pixels are decoded (decompression bombs).
    # 25 M: a 24-megapixel camera photo fits; at most 75 MB as RGB.
    max_pixels: int = 25_000_000
    # Pillow format names tried when opening; None = every format Pillow has.
    formats: tuple[str, ...] | None = WEB_FORMATS

    def __post_init__(self) -> None:
        """Normalise allowed_dirs/formats to tuples and refuse contradictory or non-positive settings."""
        if isinstance(self.allowed_dirs, (str, os.PathLike)):
            raise ValueError(f"allowed_dirs must be a tuple of directories, got {self.allowed_dirs!r}")
        object.__setattr__(self, "allowed_dirs", tuple(Path(d) for d in self.allowed_dirs))
        if self.formats is not None:
            object.__setattr__(self, "formats", _checked_formats(self.formats))
        if self.allowed_dirs and not self.allow_local_files:
            raise ValueError("allowed_dirs is set but allow_local_files is False; set both or neither")
        for field in ("url_timeout_s", "max_bytes", "max_pixels"):
            if not getattr(self, field) > 0:
                raise ValueError(f"ImagePolicy.{field} must be > 0, got {getattr(self, field)!r}")
        if self.max_redirects < 0:
            raise ValueError(f"ImagePolicy.max_redirects must be >= 0, got {self.max_redirects!r}")


def _checked_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """Upper-cased Pillow format names, refusing names Pillow does not know (e.g. 'JPG')."""
    if isinstance(formats, str):
        raise ValueError(f"formats must be a tuple of Pillow format names, got {formats!r}")
    Image.init()  # registers every plugin so Image.OPEN is complete
    names = tuple(f.upper() for f in formats)
    unknown = [f for f in names if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"unknown Pillow image formats {unknown}; known: {sorted(Image.OPEN)}")
    return names


# The server default: images arrive as data URIs or public URLs, never as paths on this machine.
UNTRUSTED = ImagePolicy()

# The Python API and the CLI: the person at the keyboard already has the machine, so local files
# anywhere and private URLs (a LAN file server) are fine. Caps stay, to catch mistakes rather than
# attacks: 60 s per fetch, 256 MiB encoded, 89,478,485 pixels (Pillow's own warning threshold, about
# 9459 x 9459, 268 MB as RGB) and no Ghostscript-backed EPS.
TRUSTED = ImagePolicy(
    allow_local_files=True,
    allow_private_urls=True,
    url_timeout_s=60.0,
    max_redirects=5,
    max_bytes=256 * 2**20,
    max_pixels=89_478_485,
    formats=COMMON_FORMATS,
)


# ---------------------------------------------------------------------------------------------------
# Entry point


def load_image(source: ImageSource, policy: ImagePolicy = TRUSTED,
               background: tuple[int, int, int] | None = None) -> Image.Image:
    """Load `source` (path, http(s) URL, data: URI, bytes or PIL image) as RGB under `policy`.

    Raises ImageError for every problem. The result is always a new image (the caller's is untouched);
    EXIF orientation is applied; an animated image gives its first frame (a PIL source: its current one).
    Transparency is dropped (Qwen-VL v1) or, with `background`, composited onto it (Qwen2-VL: white).
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        return _normalise(source, name, policy, background)
    return _decode(_read_source(source, name, policy), name, policy, background)


def describe_source(source: object, limit: int = 80) -> str:
    """A short, printable name for `source` in error messages.

    >>> describe_source("data:image/png;base64," + "A" * 1000)
    'data:image/png;base64,AAAAAAAA… (1022 chars)'
    >>> describe_source(b"abc")
    '<3 bytes>'
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in os.fspath(source)) \
        if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    if text[:5].lower() == "data:" and len(text) > 40:
        return f"{text[:text.find(',') + 9][:60]}… ({len(text)} chars)"
    if len(text) > limit:
        return f"{text[:limit // 2]}…{text[-(limit // 2 - 10):]} ({len(text)} chars)"
    return text


def _read_source(source: object, name: str, policy: ImagePolicy) -> bytes:
    """The encoded image bytes of a non-PIL source, with the policy's source rules applied."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_byte_count(len(source), policy.max_bytes, name)
        return bytes(source)
    if isinstance(source, os.PathLike):
        return _read_local(Path(source), name, policy)
    if not isinstance(source, str):
        raise _error(name, f"unsupported source type {type(source).__name__}; "
                           "expected a path, an http(s) URL, a data: URI, bytes or a PIL.Image")
    if not source.strip():
        raise _error(repr(source), "the source is empty; give a path, an http(s) URL or a data: URI")
    kind = source_kind(source)
    if kind == "data":
        return decode_data_uri(source.strip(), policy.max_bytes, name)
    if kind == "url":
        return _fetch_url(source.strip(), name, policy)
    return _read_local(Path(source), name, policy)


_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.\-]+):")  # 2+ letters, so "C:\\x.png" stays a path
_URL_SCHEMES = ("http", "https", "file", "ftp", "ftps", "sftp", "gopher", "ws", "wss", "smb", "dict", "ldap")


def source_kind(source: str) -> str:
    """'data', 'url' or 'path': a data: URI, `scheme://...` or a well-known URL scheme, or a path.

    >>> [source_kind(s) for s in ("data:;base64,aGk=", "ftp://h/a.png", "file:/a.png", "C:\\\\a.png", "a:b.png")]
    ['data', 'url', 'url', 'path', 'path']
    """
    match = _SCHEME.match(source)
    if match is None:
        return "path"
    scheme = match.group(1).lower()
    if scheme == "data":
        return "data"
    if scheme in _URL_SCHEMES or source[match.end():].startswith("//"):
        return "url"
    return "path"


def _check_byte_count(n_bytes: int, max_bytes: int, name: str, what: str = "image") -> None:
    """Refuse an encoded image larger than the policy's max_bytes."""
    if n_bytes > max_bytes:
        raise _error(name, f"{what} is {n_bytes:,} bytes, more than this image policy's "
                           f"max_bytes={max_bytes:,}; send a smaller (re-encoded or downscaled) image")


# ---------------------------------------------------------------------------------------------------
# Local files


def _read_local(path: Path, name: str, policy: ImagePolicy) -> bytes:
    """Bytes of a local file, if the policy allows local files from where it really is."""
    if not policy.allow_local_files:
        raise _error(name, "reading local files is not allowed by this image policy (the server "
                           "default); send the image as a data: URI or an http(s) URL, or use a "
                           "policy with allow_local_files=True")
    resolved = _resolve_path(path, name)
    _check_allowed_dir(resolved, name, policy.allowed_dirs)
    return _read_regular_file(resolved, name, policy.max_bytes, _base64_hint(str(path)))


def _resolve_path(path: Path, name: str) -> Path:
    """Absolute path with `~`, `..` and every symlink resolved (what will really be opened)."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:  # loops: RuntimeError before 3.13; NUL: ValueError
        raise _error(name, f"cannot resolve the path ({e})") from e


def _check_allowed_dir(resolved: Path, name: str, allowed_dirs: tuple[Path, ...]) -> None:
    """Refuse a resolved path outside every allowed directory (no-op when allowed_dirs is empty)."""
    if not allowed_dirs:
        return
    roots = [_resolve_path(d, str(d)) for d in allowed_dirs]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise _error(name, f"resolves to {resolved}, which is outside the allowed directories "
                           f"{[str(r) for r in roots]} (symlinks and '..' are resolved before checking)")


def _read_regular_file(path: Path, name: str, max_bytes: int, hint: str = "") -> bytes:
    """Read at most max_bytes + 1 bytes of a regular file, with one clear error per failure."""
    fd = _open_fd(path, name, hint)
    try:
        info = os.fstat(fd)
        _check_regular(info, path, name)
        _check_byte_count(info.st_size, max_bytes, name, "file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    _check_byte_count(len(data), max_bytes, name, "file")
    return data


def _open_fd(path: Path, name: str, hint: str) -> int:
    """os.open for reading that never hangs on a FIFO and never follows a final symlink."""
    # The path is already resolved: O_NOFOLLOW catches a symlink swapped in after the check.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise _error(name, f"file not found ({path}){hint}") from None
    except PermissionError:
        raise _error(name, f"permission denied reading {path}") from None
    except OSError as e:
        raise _error(name, f"cannot open it: {e.strerror or e}{hint}") from None


def _check_regular(st: os.stat_result, path: Path, name: str) -> None:
    """Refuse directories, devices, FIFOs and sockets."""
    if stat.S_ISDIR(st.st_mode):
        raise _error(name, f"{path} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise _error(name, f"{path} is not a regular file (device, FIFO or socket)")


def _base64_hint(text: str) -> str:
    """A hint for error messages when a 'path' looks like bare base64 image data."""
    if len(text) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=_\-\s]+", text):
        return "; if this is base64 image data, prefix it with 'data:image/png;base64,'"
    return ""


# ---------------------------------------------------------------------------------------------------
# data: URIs


def decode_data_uri(uri: str, max_bytes: int, name: str = "data: URI") -> bytes:
    """Bytes of a base64 `data:` URI; loose headers ('data:image;base64,', 'data:;base64,') are fine.

    >>> decode_data_uri("data:;base64,aGk=", max_bytes=10)
    b'hi'
    """
    header, comma, payload = uri.partition(",")
    if header[:5].lower() != "data:":
        raise _error(name, "not a data: URI")
    if not comma:
        raise _error(name, "data URI has no ',' between the header and the data")
    if not any(p.strip().lower() == "base64" for p in header[5:].split(";")):
        raise _error(name, f"only base64 data URIs are supported (header {header!r} lacks ';base64')")
    payload = re.sub(r"\s+", "", urllib.parse.unquote(payload) if "%" in payload else payload)
    if not payload:
        raise _error(name, "data URI has no data after the ','")
    _check_byte_count(len(payload) * 3 // 4, max_bytes, name, "decoded data URI")
    return _b64decode(payload, name)


def _b64decode(text: str, name: str) -> bytes:
    """Strict base64 decoding that tolerates missing '=' padding and the URL-safe alphabet ('-', '_')."""
    if "-" in text or "_" in text:
        text = text.translate(str.maketrans("-_", "+/"))
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _error(name, f"bad base64 data ({e}); expected only A-Z, a-z, 0-9, '+', '/' "
                           "and '=' padding after the ','") from None


# ---------------------------------------------------------------------------------------------------
# URLs


def _fetch_url(url: str, name: str, policy: ImagePolicy) -> bytes:
    """GET an http(s) URL under the policy, following at most policy.max_redirects redirects."""
    if not policy.allow_urls:
        raise _error(name, "fetching URLs is not allowed by this image policy; send a data: URI instead")
    deadline = time.monotonic() + policy.url_timeout_s
    for hop in range(policy.max_redirects + 1):
        hop_name = name if hop == 0 else f"{describe_source(url)} (redirected from {name})"
        body, location = _fetch_once(url, hop_name, policy, deadline)
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)
    raise _error(name, f"more than max_redirects={policy.max_redirects} redirects (next: {describe_source(url)})")


def parse_http_url(url: str, name: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of an http(s) URL; every other scheme is refused.

    >>> parse_http_url("https://example.com/a b.png?x=1", "u")
    ('https', 'example.com', 443, '/a%20b.png?x=1')
    """
    try:
        parts = urllib.parse.urlsplit(url)
        explicit_port = parts.port
    except ValueError as e:  # bad brackets, non-numeric or out-of-range port
        raise _error(name, f"malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _error(name, f"URL scheme {scheme + '://'!r} is not allowed; only http:// and https:// "
                           "URLs are fetched (send local images as a path or a data: URI)")
    if parts.username is not None or parts.password is not None:
        raise _error(name, "URLs with user:password@ credentials are not supported")
    port = explicit_port or (443 if scheme == "https" else 80)
    if not parts.hostname:
        raise _error(name, "URL has no host")
    path = urllib.parse.quote(parts.path or "/", safe="/%!$&'()*+,;=:@~")  # non-ASCII, spaces → %XX
    query = urllib.parse.quote(parts.query, safe="/%!$&'()*+,;=:@~?")
    return scheme, parts.hostname, port, path + ("?" + query if query else "")


def address_refusal(ip: IPAddress) -> str | None:
    """Why `ip` is not a public internet address (None if it is). IPv4 inside IPv6 is unwrapped.

    >>> address_refusal(ipaddress.ip_address("::ffff:169.254.169.254"))
    'link-local'
    >>> address_refusal(ipaddress.ip_address("93.184.216.34")) is None
    True
    """
    embedded = _embedded_ipv4(ip)
    ip = ip if embedded is None else embedded
    for label in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved", "site_local"):
        if getattr(ip, f"is_{label}", False):
            return label.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address carried by an IPv4-mapped (::ffff:a.b.c.d), 6to4 or NAT64 IPv6 address."""
    if ip.version == 4:
        return None
    for embedded in (ip.ipv4_mapped, ip.sixtofour):
        if embedded is not None:
            return embedded
    if ip in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in resolver order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _checked_addresses(host: str, port: int, name: str, policy: ImagePolicy) -> list[IPAddress]:
    """Resolve `host` once; refuse it if any address is non-public and the policy wants public only."""
    try:
        addresses = resolve_host(host, port)
    except (socket.gaierror, UnicodeError) as e:
        raise _error(name, f"cannot resolve host {host!r} ({e})") from None
    if not policy.allow_private_urls:
        for ip in addresses:
            reason = address_refusal(ip)
            if reason is not None:
                raise _error(name, f"refusing to fetch: host {host!r} resolves to {ip}, a {reason} "
                                   "address, and this image policy only fetches public internet "
                                   "addresses (use a policy with allow_private_urls=True to allow it)")
    return addresses


def _fetch_once(url: str, name: str, policy: ImagePolicy, deadline: float) -> tuple[bytes, str | None]:
    """One GET: (body, None) on 200, (b'', location) on a redirect; ImageError otherwise."""
    scheme, host, port, target = parse_http_url(url, name)
    addresses = _checked_addresses(host, port, name, policy)
    with _network_errors(name, policy.url_timeout_s):
        conn = _connect(scheme, host, port, addresses, _remaining(deadline))
        sock = conn.sock  # kept: http.client drops conn.sock once a closing response starts
        try:
            conn.request("GET", target, headers={
                "User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"})
            sock.settimeout(_remaining(deadline))
            response = conn.getresponse()
            return _handle_response(response, sock, name, policy, deadline)
        finally:
            conn.close()


def _connect(scheme: str, host: str, port: int, addresses: list[IPAddress],
             timeout: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to the first reachable *checked* address; Host/SNI stay `host`."""
    sock = _connect_socket(addresses, port, timeout)
    if scheme == "https":
        try:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock  # preset: http.client never resolves `host` itself, so no second DNS answer
    return conn


def _connect_socket(addresses: list[IPAddress], port: int, timeout: float) -> socket.socket:
    """A TCP socket to the first of `addresses` that accepts; re-raises the last error otherwise."""
    error: OSError = OSError("host resolved to no addresses")
    for ip in addresses:
        try:
            return socket.create_connection((str(ip), port), timeout=timeout)
        except OSError as e:
            error = e
    raise error


def _remaining(deadline: float) -> float:
    """Seconds left before the fetch deadline; raises TimeoutError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("fetch deadline passed")
    return left


def _handle_response(response: http.client.HTTPResponse, sock: socket.socket, name: str,
                     policy: ImagePolicy, deadline: float) -> tuple[bytes, str | None]:
    """Body of a 200, Location of a redirect, or an ImageError naming the HTTP status."""
    if response.status in _REDIRECT_STATUSES:
        location = response.getheader("Location")
        if not location:
            raise _error(name, f"HTTP {response.status} redirect without a Location header")
        return b"", location
    if response.status != 200:
        raise _error(name, f"the server answered HTTP {response.status} {response.reason}"
                           " (check the URL, and that it is publicly readable)")
    return _read_body(response, sock, name, policy.max_bytes, deadline), None


def _read_body(response: http.client.HTTPResponse, sock: socket.socket, name: str,
               max_bytes: int, deadline: float) -> bytes:
    """Stream the body, stopping as soon as it exceeds max_bytes or the deadline passes."""
    declared = response.getheader("Content-Length", "")
    if declared.strip().isdigit():
        _check_byte_count(int(declared), max_bytes, name, "download (Content-Length)")
    chunks, total = [], 0
    while True:
        sock.settimeout(_remaining(deadline))
        chunk = response.read1(64 * 1024)  # read1: one recv at a time, so the deadline is honoured
        if not chunk:
            break
        total += len(chunk)
        _check_byte_count(total, max_bytes, name, "download (so far)")
        chunks.append(chunk)
    if response.length:  # bytes promised by Content-Length that never came
        raise _error(name, f"download incomplete: the connection closed after {total:,} bytes")
    return b"".join(chunks)


@contextlib.contextmanager
def _network_errors(name: str, timeout_s: float) -> Iterator[None]:
    """Turn socket, TLS and HTTP protocol errors into ImageErrors that say what went wrong."""
    try:
        yield
    except TimeoutError:
        raise _error(name, f"timed out (the image policy allows {timeout_s:g} s per fetch)") from None
    except ssl.SSLCertVerificationError as e:
        raise _error(name, f"TLS certificate verification failed ({e.verify_message})") from None
    except ssl.SSLError as e:
        raise _error(name, f"TLS error ({e})") from None
    except http.client.HTTPException as e:
        raise _error(name, f"bad HTTP response ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise _error(name, f"network error ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------------
# Decoding and normalisation


def _decode(data: bytes, name: str, policy: ImagePolicy,
            background: tuple[int, int, int] | None = None) -> Image.Image:
    """Encoded bytes → RGB image: identify, check the header's size, decode, orient, convert."""
    if not data:
        raise _error(name, "it is empty (0 bytes), not an image")
    return _normalise(_open(data, name, policy), name, policy, background)


def _open(data: bytes, name: str, policy: ImagePolicy) -> Image.Image:
    """Identify the image and read its header only (Pillow opens lazily)."""
    try:
        return Image.open(io.BytesIO(data), formats=policy.formats)
    except Image.DecompressionBombError as e:  # Pillow's own hard limit, above any sane policy
        raise _error(name, f"too many pixels ({e}); this image policy allows at most "
                           f"max_pixels={policy.max_pixels:,}") from None
    except Image.UnidentifiedImageError:
        raise _error(name, _unidentified(data, policy.formats)) from None
    except Exception as e:  # hostile headers make plugins raise anything; all of it means "corrupt"
        raise _error(name, f"corrupt image header ({type(e).__name__}: {e})") from e


_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"%!PS", "a PostScript/EPS file"),
    (b"<", "text/HTML/XML (an SVG, or an error page instead of the image?)"),
    (b"{", "JSON text"),
)


def _unidentified(data: bytes, formats: tuple[str, ...] | None) -> str:
    """Why Pillow could not identify `data`, with a guess at what it really is."""
    allowed = ", ".join(formats) if formats else "any format Pillow supports"
    start = data[:64].lstrip()
    guess = next((what for sig, what in _SIGNATURES if start.startswith(sig)), None)
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1"):
        guess = "HEIC/HEIF, which is not supported; convert it to JPEG or PNG"
    looks = f" it looks like {guess};" if guess else ""
    return (f"not an image in a supported format;{looks} this image policy reads {allowed} "
            f"(first bytes: {data[:16]!r})")


def _normalise(img: Image.Image, name: str, policy: ImagePolicy,
               background: tuple[int, int, int] | None = None) -> Image.Image:
    """Size check (before any decoding), decode, EXIF orientation, RGB."""
    check_pixel_count(img.size, policy.max_pixels, name)
    try:
        img.load()  # frame 0 only: animated GIF/WebP/APNG give their first frame
        oriented = ImageOps.exif_transpose(img)  # always a new image
    except Exception as e:
        raise _error(name, f"corrupt or truncated image data ({type(e).__name__}: {e})") from e
    try:
        return to_rgb(oriented, background)
    except ValueError as e:
        raise _error(name, f"cannot convert pixel mode {oriented.mode!r} to RGB ({e})") from None


def check_pixel_count(size: tuple[int, int], max_pixels: int, name: str) -> None:
    """Refuse images with no pixels or more than max_pixels (width × height from the header).

    >>> check_pixel_count((50000, 50000), 25_000_000, "bomb.png")
    Traceback (most recent call last):
    ...
    qwenvl.images.ImageError: cannot load image bomb.png: 50000x50000 = 2,500,000,000 pixels is more than this image policy's max_pixels=25,000,000 (a decompression-bomb guard); downscale the image first
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise _error(name, f"it has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _error(name, f"{width}x{height} = {width * height:,} pixels is more than this image "
                           f"policy's max_pixels={max_pixels:,} (a decompression-bomb guard); "
                           "downscale the image first")


def to_rgb(img: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Any Pillow mode → RGB. Without `background`, as the Qwen-VL reference does: alpha is dropped, not
    composited; with it (Qwen2-VL: white, as transformers and qwen-vl-utils do) transparency is composited onto it.

    16-bit, 32-bit and float greyscale are scaled to 0..255 (Pillow alone would clip them; so does the
    official Qwen2-VL processor: a deliberate difference). An opaque RGB input is returned as is (not copied).

    >>> to_rgb(Image.new("RGBA", (1, 1), (10, 20, 30, 0))).getpixel((0, 0))
    (10, 20, 30)
    >>> to_rgb(Image.new("RGBA", (1, 1), (10, 20, 30, 0)), background=(255, 255, 255)).getpixel((0, 0))
    (255, 255, 255)
    >>> to_rgb(Image.new("I;16", (1, 1), 32896)).getpixel((0, 0))
    (128, 128, 128)
    """
    if background is not None and ("A" in img.getbands() or img.info.get("transparency") is not None):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(grey_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the palette's RGB under the transparency, like RGBA → RGB
    return img.convert("RGB")


def grey_to_uint8(levels: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth grey levels linearly onto 0..255 (rounded).

    The range mapped is the first natural one the values fit (I;16 and I: 0..65535; F: 0..1, then
    0..255 as Pillow's own L → F gives), otherwise the values' own min..max; NaN counts as the minimum.

    >>> grey_to_uint8(np.array([[0, 257, 65535]], dtype=np.uint16), "I;16").tolist()
    [[0, 1, 255]]
    >>> grey_to_uint8(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), "F").tolist()
    [[0, 128, 255]]
    """
    values = levels.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    for natural in (1.0, 255.0) if mode == "F" else (65535.0,):
        if low >= 0 and high <= natural:
            low, high = 0.0, natural
            break
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Model pixels and cache keys


def preprocess_v1(image: Image.Image, image_size: int) -> torch.Tensor:
    """Qwen-VL v1 pixels [3, S, S] float32: square bicubic resize, /255, OpenAI-CLIP normalisation.

    Matches the reference `image_transform` (torchvision Resize on a PIL image is PIL's own resize).

    >>> preprocess_v1(Image.new("RGB", (80, 60), (255, 255, 255)), 112)[:, 0, 0]
    tensor([1.9303, 2.0749, 2.1459])
    """
    if image.mode != "RGB":
        raise ValueError(f"preprocess_v1 needs an RGB image, got mode {image.mode!r}; use load_image()")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    square = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(square, dtype=np.uint8))  # [S, S, 3] uint8
    x = pixels.permute(2, 0, 1).contiguous().float() / 255  # [3, S, S] in [0, 1]
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def preprocess_v1_batch(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    """preprocess_v1 for each image, stacked to [N, 3, S, S] (N may be 0)."""
    if not images:
        return torch.empty(0, 3, image_size, image_size)
    return torch.stack([preprocess_v1(img, image_size) for img in images])


def image_digest(image: Image.Image) -> str:
    """sha256 hex of mode, size, palette and pixel bytes: a cache key for image features.

    >>> image_digest(Image.new("RGB", (2, 1))) == image_digest(Image.new("RGB", (1, 2)))
    False
    """
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    if image.mode in ("P", "PA"):
        digest.update(bytes(image.getpalette() or []))
    digest.update(image.tobytes())
    return digest.hexdigest()
