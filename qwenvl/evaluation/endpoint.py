"""A minimal client for OpenAI-compatible `/v1/chat/completions` servers (ours: `qwenvl serve`), on the
standard library only, and the conversion of an evaluation prompt into a chat message.

    post_chat(url, body)                 -> the response JSON (EndpointError with the status and message)
    user_message(prompt, images)         -> {"role": "user", "content": [image parts..., text part]}

`url` may be the server root (`http://host:8000`), its `/v1`, or the full `/v1/chat/completions`.
Images travel as `data:` URIs, so the server needs no access to the local files.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence

IMAGE_SPAN = re.compile(r"(?:Picture \d+: )?<img>.*?</img>\n?", re.DOTALL)   # the server writes its own


class EndpointError(RuntimeError):
    """The server could not be reached or answered with an error."""


def completions_url(url: str) -> str:
    """e.g. completions_url("http://h:8000") == completions_url("http://h:8000/v1/") ==
    "http://h:8000/v1/chat/completions"."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def post_chat(url: str, body: dict, api_key: str | None = None, timeout: float = 600.0) -> dict:
    """POST a chat-completions body and return the parsed JSON answer."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(completions_url(url), data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", errors="replace")[:500]
        raise EndpointError(f"{completions_url(url)} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EndpointError(f"cannot reach {completions_url(url)}: {getattr(e, 'reason', e)}") from None
    except json.JSONDecodeError:
        raise EndpointError(f"{completions_url(url)} did not answer JSON") from None


def message_text(response: dict) -> str:
    """choices[0].message.content of a chat-completions answer (EndpointError if it has none)."""
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"unexpected answer shape: {json.dumps(response)[:300]}") from None
    return content or ""


def data_uri(source) -> str:
    """A `data:` URI of an image file (path) or of image bytes; the MIME type comes from the content."""
    from PIL import Image

    raw = source if isinstance(source, (bytes, bytearray)) else open(os.fspath(source), "rb").read()
    with Image.open(io.BytesIO(raw)) as im:
        fmt = (im.format or "PNG").lower()
    return f"data:image/{fmt};base64,{base64.b64encode(raw).decode()}"


def user_message(prompt: str, images: Sequence) -> dict:
    """The evaluation prompt as one user message: the images first (the server writes "Picture k: "
    + the image + "\\n" for each), then the prompt without its image spans (and their Picture prefixes).

    Example: user_message("<img>a.png</img>What is it? Answer:", ["a.png"]) -> content
    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}}, {"type": "text", "text": "What is it? Answer:"}].
    """
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": data_uri(s)}} for s in images]
    text = IMAGE_SPAN.sub("", prompt)
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


class EndpointModel:
    """Evaluation calls on a remote OpenAI-compatible server: the same prompts, sent as chat messages.

    The server applies its own chat template, so raw prompts arrive as the user's text; it decodes with
    temperature 0; `min_new_tokens` cannot be asked for. There are no likelihoods over the API, so
    multiple-choice tasks read the option letter from a short answer instead (`has_likelihood = False`).
    """

    has_likelihood = False

    def __init__(self, url: str, model_name: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, workers: int = 4):
        self.url, self.model_name, self.api_key, self.timeout, self.workers = url, model_name, api_key, timeout, workers

    def ask(self, sample, max_new_tokens: int) -> str:
        body = {"messages": [user_message(sample.prompt, sample.images)], "temperature": 0,
                "max_tokens": max_new_tokens}
        if self.model_name:
            body["model"] = self.model_name
        return message_text(post_chat(self.url, body, self.api_key, self.timeout)).strip()

    def generate(self, samples: Sequence, max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
        """One request per sample, `workers` at a time (the server batches them), answers in order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(samples)))) as pool:
            return list(pool.map(lambda s: self.ask(s, max_new_tokens), samples))
