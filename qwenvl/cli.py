"""The `qwenvl` command line: `qwenvl chat` (one question, or an interactive session with history).

    qwenvl chat --model DIR --image cat.png "What is in the picture?"
    qwenvl chat --model DIR --image cat.png --draw boxes.png "Where is the cat?"
    qwenvl chat --model DIR                       # interactive; :image PATH, :draw OUT.png, :clear, :quit
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .api import QWenVL
from .tokenizer import QWenTokenizer

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo_model"
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, TypeError)


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
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.add_argument("--seed", type=int, default=0, help="sampling seed (reproducible answers)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer = _load(args.model or default_model_dir(), args.dtype)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    session = ChatSession(model, tokenizer, args)
    if args.question is not None:
        return 0 if session.ask(args.question, args.image, args.draw) else 2
    return session.repl()


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
        try:
            picture = self.tokenizer.draw_bbox_on_latest_picture(response, self.history)
        except USER_ERRORS as e:
            print(f"error: cannot draw: {e}", file=sys.stderr)
            return
        if picture is None:
            print("(no picture or no box in the answer: nothing drawn)", file=sys.stderr)
            return
        picture.save(out)
        print(f"(boxes drawn on {out})", file=sys.stderr)

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


if __name__ == "__main__":
    sys.exit(main())
