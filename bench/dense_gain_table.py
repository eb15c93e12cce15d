"""The table of bench/dense_gain.sh: one row per variant (random, dino, densedino, refonly), the mean and
sample sd over seeds of k-NN top-1 (k = 20), CamVid mIoU at the model's view size and at twice it (each
run's value is already the mean over probe seeds), point correspondence of the patch tokens (within one
patch, exact) and of the reference tokens (their own point's token found among 16; chance 6.25%), and
the share of a reference token's attention (last block) within one patch of its point (uniform: 12.3% on
an 8x8 grid) and, as its control, the share of a patch's attention within one patch of itself (last block;
uniform 11.8%; evaluations from before the control was measured show "-"), then every run on its own line.

    python3 bench/dense_gain_table.py runs/dense-gain/<config>/eval
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(folder: Path):
    runs = defaultdict(dict)
    for f in sorted(folder.glob("*.json")):
        label, kind, _ = f.name.rsplit(".", 2)
        runs[label][kind] = json.loads(f.read_text())
    return runs


def values(r):
    knn = next((x["top1"] for x in r["knn"]["results"] if x["k"] == 20), None) if "knn" in r else None
    seg = [r[k]["miou"] if k in r else None for k in ("seg", "seg2x")]
    m = r.get("match", {})
    local, control = m.get("ref_attn_local"), m.get("patch_attn_local")
    match = (m.get("within_one"), m.get("exact"), m.get("ref_retrieval"), local[-1] if local else None,
             control[-1] if control else None)
    return [knn, *seg, *match]


def fmt(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    mean = 100 * statistics.fmean(xs)
    if len(xs) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(xs):.2f}"


def main():
    folder = Path(sys.argv[1])
    runs = load(folder)
    if not runs:
        sys.exit(f"{folder}: no evaluations")
    head = ["variant", "seeds", "k-NN top-1 (k=20)", "CamVid mIoU", "mIoU at 2x", "match within 1", "match exact",
            "ref token finds its point (of 16)", "ref attention near its point", "patch attention near itself"]
    rows = []
    for variant in ["random", "dino", "densedino", "refonly"]:
        labels = [l for l in runs if l == variant or l.startswith(variant + "-s")]
        if not labels:
            continue
        cols = list(zip(*[values(runs[l]) for l in labels]))
        rows.append([variant, str(len(labels))] + [fmt(c) for c in cols])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print("\nper run (k-NN, mIoU, mIoU at 2x, match within 1, exact, ref retrieval, ref attention local, "
          "patch attention local; %):")
    for label in sorted(runs):
        print(f"  {label:<14} " + "  ".join("-" if v is None else f"{100 * v:6.2f}" for v in values(runs[label])))


if __name__ == "__main__":
    main()
