"""Collect `bsf-nnunet demo` runs into one committed result: held-out Dice per source, next to each run's settings.

Each run is a demo work folder (its ``demo_summary.json``, and the plans and training logs under it). Runs that
share a dataset and a pretraining differ only in what is named (normalization, fine-tuning trainers), so the table
is an ablation. One run per row: Dice of single cases, not a distribution.

    python bench/demo_heldout.py --run NAME=WORKDIR [--run ...] --out bench/results/demo_heldout_<host>.json
    python bench/demo_heldout.py --show bench/results/demo_heldout_<host>.json [--scratch]
"""
from __future__ import annotations

import argparse
import json
import os
import platform


def collect(name: str, workdir: str) -> dict:
    with open(os.path.join(workdir, "demo_summary.json")) as f:
        s = json.load(f)
    pick = ("CSF", "GM", "WM", "GM+WM")
    row = {"run": name, "workdir": os.path.abspath(workdir), "normalization": s.get("normalization"),
           "trainers": {k: s["profile"][k] for k in ("pretrain", "finetune", "scratch")},
           "in_source": {m: {k: round(v[k], 3) for k in pick} for m, v in s["dice"].items()},
           "heldout": {src: {m: {k: round(v[k], 3) for k in pick} for m, v in h["dice"].items()}
                       for src, h in (s.get("heldout") or {}).items()},
           "times_s": {k: round(v, 1) for k, v in s["times_s"].items()}}
    return row


def table(result: dict, scratch: bool = False) -> str:
    """Markdown: held-out GM/WM Dice (CSF) of the pretrained arm per source; with ``scratch``, "pretrained / scratch"
    and the pretraining trainer too."""
    rows = result["runs"]
    sources = list(dict.fromkeys(src for r in rows for src in r["heldout"]))
    arms = ("pretrained", "scratch") if scratch else ("pretrained",)
    head = ("| run | normalization | " + ("pretraining | " if scratch else "") + "fine-tuning | in-source GM/WM | "
            + " | ".join(f"{s} GM/WM (CSF)" for s in sources) + " |")
    lines = [head, "|" + "---|" * (4 + scratch + len(sources))]
    for r in rows:
        cells = [" / ".join(f"{r['in_source'][a]['GM+WM']:.3f}" for a in arms)]
        for s in sources:
            d = r["heldout"].get(s, {})
            cells.append(" / ".join(f"{d[a]['GM+WM']:.3f} ({d[a]['CSF']:.2f})" for a in arms) if d else "-")
        first = [r["run"], r["normalization"]] + ([r["trainers"]["pretrain"]] if scratch else [])
        lines.append("| " + " | ".join(first + [r["trainers"]["finetune"]] + cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="NAME=WORKDIR")
    p.add_argument("--out")
    p.add_argument("--show")
    p.add_argument("--scratch", action="store_true", help="show the scratch arm beside the pretrained one")
    a = p.parse_args()
    if a.show:
        with open(a.show) as f:
            print(table(json.load(f), a.scratch))
        return
    result = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
              "runs": [collect(*r.split("=", 1)) for r in a.run]}
    print(table(result, a.scratch))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
