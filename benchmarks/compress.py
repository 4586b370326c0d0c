"""Adapter compression on a real adapter: the SST-2 LoRA (MiniLM-L6, r 8) trained by ``benchmarks/merge.py``,
compressed each way by ``deltatune.merge.compress_adapter``; size ratio, relative change of the delta
(||dW' - dW|| / ||dW|| over modules) and SST-2 dev accuracy of each (head kept from the original).

    python benchmarks/compress.py [--work /tmp/dt-merge-quality]   # after benchmarks/merge.py --parts enc
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import merge as B  # noqa: E402

WAYS = {"compeft d0.1": dict(method="compeft", density=0.1), "compeft d0.3": dict(method="compeft", density=0.3),
        "dare d0.5": dict(method="dare", density=0.5), "rank 8->4": dict(method="rank", rank=4),
        "rank 8->2": dict(method="rank", rank=2), "int8": dict(method="int8")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dt-merge-quality"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    C.setup(threads=args.threads)
    C.quiet_transformers()
    import deltatune as dt
    from deltatune.merge import compress_adapter
    from deltatune.train.data import load_dataset

    src = args.work / "adapters" / "enc-sst2"
    if not (src / "adapter_model.safetensors").is_file():
        raise SystemExit(f"{src}: run benchmarks/merge.py --parts enc first")
    train, dev = B.M.sst2_files(args.work / "data", 8000)
    tok = dt.load_pretrained("minilm-l6", task="classification", num_labels=2)[1]
    labels = load_dataset(train, tok, max_length=64).label_names
    rows = {"original": {"accuracy": B.enc_score(src, src, labels, dev), "size_ratio": 1.0,
                         "bytes_after": (src / "adapter_model.safetensors").stat().st_size}}
    for name, kw in WAYS.items():
        out = args.work / "compressed" / name.replace(" ", "_").replace(">", "")
        shutil.rmtree(out, ignore_errors=True)
        rep = compress_adapter(src, out, **kw)
        rows[name] = {"accuracy": B.enc_score(out, src, labels, dev),
                      **{k: v for k, v in rep.items() if isinstance(v, (int, float))}}
        print(name, rows[name], flush=True)
    table = C.markdown_table(
        ["adapter", "file bytes", "size ratio", "delta rel. change", "SST-2 accuracy"],
        [[k, f"{r['bytes_after']:,}", f"{r['size_ratio']:.3f}",
          f"{r['delta_rel_change']:.3f}" if r.get("delta_rel_change") is not None else "0",
          f"{r['accuracy']:.2f}"] for k, r in rows.items()])
    body = ("## Adapter compression (`benchmarks/compress.py`)\n\n" + __doc__.split("\n\n")[0] + "\n\n" + table
            + "\n\nComPEFT uses its default scale multiplier alpha = 1 (the paper tunes alpha on validation data).\n\n"
            + "Run " + ", ".join(f"{k} {v}" for k, v in C.machine_info().items()) + ".")
    print(body)
    if not args.no_write:
        C.write_section("compress", body)


if __name__ == "__main__":
    main()
