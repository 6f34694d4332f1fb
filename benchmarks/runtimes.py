"""Latency of students in eager PyTorch and in onnxruntime (the file `kdtune models export --format onnx` writes),
side by side in one run, as ratios: `python -m benchmarks.runtimes [--threads N] [--students REF ...]`.

Both runtimes time the same architectures with kdtune/train/costs.py's `measure` (warm-up, median of repeats spread
over rounds through all models), on the CPU with the same thread count; onnxruntime needs kdtune[export].
"""
from __future__ import annotations

import argparse

DEFAULT = ["digits_student", "vgg:blocks=8x16x16,fc=32,width=2", "digits_teacher"]


def main(argv=None) -> int:
    import torch

    from kdtune.train import costs
    from kdtune.models.refs import model_ref

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+", default=DEFAULT)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=61)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shape", default="1,8,8", help="sample shape C,H,W (default digits)")
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    refs = {s: model_ref(s) for s in args.students}
    timing = dict(threads=args.threads, batch=args.batch, repeats=args.repeats, device=torch.device("cpu"))
    eager = costs.measure(refs, args.classes, shape, **timing)
    ort = costs.measure(refs, args.classes, shape, runtime="onnxruntime", **timing)
    print(f"{next(iter(eager.values()))['device']}; batch 1 and per image in a batch of {args.batch}; "
          f"median of {args.repeats}")
    print(f"{'student':<36} {'torch b=1':>10} {'ort b=1':>10} {'ratio':>6}   {'torch/img':>10} {'ort/img':>10} "
          f"{'ratio':>6}")
    for spec in refs:
        t, o = eager[spec], ort[spec]
        print(f"{spec:<36} {t['latency_ms_batch1']:>10.4f} {o['latency_ms_batch1']:>10.4f} "
              f"{o['latency_ms_batch1'] / t['latency_ms_batch1']:>6.2f}   {t['latency_ms_per_image']:>10.5f} "
              f"{o['latency_ms_per_image']:>10.5f} {o['latency_ms_per_image'] / t['latency_ms_per_image']:>6.2f}")
    print("ratio: onnxruntime / torch (below 1: onnxruntime is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
