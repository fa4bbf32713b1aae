"""Running a task: strided shards over `torchrun` ranks, one append-only JSONL log per rank, resume by
skipping logged ids, a progress line, and rank 0 merging everything into the summary.

    OUT/run.json                 what the predictions depend on (task, data, model, prompts); a resumed
                                 run must match it (scoring options may change: the run is rescored)
    OUT/predictions.rank{r}.jsonl  {"id", "prediction", ...} per sample, flushed after every batch
    OUT/predictions.jsonl        merged, in data order (rank 0)
    OUT/summary.json             {"task", "data", "samples", "metrics", "scoring"} (rank 0)
    OUT/<official files>         e.g. results_coco.json, results_vqa.json, result.jsonl, mme_results/

Rank r answers samples r, r + W, r + 2W, ... (W = world size) that no log holds yet. Every sample is
answered alone in its batch as far as the result goes (per-row positions, greedy), so the summary does
not depend on W, the batch size, or where a run was interrupted.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..weights import make_out_dir
from .datasets import Sample
from .jsonio import DataError, read_log
from .tasks import Context, Task, answer_batch

LOG_GLOB = "predictions.rank*.jsonl"


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1


def init_distributed() -> Dist:
    """Join the torchrun group (gloo, CPU) when WORLD_SIZE > 1; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))   # ranks may wait long for the slowest
    return Dist(dist.get_rank(), dist.get_world_size())


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish_distributed(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(samples: Sequence[Sample], d: Dist) -> list[Sample]:
    """Strided shard. Example: 5 samples, world 2 -> rank 0 gets 0, 2, 4; rank 1 gets 1, 3."""
    return list(samples[d.rank::d.world])


def batches(items: Sequence, size: int):
    """Consecutive chunks. Example: list(batches([1, 2, 3], 2)) == [[1, 2], [3]]."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


def load_predictions(out_dir: Path) -> dict[str, dict]:
    """All logged records of all ranks by id (the first record of an id wins)."""
    out: dict[str, dict] = {}
    for path in sorted(out_dir.glob(LOG_GLOB)):
        for rec in read_log(path):
            out.setdefault(str(rec["id"]), rec)
    return out


def check_run(out_dir: Path, info: dict, d: Dist) -> None:
    """Refuse to resume predictions made under other settings; rank 0 records the settings. A run.json with
    no logged prediction (e.g. the model failed to load) binds nothing and is rewritten."""
    path = out_dir / "run.json"
    if path.is_file() and load_predictions(out_dir):
        old = _read_run_json(path)
        changed = {k: (old.get(k), v) for k, v in info.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{out_dir} holds a run with other settings {changed} (old, new); "
                             "use another --out or delete it")
    elif d.rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
        tmp.replace(path)


def _read_run_json(path: Path) -> dict:
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): it records the settings of the logged predictions; "
                        "use another --out, or delete the folder to start over") from None
    if not isinstance(old, dict):
        raise DataError(f"{path} should hold a JSON object of run settings, got {type(old).__name__}: "
                        "use another --out, or delete the folder to start over")
    return old


class Progress:
    """"task 12/100 (3.1 s/sample, eta 4.5 min)" on stderr: redrawn on a terminal, every 5 % otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=sys.stderr):
        self.total, self.label, self.enabled, self.stream = total, label, enabled and total > 0, stream
        self.done, self.start, self.tty = 0, time.monotonic(), bool(getattr(stream, "isatty", lambda: False)())
        self.every = max(1, total // 20)

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.enabled and (self.tty or self.done // self.every != before // self.every or self.done == self.total):
            rate = (time.monotonic() - self.start) / max(self.done, 1)
            eta = rate * (self.total - self.done) / 60
            end = "\r" if self.tty and self.done < self.total else "\n"
            print(f"{self.label} {self.done}/{self.total} ({rate:.2f} s/sample, eta {eta:.1f} min)", end=end,
                  file=self.stream, flush=True)


def answer_shard(task: Task, samples: Sequence[Sample], backend, out_dir: Path, batch_size: int, d: Dist,
                 progress: bool = True) -> int:
    """Answer this rank's samples that no log holds yet, logging each batch; returns how many were answered."""
    done = load_predictions(out_dir)
    todo = [s for s in shard(samples, d) if s.id not in done]
    bar = Progress(len(todo), f"[{task.name} rank {d.rank}]", progress)
    with open(out_dir / f"predictions.rank{d.rank}.jsonl", "a", encoding="utf-8") as log:
        for batch in batches(todo, batch_size):
            for rec in answer_batch(task, backend, batch):
                log.write(json.dumps(rec, ensure_ascii=False) + "\n")
            log.flush()
            bar.update(len(batch))
    return len(todo)


def merge_and_score(task: Task, samples: Sequence[Sample], ctx: Context) -> dict:
    """Rank 0: every sample must be logged; write the merged predictions, official files and summary."""
    preds = load_predictions(ctx.out_dir)
    missing = [s.id for s in samples if s.id not in preds]
    if missing:
        raise DataError(f"{ctx.out_dir}: {len(missing)} samples have no prediction yet (e.g. {missing[:5]}); run again")
    with open(ctx.out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(preds[s.id], ensure_ascii=False) + "\n")
    if task.write is not None:
        task.write(ctx, list(samples), preds)
    metrics = task.score(ctx, list(samples), preds)
    summary = {"task": task.name, "data": ctx.data.name, "samples": len(samples), "metrics": metrics,
               "scoring": _scoring_options(ctx)}
    (ctx.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False,
                                                         default=str) + "\n", encoding="utf-8")
    return summary


def _scoring_options(ctx: Context) -> dict:
    opts = dataclasses.asdict(ctx.options)
    keep = ("corrected", "chartqa_order", "box_scale", "circular_seed", "mme_pair_by_image")
    return {k: opts[k] for k in keep}


def run_task(task: Task, samples: Sequence[Sample], make_backend, ctx: Context, batch_size: int, d: Dist,
             run_info: dict, progress: bool = True) -> dict | None:
    """The whole run on this rank; the summary on rank 0, None elsewhere. `make_backend()` is called
    only when this rank has samples left to answer (a finished run is just rescored)."""
    make_out_dir(ctx.out_dir)
    check_run(ctx.out_dir, run_info, d)
    done = load_predictions(ctx.out_dir)
    if any(s.id not in done for s in shard(samples, d)):
        answer_shard(task, samples, make_backend(), ctx.out_dir, batch_size, d, progress)
    barrier(d)
    if d.rank != 0:
        return None
    return merge_and_score(task, samples, ctx)
