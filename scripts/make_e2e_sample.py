"""Build the E2E NLG sample shipped in the package (src/deltatune/data/e2e/{train,eval}.jsonl).

Source: ``valid.txt`` of the E2E NLG Challenge data (Novikova et al. 2017, CC BY-SA 4.0), one
``MR||reference`` per line. Rows are grouped by meaning representation (MR) and split BY MR, so no MR
is in both files: the distinct MRs, sorted, are shuffled with ``random.Random(SEED)`` and the first
``EVAL_MRS`` go to eval, the rest to train. Each output row is ``{"mr": ..., "references": [...]}``
with every reference of that MR, in source order; rows keep the MRs' order of first appearance.

Usage: python scripts/make_e2e_sample.py [SOURCE] (default ../shared/data/e2e/valid.txt)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 0
EVAL_MRS = 60
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "deltatune" / "data" / "e2e"


def main(source: Path) -> None:
    refs: dict[str, list[str]] = {}
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        mr, sep, ref = line.partition("||")
        if not sep or not mr.strip() or not ref.strip():
            raise SystemExit(f"{source}, line {n}: expected 'MR||reference'")
        refs.setdefault(mr.strip(), []).append(ref.strip())
    mrs = sorted(refs)
    random.Random(SEED).shuffle(mrs)
    eval_mrs = set(mrs[:EVAL_MRS])
    OUT.mkdir(parents=True, exist_ok=True)
    for split, keep in (("train", lambda m: m not in eval_mrs), ("eval", lambda m: m in eval_mrs)):
        rows = [{"mr": m, "references": r} for m, r in refs.items() if keep(m)]
        with open(OUT / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{split}: {len(rows)} MRs, {sum(len(r['references']) for r in rows)} references")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "e2e" / "valid.txt")
