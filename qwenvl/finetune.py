"""Fine-tuning Qwen-VL on the official data format: full, LoRA or Q-LoRA; one process or torchrun (gloo).

    qwenvl finetune --data train.json --model DIR --method lora --out runs/ft
    torchrun --nproc_per_node 2 -m qwenvl.cli finetune ... --distributed ddp      (or fsdp)
    qwenvl merge-lora --model DIR --adapter runs/ft --out merged/

What trains (qwen_vl.md §9.3): `full` trains the LLM and the resampler with the ViT frozen (official
`fix_vit`; `train` picks the parts); `lora` swaps LoRA into `c_attn`, `attn.c_proj`, `w1`, `w2` and, for a
base (non-chat) model, trains full `wte`/`lm_head` copies too (the official rule: the model path does not
contain "chat"); `qlora` is LoRA over a frozen int4 base (an int4/GPTQ checkpoint as is, a float one
quantized on load).

One optimizer step sees G = batch_size * grad_accum * world_size samples. The loss of a step is the sum of
its token losses over the number of supervised tokens in all G samples (`loss="sample"`: the mean of the
samples' own means), so any split of G over processes and micro-batches gives the same gradient: rank r
backpropagates world * (its share), which DDP / FSDP average back. Sample order is a per-epoch permutation
of the seed and dropout is reseeded from (seed, step, rank), so a run resumed from its last checkpoint
repeats the loss curve of an uninterrupted run exactly.

Files in OUT: loss.csv / loss.png (every step), checkpoint/state.pt (trainable weights, optimizer, step:
atomic, every `save_every` steps), then the result: a PEFT adapter (adapter_config.json +
adapter_model.safetensors) or a plain checkpoint (config.json + model.safetensors), the tokenizer file,
`merged/` when asked, and finished.json.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import IGNORE_INDEX, DataError, per_sample_loss
from .finetune_data import Example, load_examples, make_batch
from .lora import BASE_MODEL_MODULES_TO_SAVE, LoraSpec, apply_lora, unwrap_lora
from .peft_format import PREFIX, adapter_keys, load_adapter, save_adapter
from .quantize import quantize_model
from .tokenizer import QWenTokenizer
from .train import (LossLog, adamw, atomic_torch_save, autocast, cosine_lr, plot_losses, resolve_train_dtype,
                    set_trainable)
from .weights import (DTYPES, check_new_checkpoint_dir, load_config, load_generation_config, load_model,
                      make_out_dir, save_checkpoint, write_checkpoint)

METHODS = ("full", "lora", "qlora")
PARTS = ("vit", "adapter", "llm")
STATE, FINISHED = Path("checkpoint") / "state.pt", "finished.json"


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the message says which step the checkpoint holds and how to resume."""


@dataclass
class FinetuneArgs:
    """Every setting of a run; defaults are the official scripts' (qwen_vl.md §9.4) where CPU allows."""

    data: Path
    model: Path
    out: Path
    method: str = "lora"
    epochs: float = 5.0
    max_steps: int | None = None        # overrides epochs
    batch_size: int = 1                 # per process and micro-batch
    grad_accum: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0
    max_len: int = 2048
    dtype: str = "auto"                 # bf16 (autocast; LoRA bases stored in bf16), fp32, or auto: bf16 where the
                                        # CPU has bf16 instructions, else fp32 (train.resolve_train_dtype)
    gradient_checkpointing: bool = True
    train: tuple[str, ...] | None = None  # full: parts that train (adapter, llm); lora: "adapter" adds attn_pool
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    modules_to_save: str = "auto"       # auto (official rule) | none | comma list
    q_group_size: int = 128             # int4 group when a float base is quantized for qlora
    system_message: str = "You are a helpful assistant."
    assistant_only: bool = False
    truncate: bool = False
    loss: str = "token"                 # token | sample
    seed: int = 42
    save_every: int = 1000
    distributed: str = "ddp"            # ddp | fsdp (with torchrun)
    merge: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.data, self.model, self.out = Path(self.data), Path(self.model), Path(self.out)
        default_train = ("adapter", "llm") if self.method == "full" else ()
        self.train = default_train if self.train is None else tuple(self.train)
        self.dtype = resolve_train_dtype(self.dtype)
        checks = [(self.method in METHODS, f"method {self.method!r}: choose one of {METHODS}"),
                  (set(self.train) <= set(PARTS), f"train {self.train}: parts are {PARTS}"),
                  (self.loss in ("token", "sample"), f"loss {self.loss!r}: choose token or sample"),
                  (self.distributed in ("ddp", "fsdp"), f"distributed {self.distributed!r}: choose ddp or fsdp"),
                  (min(self.batch_size, self.grad_accum, self.save_every) >= 1,
                   "batch_size, grad_accum and save_every must be >= 1"),
                  (self.method == "full" or set(self.train) <= {"adapter"}, "with LoRA, train may only add 'adapter'"),
                  (not (self.merge and self.method == "full"), "merge is for LoRA adapters"),
                  *self._number_checks()]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.method != "full":
            LoraSpec(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)   # its checks, before loading

    def _number_checks(self) -> list[tuple[bool, str]]:
        """Values that would train nothing or diverge silently (lr 0, epochs 0 = one step, max_steps 0 = epochs).
        epochs counts only without max_steps, which overrides it."""
        inf = math.inf
        return [(0 < self.lr < inf, f"lr {self.lr}: must be a number > 0"),
                (self.max_steps is not None or 0 < self.epochs < inf, f"epochs {self.epochs}: must be a number > 0"),
                (self.max_steps is None or self.max_steps >= 1, f"max_steps {self.max_steps}: must be >= 1"),
                (0 <= self.weight_decay < inf, f"weight_decay {self.weight_decay}: must be a number >= 0"),
                (0 <= self.warmup_ratio <= 1, f"warmup_ratio {self.warmup_ratio}: must be in [0, 1]"),
                (0 <= self.max_grad_norm < inf, f"max_grad_norm {self.max_grad_norm}: must be >= 0 (0 disables)"),
                (self.max_len >= 1, f"max_len {self.max_len}: must be >= 1")]

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the interrupted one (+ a hash of the data file)."""
        skip = {"out", "save_every", "progress", "merge"}
        out = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items() if k not in skip}
        out["train"] = list(self.train)
        out["data_sha256"] = _sha256(str(self.data.resolve()), self.data.stat().st_mtime_ns)
        return out


@functools.lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- processes

@dataclass
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    """A run in progress: what every step needs."""

    args: FinetuneArgs
    world: World
    model: nn.Module                    # the bare QWenLMHeadModel (LoRA-swapped)
    spec: LoraSpec | None
    engine: nn.Module                   # TrainForward, possibly DDP-wrapped or FSDP-sharded
    opt: torch.optim.Optimizer
    params: list[nn.Parameter]
    trainable: list[str]
    examples: list[Example]
    pad_id: int
    global_batch: int
    steps: int


def init_world() -> World:
    """torchrun sets WORLD_SIZE/RANK: join the gloo group (CPU); otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size())


def all_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


# ------------------------------------------------------------------------------------------- model

def modules_to_save(args: FinetuneArgs) -> tuple[str, ...]:
    """Official rule: wte + lm_head for a base model, none for a chat model ("chat" in its path) or Q-LoRA."""
    if args.modules_to_save == "auto":
        chat = "chat" in str(args.model).lower()
        names = () if chat or args.method == "qlora" else BASE_MODEL_MODULES_TO_SAVE
    elif args.modules_to_save == "none":
        names = ()
    else:
        names = tuple(n.strip() for n in args.modules_to_save.split(",") if n.strip())
    return names + (("attn_pool",) if "adapter" in args.train else ())


def lora_spec(args: FinetuneArgs) -> LoraSpec:
    return LoraSpec(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    modules_to_save=modules_to_save(args))


def build_model(args: FinetuneArgs) -> tuple[nn.Module, LoraSpec | None]:
    """The model with exactly the official trainable set; trainable tensors in float32."""
    config = load_config(args.model)
    if args.method != "qlora" and config.quantization_config:
        raise ValueError(f"{args.model} is quantized ({config.quantization_config}): "
                         "use --method qlora, or a float model")
    model = load_model(args.model, "float32")
    if args.method == "full":
        set_trainable(model, vit="vit" in args.train, adapter="adapter" in args.train, llm="llm" in args.train)
        return model, None
    if args.method == "qlora" and not config.quantization_config:
        quantize_model(model, 4, args.q_group_size)                   # float base -> frozen int4 base
    base_dtype = torch.bfloat16 if args.dtype == "bf16" and args.distributed != "fsdp" else torch.float32
    for p in model.parameters():                                       # quantized buffers keep their dtypes
        p.data = p.data.to(base_dtype)
    spec = lora_spec(args)
    apply_lora(model, spec, torch.Generator().manual_seed(args.seed))
    model.transformer.visual.attn_pool.pos_embed.requires_grad_(False)  # a fixed sin-cos table
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, spec


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward pass instead of keeping its activations.

    The block's forward is replaced on the instance (no wrapper module), so parameter names stay the
    checkpoint's and DDP/FSDP hooks on the block still run.
    """
    for block in model.transformer.h:
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


class TrainForward(nn.Module):
    """The training forward as one module (what DDP / FSDP wrap): pixels -> visual features -> LM logits.

    Every rank must use the same parameters in the same order in every micro-batch (FSDP gathers the
    visual tower's shards collectively; DDP waits for a gradient of every trainable parameter), so with
    `blank_images` a micro-batch without images sends one blank image through the visual tower at zero weight.
    """

    def __init__(self, model: nn.Module, blank_images: bool):
        super().__init__()
        self.model, self.blank_images = model, blank_images

    def forward(self, input_ids: Tensor, images: Tensor | None, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        visual, zero = self.model.transformer.visual, None
        features = None if images is None else visual(images)                    # [N, Q, C]
        if images is None and self.blank_images:
            size = self.model.config.visual.image_size
            zero = 0.0 * visual(torch.zeros(1, 3, size, size)).sum()
        logits = self.model(input_ids, image_features=features, attention_mask=attention_mask,
                            position_ids=position_ids)                           # [B, T, V]
        return logits if zero is None else logits + zero


def _no_buffer_sync() -> dict:
    # Frozen quantized weights are buffers: never re-broadcast them each forward (the kwarg was renamed in torch 2.13).
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def parallelize(model: nn.Module, args: FinetuneArgs, world: World) -> nn.Module:
    """TrainForward, replicated (DDP: gradients averaged) or sharded (FSDP2: each block, the ViT, the rest)."""
    visual_trains = any(p.requires_grad for p in model.transformer.visual.parameters())
    fsdp = world.size > 1 and args.distributed == "fsdp"
    engine = TrainForward(model, blank_images=world.size > 1 and (fsdp or visual_trains))
    if world.size == 1:
        return engine
    if not fsdp:
        return nn.parallel.DistributedDataParallel(engine, **_no_buffer_sync())
    if args.method == "qlora":
        raise ValueError("Q-LoRA with FSDP is not supported (as in the official scripts): use --distributed ddp")
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model.transformer.visual)
    fully_shard(engine)
    return engine


# ------------------------------------------------------------------------------------------- data order

def total_steps(args: FinetuneArgs, n_examples: int, global_batch: int) -> int:
    return args.max_steps or max(1, math.ceil(args.epochs * n_examples / global_batch))


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_samples(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Indices of the G samples of `step`: a stream of per-epoch permutations, cut into consecutive runs of G.

    Example (n=3, G=2): step 0 -> the first two of epoch 0's order, step 1 -> its third + the first of epoch 1.
    """
    start = step * global_batch
    return [int(epoch_order(n, seed, k // n)[k % n]) for k in range(start, start + global_batch)]


def local_micro_batches(indices: list, world: World, batch_size: int) -> list[list]:
    """This rank's contiguous share of the step's samples, cut into micro-batches."""
    share = len(indices) // world.size
    mine = indices[world.rank * share:(world.rank + 1) * share]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def normaliser(examples: list[Example], loss: str) -> int:
    """Tokens (or samples) the step's loss is averaged over: all G samples, known to every rank up front."""
    return sum(e.n_supervised for e in examples) if loss == "token" else len(examples)


# ------------------------------------------------------------------------------------------- one step

def micro_loss(logits: Tensor, labels: Tensor, loss: str) -> Tensor:
    """Sum over the micro-batch of token losses ("token") or of per-sample mean losses ("sample")."""
    means = per_sample_loss(logits, labels)                                   # [B]
    if loss == "sample":
        return means.sum()
    return (means * (labels[:, 1:] != IGNORE_INDEX).sum(1)).sum()


def train_step(run: Run, step: int) -> float:
    """Forward/backward of this rank's micro-batches (gradient sync on the last only); returns its loss share."""
    args, world = run.args, run.world
    chosen = [run.examples[i] for i in step_samples(step, run.global_batch, len(run.examples), args.seed)]
    micro = local_micro_batches(chosen, world, args.batch_size)
    norm, total = normaliser(chosen, args.loss), 0.0
    for k, examples in enumerate(micro):
        batch = make_batch(examples, run.pad_id, run.model.config.visual.image_size)
        with _sync(run.engine, k == len(micro) - 1):
            with autocast(args.dtype):
                logits = run.engine(batch["input_ids"], batch["images"], batch["attention_mask"], batch["position_ids"])
                loss = micro_loss(logits, batch["labels"], args.loss) / norm
            (loss * world.size).backward()                  # DDP / FSDP divide the summed gradients by world.size
        total += loss.item()
    return total


def _sync(engine: nn.Module, last: bool):
    """Skip the gradient all-reduce before the last micro-batch (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if isinstance(engine, nn.parallel.DistributedDataParallel):
        return nullcontext() if last else engine.no_sync()
    if hasattr(engine, "set_requires_gradient_sync"):
        engine.set_requires_gradient_sync(last)
    return nullcontext()


def optimizer_step(run: Run, lr: float) -> None:
    for group in run.opt.param_groups:
        group["lr"] = lr
    if run.args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.params, run.args.max_grad_norm)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------- checkpoints
# State dicts go through torch.distributed.checkpoint's helpers, which give the same names (ours, after
# TrainForward's "model." prefix) for one process, DDP and FSDP; FSDP shards are gathered to full tensors.

def _options(run: Run, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=run.world.size > 1 and run.args.distributed == "fsdp", **kw)


def model_state(run: Run) -> dict[str, Tensor]:
    """Our tensor names -> tensors (complete on rank 0; FSDP ranks > 0 get nothing)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(run.engine, options=_options(run, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def save_train_state(run: Run, step: int) -> None:
    """Trainable weights + optimizer + step + settings, written atomically by rank 0 (all ranks gather)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = model_state(run)
    optim = get_optimizer_state_dict(run.engine, run.opt, options=_options(run, cpu_offload=True))
    if run.world.main:
        state = {"step": step, "model": {k: weights[k] for k in run.trainable}, "optimizer": optim,
                 "run": run.args.fingerprint()}
        atomic_torch_save(state, run.args.out / STATE)
    if run.world.size > 1:
        dist.barrier()


def load_train_state(run: Run) -> int:
    """Restore save_train_state's file on every rank; refuse one from a run with other settings. Returns the step."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = run.args.out / STATE
    state = read_train_state(path)
    ours, theirs = run.args.fingerprint(), state["run"]
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        raise ValueError(f"{path} belongs to a run with other settings {diff} (then, now): use another --out")
    options = _options(run, strict=False)
    set_model_state_dict(run.engine, {"model." + k: v for k, v in state["model"].items()}, options=options)
    set_optimizer_state_dict(run.engine, run.opt, state["optimizer"], options=options)
    return int(state["step"])


def read_train_state(path: Path) -> dict:
    """The checkpoint file, or a ValueError saying it is unreadable and what to do (writes are atomic, so a
    bad file was damaged or replaced from outside)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)   # our own file (holds plain Python too)
    except Exception as e:          # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, OSError...
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"{path} is not a readable training checkpoint ({reason}): delete it to start the run "
                         "over, or use another --out") from None
    keys = {"step", "model", "optimizer", "run"}
    if not isinstance(state, dict) or not keys <= state.keys():
        raise ValueError(f"{path} is not a qwenvl fine-tune checkpoint (it needs the keys {sorted(keys)}): "
                         "delete it to start the run over, or use another --out")
    return state


def write_result(run: Run) -> None:
    """Rank 0 writes the adapter (PEFT format) or the full checkpoint (official layout) + tokenizer into OUT."""
    args, state = run.args, model_state(run)
    if run.world.main:
        if run.spec is None:
            dtype = DTYPES.get(load_config(args.model).torch_dtype, torch.float32)
            write_checkpoint(state, run.model.config, args.out, load_generation_config(args.model), dtype)
        else:
            tensors = {k: state[k.removeprefix(PREFIX)].contiguous() for k in adapter_keys(run.model, run.spec)}
            save_adapter(run.model, run.spec, args.out, str(args.model), tensors)
        for name in ("qwen.tiktoken", "generation_config.json"):
            if (args.model / name).is_file() and not (args.out / name).is_file():
                shutil.copy(args.model / name, args.out / name)
    if run.world.size > 1:
        dist.barrier()


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Base + adapter -> a plain checkpoint in the official layout (vocabulary rows resized if the adapter did).

    The base must be a float checkpoint: a Q-LoRA adapter merges into the float model it was quantized from.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_new_checkpoint_dir(out_dir, model_dir)
    config = load_config(model_dir)
    if config.quantization_config:
        raise ValueError(f"{model_dir} is quantized: merge the adapter into the float model instead")
    model = load_model(model_dir, "float32")
    load_adapter(model, adapter_dir)
    unwrap_lora(model)
    save_checkpoint(model, out_dir, load_generation_config(model_dir), DTYPES.get(config.torch_dtype, torch.float32))
    if (model_dir / "qwen.tiktoken").is_file():
        shutil.copy(model_dir / "qwen.tiktoken", out_dir / "qwen.tiktoken")
    return out_dir


# ------------------------------------------------------------------------------------------- the run

def load_run_data(args: FinetuneArgs, config) -> tuple[list[Example], QWenTokenizer]:
    tok = QWenTokenizer.from_pretrained(args.model)
    if tok.img_start_id != config.visual.image_start_id or tok.n_vocab > config.vocab_size:
        raise ValueError(f"{args.model}: tokenizer (vocab {tok.n_vocab}, <img> {tok.img_start_id}) does not fit the "
                         f"model (vocab {config.vocab_size}, <img> {config.visual.image_start_id})")
    return load_examples(args.data, tok, args.max_len, args.system_message, args.assistant_only, args.truncate), tok


def finetune(args: FinetuneArgs) -> dict:
    """Train (resuming from OUT's checkpoint if there is one), write the result; returns a summary."""
    world = init_world()
    try:
        return _finetune(args, world)
    finally:
        if world.size > 1:
            dist.destroy_process_group()


def prepare_out(out: Path, model: Path) -> None:
    """Create OUT before the model loads, or say why it cannot be the run's folder."""
    if out.is_dir() and out.resolve() == model.resolve():
        raise ValueError(f"--out {out} is the model folder: the result would overwrite its files")
    make_out_dir(out)
    if (out / FINISHED).is_file():
        raise ValueError(f"{out} already holds a finished run ({FINISHED}): choose another --out")


def _finetune(args: FinetuneArgs, world: World) -> dict:
    prepare_out(args.out, args.model)
    run = start_run(args, world)
    step = load_train_state(run) if (args.out / STATE).exists() else 0
    log = LossLog(args.out / "loss.csv", step, args.method) if world.main else None
    loss = train_loop(run, step, log)
    if loss is None and log is not None and LossLog.read(log.path):         # resumed after the last step
        loss = float(LossLog.read(log.path)[-1]["loss"])
    write_result(run)
    if world.main:
        if args.merge:
            shutil.rmtree(args.out / "merged", ignore_errors=True)     # a merge cut short before (no finished.json)
            merge_adapter(args.model, args.out, args.out / "merged")
        plot_losses(args.out / "loss.csv", args.out / "loss.png")
        summary = {"steps": run.steps, "last_loss": loss, "samples": len(run.examples),
                   "global_batch": run.global_batch, "world_size": world.size, "method": args.method,
                   "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad)}
        (args.out / FINISHED).write_text(json.dumps(summary, indent=2))
        shutil.rmtree(args.out / STATE.parent, ignore_errors=True)   # the state and any temp file a kill left
    return {"steps": run.steps, "last_loss": loss, "out": str(args.out)}


def start_run(args: FinetuneArgs, world: World) -> Run:
    """Model with its trainable set, data, parallel wrapper and optimizer."""
    torch.manual_seed(args.seed)
    model, spec = build_model(args)
    examples, tok = load_run_data(args, model.config)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    engine = parallelize(model, args, world)
    params = [p for p in engine.parameters() if p.requires_grad]
    opt = adamw(params, args.lr, args.weight_decay, betas=(0.9, args.adam_beta2))
    global_batch = args.batch_size * args.grad_accum * world.size
    return Run(args, world, model, spec, engine, opt, params, trainable, examples, tok.pad_token_id, global_batch,
               total_steps(args, len(examples), global_batch))


def train_loop(run: Run, step: int, log: LossLog | None) -> float | None:
    """Optimizer steps `step`..steps-1: one CSV row each, a checkpoint every save_every steps and at the end."""
    args, world = run.args, run.world
    warmup = math.ceil(args.warmup_ratio * run.steps)
    t0, start, loss, saved = time.time(), step, None, step
    try:
        while step < run.steps:
            torch.manual_seed(step_seed(args.seed, step, world.rank))      # dropout: same masks after a resume
            local = train_step(run, step)
            with _sigint_between_steps():                                   # the update, row and checkpoint: whole
                lr = cosine_lr(step, run.steps, args.lr, warmup, floor=0.0)
                optimizer_step(run, lr)
                loss, step = all_sum(local, world), step + 1
                if log is not None:
                    _log_step(run, log, step, loss, lr, (step - start) * run.global_batch / max(time.time() - t0, 1e-9))
                if step % args.save_every == 0 or step == run.steps:
                    save_train_state(run, step)
                    saved = step
                    if log is not None:
                        plot_losses(args.out / "loss.csv", args.out / "loss.png")
    except (KeyboardInterrupt, DataError) as e:        # Ctrl-C, or an image that fails to load at its step
        raise _stopped(run, step, saved, e) from None
    return loss


def _log_step(run: Run, log: LossLog, step: int, loss: float, lr: float, rate: float) -> None:
    log.append(step=step, stage=run.args.method, loss=f"{loss:.6f}", lr=f"{lr:.6e}", samples_per_s=f"{rate:.2f}")
    if run.args.progress:
        _progress(step, run.steps, loss, lr, rate, (run.steps - step) * run.global_batch / max(rate, 1e-9))


@contextmanager
def _sigint_between_steps():
    """Hold a Ctrl-C that arrives inside the block until its end, so it lands between steps."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _stopped(run: Run, step: int, saved: int, cause: BaseException) -> Exception:
    """Checkpoint the `step` finished steps (one process; torchrun keeps the last periodic checkpoint) and the
    error that says what was kept. A step cut short is dropped: its gradients are not in the checkpoint."""
    if run.world.size == 1 and step > saved:
        save_train_state(run, step)
        saved = step
    path = run.args.out / STATE
    kept = (f"{path} holds step {saved}/{run.steps}: rerun the same command to resume" if saved else
            "no step had finished, nothing was kept")
    if isinstance(cause, KeyboardInterrupt):
        return TrainingInterrupted(f"interrupted during step {step + 1}/{run.steps}; {kept}")
    return DataError(f"{cause} (at step {step + 1}/{run.steps}; {kept} once the image is fixed in place: "
                     "the data file itself must not change)")


def _progress(step: int, steps: int, loss: float, lr: float, rate: float, eta_s: float) -> None:
    width = 24
    done = width * step // steps
    bar = "#" * done + "." * (width - done)
    end = "\r" if sys.stderr.isatty() and step < steps else "\n"
    print(f"[{bar}] step {step}/{steps} loss {loss:.4f} lr {lr:.2e} {rate:.2f} samples/s "
          f"eta {int(eta_s // 60)}m{int(eta_s % 60):02d}s", end=end, file=sys.stderr, flush=True)
