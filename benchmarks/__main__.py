"""Run every benchmark of issue 7 and print every ratio; `--write` also rewrites benchmarks/RESULTS.md.

    python -m benchmarks                 # ~10 minutes on 2 CPU cores
    python -m benchmarks --write         # and record the run in benchmarks/RESULTS.md
    python -m benchmarks --only steps    # steps | accuracy | study | tracking | fused (comma-separated)
    python -m benchmarks --gpu           # the GPU check (benchmarks/gpu.py; --smoke: tiny sizes, runs on a CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
NOTES_MARK = "<!-- notes: everything below this line is kept when --write rewrites the file -->"


def log(line: str = "") -> None:
    print(line, flush=True)


def _study_bench(teacher_path: str, epochs, fuse: str, log) -> dict | None:
    """benchmarks/study_bench.py in its own process (the study's driver); its timings, or None if it failed."""
    out = os.path.join(tempfile.mkdtemp(prefix="kdtune-bench-"), "study.json")
    command_line = [sys.executable, "-m", "benchmarks.study_bench", "--teacher", teacher_path, "--out", out,
                    "--fuse", fuse]
    if epochs:
        command_line += ["--epochs", str(epochs)]
    done = subprocess.run(command_line, cwd=HERE.parent, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        log(done.stdout[-3000:] + done.stderr[-3000:])
        log(f"[study] --fuse {fuse} FAILED")
        return None
    with open(out) as handle:
        data = json.load(handle)
    shutil.rmtree(data["workdir"], ignore_errors=True)  # the study's MLflow store and Tune results
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="steps,accuracy,study")
    parser.add_argument("--rounds", type=int, default=3, help="clean side-by-side rounds per step benchmark (median)")
    parser.add_argument("--steps", type=int, default=3, help="timed VGG steps per measurement (after one untimed)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per precision in the bf16 accuracy check")
    parser.add_argument("--study-epochs", type=int, help="student epochs in the study (default: the recipe's 15)")
    parser.add_argument("--write", action="store_true", help="rewrite benchmarks/RESULTS.md from this run")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="first wait (up to --quiet-wait minutes) until the 1-minute load average is below this")
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--gpu", action="store_true", help="run the GPU check instead (benchmarks/gpu.py)")
    from benchmarks import gpu

    gpu.add_arguments(parser)
    args = parser.parse_args()
    if args.gpu:
        return gpu.run(smoke=args.smoke, write=args.write, budget_s=args.budget, only=args.gpu_only)
    if args.smoke or args.budget is not None or args.gpu_only:
        parser.error("--smoke, --budget and --gpu-only go with --gpu")
    if args.quiet_load is not None:
        deadline = time.time() + 60 * args.quiet_wait
        while os.getloadavg()[0] > args.quiet_load and time.time() < deadline:
            log(f"waiting for a quieter machine: load {os.getloadavg()[0]:.2f} > {args.quiet_load}")
            time.sleep(20)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}

    from benchmarks import common

    torch.set_num_threads(common.threads())
    machine = common.machine()
    command = "python -m benchmarks " + " ".join(sys.argv[1:])
    log(f"kdtune benchmarks: {command.strip()}")
    for key, value in machine.items():
        log(f"  {key}: {value}")
    started = time.time()
    rows, texts = [], {}

    teacher_path = None
    if "steps" in parts:
        from benchmarks import loops, steps

        if loops.torchdistill_version() is None:
            log("torchdistill is NOT installed: the kdtune/torchdistill ratios are skipped "
                "(pip install -e '.[bench]' installs it)")
        else:
            log(f"torchdistill {loops.torchdistill_version()}")
        # the VGG pair on the whole machine; the digits pair on 1 thread, as a study trial runs (1 CPU each)
        for pair, n_steps, n_threads in (("cifar", args.steps, common.threads()), ("digits", 31, 1)):
            log(f"\n[steps] {pair}: every loop, {args.rounds} rounds side by side, {n_threads} thread(s)")
            result = steps.measure(pair, args.rounds, n_steps, n_threads, log=log)
            pair_rows = steps.rows(result)
            rows += pair_rows
            for r in pair_rows:
                if r.unit != "img/s":
                    log(f"  {r.name}: {r.value_text()} {r.target} {'' if r.met is None else ('met' if r.met else 'MISSED')}")
            if pair == "cifar":
                text, stats = steps.profile(result["loops"]["kdtune student-only"])
                efficiency = steps.conv_efficiency(result, stats)
                texts["profile: kdtune fp32 VGG-7 student-only step, self time by op group (one epoch)"] = (
                    text + f"\nconvolution kernels alone (fwd+bwd FLOPs / their time): {100 * efficiency:.0f}% "
                    "of the fp32 matmul peak")
                text, _ = steps.profile(result["loops"]["kdtune fp32"])
                texts["profile: kdtune fp32 VGG-16 -> VGG-7 KD step, teacher online (one epoch)"] = text
            else:
                lines = []
                for name in ("kdtune student-only", "kdtune cached", "kdtune fp32", "plain fp32"):
                    ops, ms = steps.op_counts(result["loops"][name])
                    lines.append(f"{name:<22}{ops:6.0f} aten ops/step {ms:8.2f} ms of op time/step (profiled)")
                texts["profile: digits steps are dispatch-bound (1 thread)"] = "\n".join(lines)
            del result
    if "accuracy" in parts or "study" in parts:
        from benchmarks import accuracy

        log("\n[accuracy] digits teacher (recipe), then KD students in fp32 and bf16")
        teacher = accuracy.train_teacher(log=log)
        teacher_path = os.path.join(tempfile.mkdtemp(prefix="kdtune-bench-"), "digits_teacher.pt")
        torch.save(teacher, teacher_path)
        if "accuracy" in parts:
            acc_rows, _ = accuracy.run(teacher, seeds=args.seeds, log=log)
            rows += acc_rows
    if "study" in parts:
        from benchmarks import study_bench

        log("\n[study] 16-trial digits study, 2 concurrent trials (its own process: the driver)")
        data = _study_bench(teacher_path, args.study_epochs, "off", log)
        if data is not None:
            study_rows, text = study_bench.analyse(data)
            texts["study: where the time goes"] = text
            log(text)
            log("\n[study] the same 16 settings with --fuse auto (the quickstart's choice)")
            fused_data = _study_bench(teacher_path, args.study_epochs, "auto", log)
            if fused_data is not None:
                study_rows += study_bench.analyse_fused(fused_data, data)
            rows += study_rows
            for r in study_rows:
                log(f"  {r.name}: {r.value_text()} {r.target} {'' if r.met is None else ('met' if r.met else 'MISSED')}")

    if "tracking" in parts:
        from benchmarks import tracking

        log("\n[tracking] 64 concurrent writers against the MLflow server: SQLite and PostgreSQL, 1 and 4 workers")
        tracking_rows, text = tracking.run(log=log)
        rows += tracking_rows
        texts["tracking: the MLflow server under 64 concurrent trial writers"] = text
        log(text)

    if "fused" in parts:
        from benchmarks import fused

        log("\n[fused] a 9-temperature sweep step: one trial per setting vs the 9 students fused on one teacher")
        results = [fused.measure("digits", args.rounds, 20, 1, log=log),
                   fused.measure("vgg", args.rounds, args.steps, common.threads(), log=log)]
        for result in results:
            rows += fused.rows(result)
        for cache in ("auto", "off"):  # the digits sweep's whole epochs: by default (cached logits) and online
            rows += fused.epoch_rows(fused.measure_epochs(cache, args.rounds, log=log))
        rows += fused.accuracy_rows(fused.accuracy_twins(log=log))
        log(f"fused/unfused: {results[1]['fused'] / results[1]['unfused']:.2f}x")

    if teacher_path:
        shutil.rmtree(os.path.dirname(teacher_path), ignore_errors=True)
    machine["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["duration_s"] = f"{time.time() - started:.0f}"
    report = render(machine, command, rows, texts)
    log("\n" + report)
    if args.write:
        notes = ""
        if RESULTS.exists() and NOTES_MARK in RESULTS.read_text():
            notes = RESULTS.read_text().split(NOTES_MARK, 1)[1]
        RESULTS.write_text(report + "\n\n" + NOTES_MARK + notes)
        log(f"wrote {RESULTS}")
    return 0


def render(machine: dict, command: str, rows, texts: dict) -> str:
    from benchmarks import common

    lines = [
        "# kdtune benchmarks: results",
        "",
        f"- command: `{command.strip()}` (from the repository root; torchdistill from `pip install -e '.[bench]'`)",
        f"- date: {machine['date']}; git {machine.get('git', '?')}; run took {machine['duration_s']} s",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['threads_used']} threads used), "
        f"CPU capability {machine['cpu_capability']}, AMX: {machine['cpu_amx']}, AVX512-BF16: "
        f"{machine['cpu_avx512_bf16']}, CUDA: {machine['cuda']}; torch {machine['torch']}",
        f"- load average (1/5/15 min) before: {machine['load_1_5_15']}; after: {machine['load_after']} "
        "(the machine is shared: ratios are taken within one round of back-to-back runs, median over rounds)",
        "",
        common.table(rows),
    ]
    for title, text in texts.items():
        lines += ["", f"**{title}**", "", "```", text, "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
