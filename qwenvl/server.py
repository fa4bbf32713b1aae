"""An OpenAI-style HTTP server for Qwen-VL-Chat (FastAPI + uvicorn), and the web page at `/`.

    POST /v1/chat/completions   messages with text / image_url / image parts; stream=true sends SSE
    GET  /v1/models             the one model served
    GET  /health                engine counters (rows, waiting, feature- and prefix-cache hits, ...)
    GET  /                      the chat page (qwenvl/web/index.html), which uses only the endpoint above

One request: JSON --parse_chat_request (limits, 4xx naming the parameter)--> messages + image sources
--load_image (thread pool, ImagePolicy)--> pixels + content keys --messages.render_messages--> prompt ids
--EngineThread--> token ids --TextStream--> text deltas --> chat.completion(.chunk) JSON.

Safe by default: user text is data (`encode_untrusted`: no special tokens, no `<img>path</img>`);
images come only from content parts, as data: URIs or public http(s) URLs (`images.UNTRUSTED`: fetch
timeout, byte cap, no private/loopback/link-local addresses, pixel cap); local files only inside
`ServeConfig.allowed_image_dirs`. Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.

Structured boxes (an extension of the OpenAI schema): the assistant message (when streaming: the delta
of the last chunk) carries, next to the text that keeps its <ref>/<box> tags,
    "boxes": [{"image": 0, "ref": "the dog", "box_1000": [x1, y1, x2, y2], "box_px": [x1, y1, x2, y2]}]
`image` is the 0-based index, over the whole conversation, of the image the box refers to: the latest
image before the answer, as the official `draw_bbox_on_latest_picture` assumes. `box_1000` is the model's
[0, 1000) box; `box_px` is that box in the image's pixels (grounding.to_pixels, scale 1000, as the
official drawing). No image in the conversation: no boxes.

Qwen2-VL checkpoints are served the same way (families.py says what differs): images keep their size
within `min_pixels`/`max_pixels` (request body fields, default the checkpoint's preprocessor config), a
request whose images need more than `ServeConfig.max_visual_tokens` tokens is a 400, and boxes are read in
the `<|box_start|>` syntax.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import DEFAULT_SYSTEM
from .config import GenerationConfig
from .engine import Engine, EngineFull, EngineThread, ImageInput, Output, Request
from .families import QwenVLFamily, family_of
from .images import UNTRUSTED, ImageError, ImagePolicy
from .messages import ImageSlot, Message, Text, check_roles
from .sampling import SamplingParams

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Limits (OpenAI's where it has one)

MAX_BODY_BYTES = 32 * 2**20         # a 20 MiB image as base64 is 27 MiB
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 200_000            # all text parts together, checked before tokenizing
MAX_IMAGES = 8                      # per request, over the whole conversation
MAX_STOP = 4                        # OpenAI: up to 4 stop strings
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0               # OpenAI's range: [0, 2]
MAX_VISUAL_TOKENS = 16384           # Qwen2-VL: image tokens per request (the hub's max_pixels for one image)
MAX_PIXELS_LIMIT = 16384 * 28 * 28  # Qwen2-VL: the largest min_pixels / max_pixels a request may ask for
DISCONNECT_POLL_S = 0.5             # how often a waiting request checks that its client is still there
WEB_PAGE = Path(__file__).parent / "web" / "index.html"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass
class ServeConfig:
    """What `qwenvl serve` can set. The defaults are the safe ones; loosening is explicit."""

    model_name: str = "qwen-vl-chat"
    max_batch: int = 8                   # requests decoded together
    max_len: int = 2048                  # prompt + answer tokens of one request
    kv_budget_bytes: int | None = None   # caps the cache rows (engine.py); None: max_batch rows
    feature_cache_bytes: int = 256 * 2**20
    prefix_cache_bytes: int = 256 * 2**20   # K/V of prompt prefixes ending with an image (engine.py)
    default_max_tokens: int = 512        # when a request gives no max_tokens (cut to what fits)
    max_images: int = MAX_IMAGES
    allowed_image_dirs: tuple[Path, ...] = ()   # local image files only from here; empty: none
    allow_private_urls: bool = False     # loopback / private / link-local image URLs
    image_timeout_s: float = 10.0
    max_image_bytes: int = 20 * 2**20
    system: str = DEFAULT_SYSTEM         # when the conversation has no system message
    max_visual_tokens: int = MAX_VISUAL_TOKENS   # Qwen2-VL: image tokens per request (400 above)

    def image_policy(self) -> ImagePolicy:
        dirs = tuple(Path(d) for d in self.allowed_image_dirs)
        return dataclasses.replace(UNTRUSTED, allow_local_files=bool(dirs), allowed_dirs=dirs,
                                   allow_private_urls=self.allow_private_urls, url_timeout_s=self.image_timeout_s,
                                   max_bytes=self.max_image_bytes)


class APIError(Exception):
    """An error the client can act on, sent as OpenAI's {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------
# Request parsing (pure: JSON in, ChatRequest out, APIError(400) naming the parameter)


@dataclass
class ChatRequest:
    messages: list[Message]
    image_sources: list[str]             # in conversation order, one per ImageSlot
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    min_pixels: int | None = None        # Qwen2-VL only (a 400 on v1): per-image pixel limits
    max_pixels: int | None = None


# Refused unless absent or a no-op (None, False, 0, [], {}): a client asking for them would get answers
# without them and not know.
_UNSUPPORTED = {"tools": "tools", "functions": "function calling", "tool_choice": "tools",
                "function_call": "function calling", "logprobs": "logprobs", "response_format": "response_format",
                "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                "logit_bias": "logit_bias"}


def parse_chat_request(body: Any, config: ServeConfig) -> ChatRequest:
    """Validate an OpenAI chat request body; unknown fields are ignored, unsupported features refused."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    for key, what in _UNSUPPORTED.items():
        if body.get(key) not in (None, False, [], {}):
            raise APIError(400, f"{what} is not supported by this server", key)
    if body.get("n") not in (None, 1):
        raise APIError(400, "n must be 1: this server returns one choice", "n")
    if body.get("model") not in (None, config.model_name):
        raise APIError(404, f"the model {body['model']!r} does not exist; this server serves "
                            f"{config.model_name!r}", "model", "model_not_found")
    messages, sources = _parse_messages(body.get("messages"))
    if len(sources) > config.max_images:
        raise APIError(400, f"{len(sources)} images is more than this server's limit of {config.max_images} "
                            "per request", "messages")
    stream = _typed(body, "stream", bool) or False
    options = _typed(body, "stream_options", dict) or {}
    include_usage = _typed(options, "include_usage", bool) or False
    return ChatRequest(messages, sources, stream=stream, include_usage=include_usage,
                       temperature=_number(body, "temperature", 0.0, MAX_TEMPERATURE),
                       top_p=_number(body, "top_p", 0.0, 1.0), max_tokens=_max_tokens(body),
                       stop=_stop(body.get("stop")), seed=_seed(body.get("seed")),
                       min_pixels=_pixels(body, "min_pixels"), max_pixels=_pixels(body, "max_pixels"))


def _pixels(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 28 * 28 <= value <= MAX_PIXELS_LIMIT:
        raise APIError(400, f"{key} must be an integer in [{28 * 28}, {MAX_PIXELS_LIMIT}], got {value!r}", key)
    return value


def _typed(body: dict, key: str, kind: type) -> Any:
    value = body.get(key)
    if value is not None and not isinstance(value, kind):
        raise APIError(400, f"{key} must be a {kind.__name__}, got {type(value).__name__}", key)
    return value


def _number(body: dict, key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number, got {value!r}", key)
    if not lo <= value <= hi:
        raise APIError(400, f"{key}={value} is out of range: use a value in [{lo:g}, {hi:g}]", key)
    return float(value)


def _max_tokens(body: dict) -> int | None:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APIError(400, f"{key} must be a positive integer, got {value!r}", key)
    return value


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters", "stop")
    return stops


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise APIError(400, f"seed must be an integer in [0, 2**63), got {value!r}", "seed")
    return value


def _parse_messages(raw: Any) -> tuple[list[Message], list[str]]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", "messages")
    if len(raw) > MAX_MESSAGES:
        raise APIError(400, f"{len(raw)} messages is more than this server's limit of {MAX_MESSAGES}", "messages")
    messages, sources, n_chars = [], [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        parts = _parse_content(m.get("content"), f"messages[{i}].content", sources)
        n_chars += sum(len(p.text) for p in parts if isinstance(p, Text))
        messages.append(Message(m["role"], tuple(parts)))
    if n_chars > MAX_TEXT_CHARS:
        raise APIError(400, f"the messages hold {n_chars:,} characters of text, more than this server's limit "
                            f"of {MAX_TEXT_CHARS:,}", "messages")
    return messages, sources


def _parse_content(content: Any, where: str, sources: list[str]) -> list[Text | ImageSlot]:
    """A string, null, or a list of parts: text, image_url ({"url"} or a string), Qwen's image."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Text(content)]
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", where)
    parts: list[Text | ImageSlot] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(Text(part["text"]))
        elif kind in ("image_url", "image"):
            sources.append(_image_source(part, f"{where}[{j}]"))
            parts.append(ImageSlot())
        else:
            raise APIError(400, f"{where}[{j}] must be {{'type': 'text', 'text': ...}}, "
                                "{'type': 'image_url', 'image_url': {'url': ...}} or {'type': 'image', 'image': ...}",
                           f"{where}[{j}]")
    return parts


def _image_source(part: dict, where: str) -> str:
    value = part.get(part["type"])
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.strip():
        raise APIError(400, f"{where} has no image: give a data: URI or an http(s) URL", where)
    return url.strip()


# ---------------------------------------------------------------------------------------------------
# Token ids -> text


class TextStream:
    """Generated ids -> text deltas. Holds back an incomplete UTF-8 character and any tail that could be
    the start of a stop string; ends the text before the first stop string.

    Example (stop ["END"]): ids of "ab", "E", "N", "D!" give deltas "ab", "", "", "" and `stopped`;
    `text` is "ab". Image-span ids and ids outside the vocabulary are dropped (an answer has no images);
    <ref>/<box>/<quad> tags are kept.
    """

    def __init__(self, tokenizer, stop: list[str] = (), family=None):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.family = family or QwenVLFamily(None)       # how ids become text (v1 by default)
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now certain."""
        if self.stopped or not self._visible(token_id):
            return ""
        self.ids.append(token_id)
        self.text = self.family.decode_text(self.tokenizer, self.ids)
        end = self._cut_at_stop()
        if not self.stopped:
            end = len(self.text.rstrip("\ufffd"))      # a partial UTF-8 character decodes as U+FFFD for now
            end -= self._stop_prefix_len(self.text[:end])
        return self._emit(end)

    def finish(self) -> str:
        """Everything not sent yet (called once at the end)."""
        if not self.stopped:
            self._cut_at_stop()
        return self._emit(len(self.text))

    def _visible(self, token_id: int) -> bool:
        return self.family.visible(self.tokenizer, token_id)

    def _cut_at_stop(self) -> int:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return len(self.text)

    def _stop_prefix_len(self, text: str) -> int:
        return max([k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])], default=0)

    def _emit(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


def boxes_payload(text: str, images: list["LoadedImage"], family=None) -> list[dict]:
    """The structured boxes of an answer, against the latest image (see the module docstring)."""
    if not images:
        return []
    k, latest = len(images) - 1, images[-1]
    family = family or QwenVLFamily(None)
    return [{"image": k, "ref": b.ref, "box_1000": [b.x1, b.y1, b.x2, b.y2], "box_px": [round(v, 2) for v in px]}
            for b, px in family.boxes(text, latest.width, latest.height)]


# ---------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class LoadedImage:
    input: ImageInput
    width: int
    height: int


def _load_one(source: str, family, policy: ImagePolicy, min_pixels: int | None, max_pixels: int | None) -> LoadedImage:
    v = family.load_image(source, policy, min_pixels, max_pixels)   # v1 preprocesses only on a feature-cache miss
    return LoadedImage(ImageInput(v.key, v.pixels, v.grid_thw), v.width, v.height)


async def load_images(sources: list[str], family, policy: ImagePolicy, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> list[LoadedImage]:
    """Fetch/decode/preprocess every image in worker threads, in parallel; the first failure is a 400."""
    tasks = [asyncio.to_thread(_load_one, s, family, policy, min_pixels, max_pixels) for s in sources]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for j, r in enumerate(results):
        if isinstance(r, ImageError):
            raise APIError(400, str(r), "messages", "invalid_image")
        if isinstance(r, BaseException):
            raise r
    return list(results)


# ---------------------------------------------------------------------------------------------------
# The app


@dataclass
class _State:
    runner: EngineThread
    tokenizer: Any
    generation: GenerationConfig
    config: ServeConfig
    policy: ImagePolicy
    family: Any


def create_app(model, tokenizer, generation_config: GenerationConfig | None = None,
               config: ServeConfig | None = None, family=None) -> FastAPI:
    """The FastAPI app; its engine thread starts and stops with the app (lifespan).

    `family` (families.py) defaults to the one of the model's class; pass one to set e.g. Qwen2-VL's
    processor config."""
    config = config or ServeConfig()
    family = family or family_of(model)
    engine = Engine(model, max_batch=config.max_batch, max_len=config.max_len, kv_budget_bytes=config.kv_budget_bytes,
                    feature_cache_bytes=config.feature_cache_bytes, prefix_cache_bytes=config.prefix_cache_bytes,
                    eos_token_id=family.eos_token_id(tokenizer), family=family)
    state = _State(EngineThread(engine), tokenizer, generation_config or GenerationConfig(), config,
                   config.image_policy(), family)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.runner.start()
        yield
        state.runner.stop()

    app = FastAPI(title="qwenvl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qwenvl = state
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, err: APIError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, err: StarletteHTTPException):
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return _error_response(APIError(err.status_code, what))

    @app.exception_handler(Exception)
    async def unexpected(request: HTTPRequest, err: Exception):
        log.exception("unexpected error")
        return _error_response(APIError(500, "internal server error; see the server log"))


def _add_routes(app: FastAPI, state: _State) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.config.model_name, "engine": state.runner.engine.stats()}

    @app.get("/v1/models")
    async def models():
        card = {"id": state.config.model_name, "object": "model", "created": 0, "owned_by": "qwenvl"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        req = parse_chat_request(await _read_json(request), state.config)
        _check_pixel_limits(state.family, req)
        load = functools.partial(load_images, req.image_sources, state.family, state.policy, req.min_pixels,
                                 req.max_pixels)
        if state.family.grids_in_prompt:             # Qwen2-VL: the prompt's length depends on the images
            _check_roles(req.messages)
            images = await load()
            try:
                state.family.check_budget([i.input for i in images], state.config.max_visual_tokens, req.min_pixels)
            except ValueError as e:
                raise APIError(400, str(e), "messages", "visual_budget_exceeded") from None
            job = _Job.prepare(state, req, images)
        else:
            job = _Job.prepare(state, req)           # roles and lengths are checked before any image is fetched
            job.images = await load()
        job.start()
        if req.stream:
            return StreamingResponse(_sse(job, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await job.complete(request)


def _check_pixel_limits(family, req: ChatRequest) -> None:
    try:
        family.check_pixel_limits(req.min_pixels, req.max_pixels)
    except ValueError as e:
        raise APIError(400, str(e), "min_pixels" if req.min_pixels is not None else "max_pixels") from None


def _check_roles(messages: list[Message]) -> None:
    try:
        check_roles(messages)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None


async def _read_json(request: HTTPRequest) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the body is {int(declared):,} bytes, over this server's limit of {MAX_BODY_BYTES:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the body is over this server's limit of {MAX_BODY_BYTES:,} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the body is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------------
# One completion: engine submission, streaming, cancellation


class _ClientGone(Exception):
    pass


@dataclass
class _Job:
    state: _State
    req: ChatRequest
    prompt: list[int]
    params: SamplingParams
    images: list[LoadedImage] = field(default_factory=list)
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    n_tokens: int = 0

    @classmethod
    def prepare(cls, state: _State, req: ChatRequest, images: list[LoadedImage] | None = None) -> "_Job":
        """Render the prompt and check it fits: 400 naming the limit if not. `images` (loaded) are needed
        only by families whose prompt depends on them (Qwen2-VL)."""
        visuals = [i.input for i in images or []]
        try:
            prompt = state.family.render(req.messages, state.tokenizer, visuals, state.config.system)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        return cls(state, req, prompt, _sampling(req, state, len(prompt), len(req.image_sources)), list(images or []))

    def start(self) -> None:
        """Submit to the engine; its outputs arrive on an asyncio queue (errors here are plain HTTP errors)."""
        loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
        engine_req = Request(self.prompt, self.params, [i.input for i in self.images], self.req.seed)
        try:
            self._rid = self.state.runner.submit(engine_req, lambda out: loop.call_soon_threadsafe(self._queue.put_nowait, out))
        except EngineFull as e:
            raise APIError(503, f"the server is busy ({e}); retry in a moment") from None
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    async def tokens(self, request: HTTPRequest) -> AsyncIterator[Output]:
        """The engine's outputs; the request is cancelled in the engine when this generator is closed early
        (the consumer stopped, or the client went away: checked every DISCONNECT_POLL_S while waiting)."""
        try:
            while True:
                try:
                    out = await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise _ClientGone() from None
                    continue
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.state.runner.cancel(self._rid)      # a no-op when it already finished

    async def deltas(self, request: HTTPRequest) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish_reason) pairs, one per engine output; the last one has the reason."""
        text = TextStream(self.state.tokenizer, self.req.stop, self.state.family)
        async with contextlib.aclosing(self.tokens(request)) as outputs:
            async for out in outputs:
                if out.finish_reason == "error":
                    raise APIError(500, "generation failed inside the engine; see the server log")
                delta = ""
                if out.token_id is not None:
                    self.n_tokens += 1
                    delta = text.push(out.token_id)
                if text.stopped or out.finish_reason is not None:
                    yield delta + text.finish(), "length" if out.finish_reason == "length" else "stop"
                    return
                yield delta, None

    async def complete(self, request: HTTPRequest) -> dict:
        parts, reason = [], "stop"
        try:
            async for delta, finish in self.deltas(request):
                parts.append(delta)
                reason = finish or reason
        except _ClientGone:
            return {}
        text = "".join(parts)
        message = {"role": "assistant", "content": text, "boxes": boxes_payload(text, self.images, self.state.family)}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
                "usage": self.usage()}

    @property
    def model(self) -> str:
        return self.state.config.model_name

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.n_tokens,
                "total_tokens": len(self.prompt) + self.n_tokens}

    def chunk(self, delta: dict, finish: str | None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def _sampling(req: ChatRequest, state: _State, n_prompt: int, n_images: int) -> SamplingParams:
    """Request values over the model's generation_config; max_tokens checked against max_len."""
    gen, limit = state.generation, state.config.max_len
    room = limit - n_prompt
    if room < 1:
        raise APIError(400, f"the prompt is {n_prompt} tokens ({n_images} images; "
                            f"{state.family.span_hint(state.tokenizer)}); this server's limit is {limit} tokens for prompt "
                            "and answer together: shorten the conversation or send fewer images",
                       "messages", "context_length_exceeded")
    if req.max_tokens is not None and req.max_tokens > room:
        raise APIError(400, f"max_tokens={req.max_tokens} does not fit: the prompt is {n_prompt} tokens and this "
                            f"server's limit is {limit} for prompt and answer, so at most {room}",
                       "max_tokens", "context_length_exceeded")
    temperature = gen.temperature if req.temperature is None else req.temperature
    top_p = gen.top_p if req.top_p is None else req.top_p
    user_sampling = req.temperature is not None or req.top_p is not None
    greedy = temperature == 0 or top_p == 0 or not (gen.do_sample or user_sampling)
    tok = state.tokenizer
    return SamplingParams(max_new_tokens=req.max_tokens or min(state.config.default_max_tokens, room),
                          do_sample=not greedy, temperature=temperature, top_p=top_p if top_p > 0 else 1.0,
                          top_k=gen.top_k, repetition_penalty=gen.repetition_penalty,
                          stop_words_ids=state.family.stop_words_ids(tok))


def _sse_event(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(job: _Job, request: HTTPRequest) -> AsyncIterator[str]:
    """chat.completion.chunk events: role + first text with the first token, text deltas, then the finish
    (with the boxes), the usage chunk if asked, and [DONE]. An error mid-stream is sent as an error event."""
    first, parts = True, []
    try:
        async for delta, finish in job.deltas(request):
            parts.append(delta)
            body: dict = {"role": "assistant", "content": delta} if first else {"content": delta} if delta else {}
            if finish is not None:
                body["boxes"] = boxes_payload("".join(parts), job.images, job.state.family)
            if first or delta or finish is not None:
                yield _sse_event(job.chunk(body, finish))
            first = False
        if job.req.include_usage:
            yield _sse_event({**job.chunk({}, None), "choices": [], "usage": job.usage()})
    except _ClientGone:
        return
    except APIError as e:
        yield _sse_event(e.body())
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------
# Running it


class BackgroundServer:
    """uvicorn in a daemon thread (tests, benchmarks, notebooks): `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="qwenvl-http", daemon=True)
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve(model_dir: str | Path, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          dtype: str = "auto") -> None:
    """Load the checkpoint and serve it until interrupted (what `qwenvl serve` runs)."""
    from .families import load_family
    from .weights import load_generation_config

    model, tokenizer, family = load_family(model_dir, dtype)
    app = create_app(model, tokenizer, load_generation_config(model_dir), config, family)
    uvicorn.run(app, host=host, port=port, log_level="info")
