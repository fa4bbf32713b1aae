"""The `qwenvl` command line: `qwenvl chat` (one question, or an interactive session with history) and
`qwenvl serve` (the OpenAI-style server with the web page at /).

    qwenvl chat --model DIR --image cat.png "What is in the picture?"
    qwenvl chat --model DIR --image cat.png --draw boxes.png "Where is the cat?"
    qwenvl chat --model DIR                       # interactive; :image PATH, :draw OUT.png, :clear, :quit
    qwenvl serve --model DIR --port 8000          # then open http://127.0.0.1:8000/

The family (Qwen-VL or Qwen2-VL) comes from the checkpoint's config.json; Qwen2-VL also takes
`--min-pixels` / `--max-pixels` (per-image size limits) and `--video PATH` (an animated GIF/WebP/PNG).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .api import QWenVL
from .evaluation.cli import add_eval_parser, run_eval
from .families import family_name, load_family
from .finetune_cli import add_finetune_parsers
from .tokenizer import QWenTokenizer

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo_model"
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, TypeError)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1; argparse prints the message as "argument --x: <message>"."""
    value = _parse(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_float(text: str) -> float:
    value = _parse(float, text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value


def port_number(text: str) -> int:
    value = _parse(int, text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _parse(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def check_output_image(path: Path) -> None:
    """ValueError unless a picture can be saved at `path`: its folder exists, it is not a folder, and Pillow
    knows its extension. Checked before the answer is generated, so a typo costs no answer."""
    from PIL import Image

    Image.init()
    if path.is_dir():
        raise ValueError(f"cannot draw on {path}: it is a directory; give a file name such as {path / 'boxes.png'}")
    if not path.parent.is_dir():
        raise ValueError(f"cannot draw on {path}: the folder {path.parent} does not exist")
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"cannot draw on {path}: unknown image extension {path.suffix!r}; use .png or .jpg")


def default_model_dir() -> Path:
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return DEMO_MODEL_DIR
    raise SystemExit("error: no --model given and no demo model is bundled yet; pass --model DIR "
                     "(a checkpoint folder with config.json, weights and qwen.tiktoken)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl", description="Qwen-VL in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="ask a question (or chat interactively) about images")
    chat.add_argument("question", nargs="?", help="the question; omit it for an interactive session")
    chat.add_argument("--model", type=Path, help="checkpoint folder (default: the bundled demo model)")
    chat.add_argument("--image", action="append", default=[], help="image path or URL; repeat for several")
    chat.add_argument("--draw", type=Path, help="write the latest picture with the answer's boxes drawn here")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    chat.add_argument("--system", default=None, help="system prompt (default: 'You are a helpful assistant.')")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of the model's sampling")
    chat.add_argument("--max-new-tokens", type=positive_int, default=None)
    chat.add_argument("--seed", type=int, default=0, help="sampling seed (reproducible answers)")
    chat.add_argument("--min-pixels", type=positive_int, default=None, help="Qwen2-VL: smallest image area (pixels)")
    chat.add_argument("--max-pixels", type=positive_int, default=None, help="Qwen2-VL: largest image area (pixels)")
    chat.add_argument("--video", action="append", default=[],
                      help="Qwen2-VL: an animated GIF/WebP/PNG to ask about; repeat for several")
    add_serve_parser(sub)
    add_quantize_parser(sub)
    add_eval_parser(sub)
    add_finetune_parsers(sub)
    return parser


def add_quantize_parser(sub) -> None:
    quant = sub.add_parser("quantize", help="int8 / int4 weight-only quantization of the LLM linears")
    quant.add_argument("--model", type=Path, required=True, help="float checkpoint folder")
    quant.add_argument("--bits", type=int, choices=[8, 4], required=True)
    quant.add_argument("--group-size", type=int, default=None, help="int4 group size (inputs per scale; default 128)")
    quant.add_argument("--asym", action="store_true", help="int4 with zero points instead of symmetric")
    quant.add_argument("--calibration", type=Path, help="int4 by GPTQ: calibration samples in the fine-tune JSON "
                       "format (conversations with Picture N: <img>…</img>); without it, round-to-nearest")
    quant.add_argument("--calibration-samples", type=int, default=None,
                       help="GPTQ: how many samples to use (default 128)")
    quant.add_argument("--out", type=Path, required=True, help="folder for the quantized checkpoint")


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-style server (/v1/chat/completions) with a web page at /")
    serve.add_argument("--model", type=Path, help="checkpoint folder (default: the bundled demo model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=port_number, default=8000)
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--name", default="qwen-vl-chat", help="the model id clients send and /v1/models lists")
    serve.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together")
    serve.add_argument("--max-len", type=positive_int, default=2048, help="prompt + answer tokens of one request")
    serve.add_argument("--kv-budget-mb", type=positive_float, default=None,
                       help="memory for the KV cache (caps the batch)")
    serve.add_argument("--feature-cache-mb", type=non_negative_float, default=256,
                       help="memory for cached image features")
    serve.add_argument("--prefix-cache-mb", type=non_negative_float, default=256,
                       help="memory for cached K/V of prompt prefixes that end with an image (0: off)")
    serve.add_argument("--max-images", type=positive_int, default=8, help="images per request")
    serve.add_argument("--allow-image-dir", type=Path, action="append", default=[],
                       help="LOOSENS SAFETY: clients may name image files inside this directory; repeatable")
    serve.add_argument("--allow-private-urls", action="store_true",
                       help="LOOSENS SAFETY: image URLs may point to loopback/private/link-local addresses")
    serve.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "run"):                      # finetune, merge-lora
        return args.run(args)
    if args.command == "serve":
        return run_server(args)
    if args.command == "quantize":
        return run_quantize(args)
    if args.command == "eval":
        return run_eval(args)
    model_dir = args.model or default_model_dir()
    try:
        if args.draw is not None:
            check_output_image(args.draw)
        if family_name(model_dir) == "qwen2_vl":
            session: ChatSession = Qwen2ChatSession(*load_family(model_dir, args.dtype), args)
        else:
            _check_v1_flags(args)
            session = ChatSession(*_load(model_dir, args.dtype), args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.question is not None:
        return 0 if session.ask(args.question, args.image, args.draw) else 2
    return session.repl()


def _check_v1_flags(args: argparse.Namespace) -> None:
    """Qwen2-VL-only flags on a Qwen-VL checkpoint are an error, not silently ignored."""
    for flag, value in (("--video", args.video), ("--min-pixels", args.min_pixels), ("--max-pixels", args.max_pixels)):
        if value:
            raise ValueError(f"{flag} needs a Qwen2-VL checkpoint; Qwen-VL resizes every image to its fixed size")


def run_server(args: argparse.Namespace) -> int:
    try:
        from .server import ServeConfig, serve
    except ImportError as e:
        print(f"error: the server needs its extra dependencies ({e}); pip install 'qwenvl[server]'", file=sys.stderr)
        return 2
    config = ServeConfig(model_name=args.name, max_batch=args.max_batch, max_len=args.max_len,
                         kv_budget_bytes=_mib(args.kv_budget_mb), feature_cache_bytes=_mib(args.feature_cache_mb),
                         prefix_cache_bytes=_mib(args.prefix_cache_mb),
                         max_images=args.max_images, allowed_image_dirs=tuple(args.allow_image_dir),
                         allow_private_urls=args.allow_private_urls)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        serve(args.model or default_model_dir(), config, host=args.host, port=args.port, dtype=args.dtype)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def gptq_quantize(model, args: argparse.Namespace) -> dict:
    """int4 by GPTQ on the --calibration samples (see gptq_quantize.py)."""
    from .gptq_quantize import calibration_batches, collect_hessians, gptq_quantize_model
    from .quantize import check_group_size
    from .tokenizer import QWenTokenizer

    if args.bits != 4:
        raise ValueError("--calibration (GPTQ) is for --bits 4; int8 per output channel needs no calibration")
    if args.calibration_samples is None:
        args.calibration_samples = 128
    if args.calibration_samples < 1:
        raise ValueError(f"--calibration-samples {args.calibration_samples}: use at least 1")
    check_group_size(model, args.group_size)                      # before the calibration pass, not after
    tokenizer = QWenTokenizer.from_pretrained(args.model)
    batches = calibration_batches(args.calibration, tokenizer, model.config.visual.image_size,
                                  args.calibration_samples)
    return gptq_quantize_model(model, collect_hessians(model, batches), args.group_size, sym=not args.asym)


def check_quantize_args(args: argparse.Namespace) -> None:
    """Flags that would be ignored, and an --out that would overwrite a checkpoint (the input's included) or
    cannot be a folder, are refused before the model loads; fills the int4 default group size."""
    from .weights import check_new_checkpoint_dir

    if args.bits == 8 and (args.group_size is not None or args.asym):
        raise ValueError("--group-size and --asym are for --bits 4; int8 has one symmetric scale per output channel")
    if args.calibration is None and args.calibration_samples is not None:
        raise ValueError("--calibration-samples needs --calibration FILE (GPTQ)")
    args.group_size = 128 if args.group_size is None else args.group_size
    check_new_checkpoint_dir(args.out, args.model)


def run_quantize(args: argparse.Namespace) -> int:
    """Load in float32, swap the LLM linears, write config.json (+ scheme), weights, tokenizer, generation config."""
    import shutil

    from .quantize import quantize_model
    from .weights import load_generation_config, load_model, save_checkpoint

    try:
        check_quantize_args(args)
        model = load_model(args.model, dtype="float32")
        if model.config.quantization_config:
            raise ValueError(f"{args.model} is already quantized ({model.config.quantization_config})")
        if args.calibration is not None:
            scheme = gptq_quantize(model, args)
        else:
            scheme = quantize_model(model, args.bits, args.group_size, sym=not args.asym)
        save_checkpoint(model, args.out, load_generation_config(args.model))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in ("qwen.tiktoken",):
        if (args.model / name).is_file():
            shutil.copy(args.model / name, args.out / name)
    print(f"wrote {args.out} ({scheme})", file=sys.stderr)
    return 0


def _mib(megabytes: float | None) -> int | None:
    return None if megabytes is None else int(megabytes * 2**20)


def _load(model_dir: Path, dtype: str) -> tuple[QWenVL, QWenTokenizer]:
    return QWenVL.from_pretrained(model_dir, dtype=dtype), QWenTokenizer.from_pretrained(model_dir)


class ChatSession:
    """One conversation: history, pending images, streaming output. Errors never lose the history."""

    def __init__(self, model: QWenVL, tokenizer: QWenTokenizer, args: argparse.Namespace):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.history: list[tuple[str, str]] = []
        self.generator = torch.Generator().manual_seed(args.seed)

    def ask(self, question: str, images: list[str], draw: Path | None) -> bool:
        query = self.tokenizer.from_list_format([{"image": p} for p in images] + [{"text": question}])
        try:
            response = self._stream(query)
        except USER_ERRORS as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return False
        self.history.append((query, response))
        if draw is not None:
            self._draw(response, draw)
        return True

    def _stream(self, query: str) -> str:
        kwargs = {"generator": self.generator, "max_new_tokens": self.args.max_new_tokens}
        if self.args.greedy:
            kwargs["do_sample"] = False
        if self.args.system is not None:
            kwargs["system"] = self.args.system
        shown, response = "", ""
        for response in self.model.chat_stream(self.tokenizer, query, self.history, **kwargs):
            if response.startswith(shown):
                print(response[len(shown):], end="", flush=True)
                shown = response
        print(response[len(shown):] if response.startswith(shown) else "", flush=True)
        return response

    def _draw(self, response: str, out: Path) -> None:
        from .grounding import BoxFormat

        try:
            picture = self.tokenizer.draw_bbox_on_latest_picture(response, self.history)
        except USER_ERRORS as e:
            print(f"error: cannot draw: {e}", file=sys.stderr)
            return
        _report_odd_boxes(response, BoxFormat.QWEN_VL)
        _save_drawing(picture, out)

    def repl(self) -> int:
        print("qwenvl chat — :image PATH adds a picture to your next question, :draw OUT.png draws the last "
              "answer's boxes, :clear forgets the conversation, :quit leaves.", file=sys.stderr)
        pending: list[str] = []
        while True:
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not line:
                continue
            if line in (":quit", ":q", ":exit"):
                return 0
            if not self._command(line, pending):
                self.ask(line, pending, None)
                pending = []

    def _command(self, line: str, pending: list[str]) -> bool:
        verb, _, arg = line.partition(" ")
        if verb == ":image" and arg.strip():
            pending.append(arg.strip())
        elif verb == ":clear":
            self.history.clear()
            pending.clear()
        elif verb == ":draw" and arg.strip() and self.history:
            self._draw(self.history[-1][1], Path(arg.strip()))
        elif verb.startswith(":"):
            print("commands: :image PATH, :draw OUT.png (after an answer), :clear, :quit", file=sys.stderr)
        else:
            return False
        return True


class Qwen2ChatSession(ChatSession):
    """The same session for Qwen2-VL: its chat template, dynamic-resolution images, videos, M-RoPE generation.

    `history` holds one turn per answer: (user message, answer, images, image (patches, grid), videos).
    """

    def __init__(self, model, tokenizer, family, args: argparse.Namespace):
        super().__init__(model, tokenizer, args)
        self.family = family
        family.check_pixel_limits(args.min_pixels, args.max_pixels)     # before any question, not at the first image
        self.params = _qwen2_sampling(args, args.model or default_model_dir())   # a bad generation_config.json too
        self.pending_videos = list(args.video)              # asked with the first question

    def ask(self, question: str, images: list[str], draw: Path | None) -> bool:
        videos, self.pending_videos = self.pending_videos, []
        try:
            turn = self._user_turn(question, images, videos)
            response = self._stream(turn)
        except USER_ERRORS as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return False
        self.history.append((turn[0], response, *turn[1:]))
        if draw is not None:
            self._draw(response, draw)
        return True

    def _user_turn(self, question: str, images: list[str], videos: list[str]) -> tuple:
        from .images import TRUSTED, load_image
        from .processor import WHITE, preprocess_images, preprocess_video

        limits = {"min_pixels": self.args.min_pixels, "max_pixels": self.args.max_pixels}
        pictures = [load_image(p, TRUSTED, background=WHITE) for p in images]
        pixels = preprocess_images(pictures, self.family.processor, **limits) if pictures else None
        clips = [preprocess_video(v, config=self.family.processor, **limits)[:2] for v in videos]
        content = [{"type": "image"}] * len(pictures) + [{"type": "video"}] * len(clips)
        message = {"role": "user", "content": content + [{"type": "text", "text": question}]}
        return message, pictures, pixels, clips

    def _stream(self, turn: tuple) -> str:
        from .fast_paths import fast_step
        from .qwen2_vl_chat import DEFAULT_SYSTEM, render_ids
        from .qwen2_vl_generation import VisionInputs, generate_stream

        messages, images, videos = [], [], []
        for past in [*self.history, (turn[0], None, *turn[1:])]:
            messages.append(past[0])
            if past[1] is not None:
                messages.append({"role": "assistant", "content": past[1]})
            images += [past[3]] if past[3] is not None else []
            videos += past[4]
        if self.args.system is not None:
            messages = [{"role": "system", "content": self.args.system}] + messages
        vision = VisionInputs(*_cat(images), *_cat(videos))
        ids = render_ids(messages, self.tokenizer, vision.image_grid_thw, vision.video_grid_thw,
                         self.family.merge_size, default_system=DEFAULT_SYSTEM)
        stops = [s[0] for s in self.family.stop_words_ids(self.tokenizer)]
        params = self.params
        tok, shown, out = self.tokenizer, "", []
        for step in generate_stream(self.model, torch.tensor([ids]), params, vision=vision, generator=self.generator,
                                    eos_token_id=stops, step=fast_step(self.model)):
            token = int(step[0])
            if token in stops:
                break
            if not self.family.visible(tok, token):
                continue
            out.append(token)
            text = self.family.decode_text(tok, out).rstrip("\ufffd")
            print(text[len(shown):], end="", flush=True)
            shown = text
        response = self.family.decode_text(tok, out)
        print(response[len(shown):], flush=True)
        return response

    def _draw(self, response: str, out: Path) -> None:
        from .grounding import draw_boxes, parse_boxes

        pictures = [p for turn in self.history for p in turn[2]]
        boxes = parse_boxes(response, self.family.box_format)
        _report_odd_boxes(response, self.family.box_format)
        _save_drawing(draw_boxes(pictures[-1], boxes) if pictures and boxes else None, out)


def _report_odd_boxes(response: str, fmt) -> None:
    """Say which boxes of the answer are not drawn (malformed), drawn clamped (outside [0, 1000)) or drawn with
    their corners swapped back (x1 > x2 or y1 > y2): what `parse_boxes` and `to_pixels` accept leniently."""
    from .grounding import NORM_MAX, box_as_written, malformed_boxes, parse_boxes

    for body in malformed_boxes(response, fmt):
        print(f"(box {body!r} is not (x1,y1),(x2,y2) with integers in [0, 1000): not drawn)", file=sys.stderr)
    for box in parse_boxes(response, fmt):
        if max(box.x1, box.y1, box.x2, box.y2) > NORM_MAX:
            print(f"(box {box_as_written(box, fmt)} has coordinates above {NORM_MAX}: drawn clamped to the picture)",
                  file=sys.stderr)
        if box.x1 > box.x2 or box.y1 > box.y2:
            print(f"(box {box_as_written(box, fmt)} has its corners swapped: drawn with x1 <= x2 and y1 <= y2)",
                  file=sys.stderr)


def _save_drawing(picture, out: Path) -> None:
    """Save the drawn picture (None: nothing to draw), reporting a failed save without ending the session."""
    if picture is None:
        print("(no picture or no box in the answer: nothing drawn)", file=sys.stderr)
        return
    try:
        check_output_image(out)
        picture.save(out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return
    print(f"(boxes drawn on {out})", file=sys.stderr)


def _qwen2_sampling(args: argparse.Namespace, model_dir: Path):
    """generation_config.json's sampling values (when the folder has one), --greedy and --max-new-tokens on top."""
    from .config import read_json_object
    from .sampling import SamplingParams

    path = Path(model_dir) / "generation_config.json"
    raw = read_json_object(path) if path.is_file() else {}
    keys = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
    values = {k: raw[k] for k in keys if raw.get(k) is not None}
    try:
        SamplingParams(**values)                          # the file's own values, checked before the overrides
    except ValueError as e:
        raise ValueError(f"{path}: {str(e).removeprefix('self.')}") from None
    if args.greedy:
        values["do_sample"] = False
    values["max_new_tokens"] = args.max_new_tokens or raw.get("max_new_tokens") or 512
    return SamplingParams(**values)


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(patches, grid_thw) pairs -> all patches [N, C*Tp*P*P] and all grids [n, 3], or (None, None)."""
    if not parts:
        return None, None
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])


if __name__ == "__main__":
    sys.exit(main())
