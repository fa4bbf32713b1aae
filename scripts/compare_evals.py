"""Compare two runs of scripts/eval_demo.py set by set: is a candidate model worse than the shipped one beyond noise?

    .venv/bin/python scripts/compare_evals.py out/eval_shipped_n300/summary.json out/eval_new_n300/summary.json

The rule that decides whether a newly trained demo model replaces the shipped one (written down before session 24's
run finished, docs/demo_model.md): on the same sets, no accuracy may be lower by more than 2 standard errors of the
difference, and no CIDEr more than 15% lower. An accuracy p on n samples has the standard error sqrt(p (1 - p) / n),
and the difference of two independent ones sqrt(se_a^2 + se_b^2):

    grounding en 13.3 (n 300) against 6.3 (n 300): se = sqrt(.133 * .867 / 300 + .063 * .937 / 300) = 2.41 points,
    so the candidate may be as low as 13.3 - 4.8 = 8.5; 6.3 fails.

CIDEr is not a proportion (no standard error from n alone), hence its relative limit. Rows are matched by set,
variant (e.g. VQA "corrected"), quantization and image size; a row in one summary only is listed, not judged.
Exit status 1 when the candidate fails the rule, so a script can act on it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SE_LIMIT, CIDER_LIMIT = 2.0, 0.15


def rows(summary: dict) -> dict[tuple, dict]:
    """(set, variant, quant, image_size) -> result row of an eval_demo summary."""
    return {(r["set"], r["variant"], r["quant"], r["image_size"]): r for r in summary["results"]}


def judge(base: dict, new: dict) -> dict:
    """One matched row pair: the difference, its limit, and whether the candidate passes."""
    a, b = base["value"], new["value"]
    if base["metric"] == "CIDEr":
        limit = a * (1 - CIDER_LIMIT)
        return {"base": a, "new": b, "limit": limit, "passes": b >= limit, "se": None}
    pa, pb = a / 100, b / 100
    se = 100 * math.sqrt(pa * (1 - pa) / base["n"] + pb * (1 - pb) / new["n"])
    limit = a - SE_LIMIT * se
    return {"base": a, "new": b, "limit": limit, "passes": b >= limit, "se": se}


def compare(base: dict, new: dict) -> tuple[list[tuple], list[tuple]]:
    """(judged: [(key, judge(...))], unmatched keys), in the base summary's order."""
    base_rows, new_rows = rows(base), rows(new)
    judged = [(key, judge(row, new_rows[key])) for key, row in base_rows.items() if key in new_rows]
    unmatched = [key for key in {**base_rows, **new_rows} if key not in base_rows or key not in new_rows]
    return judged, unmatched


def report(judged: list[tuple], unmatched: list[tuple]) -> str:
    lines = [f"{'set':<16}{'variant':<11}{'quant':<10}{'px':>5}{'base':>8}{'new':>8}{'limit':>8}{'2 SE':>7}  verdict"]
    for (name, variant, quant, size), j in judged:
        se = "" if j["se"] is None else f"{2 * j['se']:.1f}"
        lines.append(f"{name:<16}{variant:<11}{quant:<10}{size:>5}{j['base']:>8.1f}{j['new']:>8.1f}{j['limit']:>8.1f}"
                     f"{se:>7}  {'ok' if j['passes'] else 'WORSE'}")
    lines += [f"only in one summary: {key}" for key in unmatched]
    failed = [key[0] + (f" ({key[1]})" if key[1] else "") for key, j in judged if not j["passes"]]
    lines.append(f"fails the rule on: {', '.join(failed)}" if failed else "passes the rule")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="summary.json of the shipped model")
    parser.add_argument("new", type=Path, help="summary.json of the candidate, on the same sets")
    args = parser.parse_args(argv)
    summaries = []
    for path in (args.base, args.new):
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"{path}: not a readable eval_demo summary ({e})")
    base, new = summaries
    if (base["seed"], base["n"]) != (new["seed"], new["n"]):
        parser.error(f"different sets: seed {base['seed']} n {base['n']} against seed {new['seed']} n {new['n']}")
    judged, unmatched = compare(base, new)
    print(report(judged, unmatched))
    return 0 if all(j["passes"] for _, j in judged) else 1


if __name__ == "__main__":
    sys.exit(main())
