"""Trials per hour on one GPU at 1, 2, 4 and 8 trials at once (bench/gpu_check.sh runs this).

Each arm is one `strata run` of the same small-trial TPE study with `--workers K` warm workers on
`device: cuda`: K trainer processes sharing the GPU, the mechanism a GPU worker pod uses for
`execution.trialsPerGpu: K` (strata_trainer.podworker runs the same WarmWorkerExecutor). Each arm
runs for a fixed study timeout; trials per hour = trials completed / wall time. nvidia-smi is sampled
every 0.5 s for utilisation and memory. Without Fashion-MNIST on the machine a synthetic dataset in
its format is written (the timing does not depend on the pixels).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STRATA = [sys.executable, "-m", "strata.cli"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def dataset_path(work: Path, synthetic: bool = False) -> str:
    if not synthetic and (FASHION / "train-images-idx3-ubyte.gz").is_file():
        return str(FASHION)
    import numpy as np

    rng = np.random.default_rng(0)
    n = 12000
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    folder = work / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name, header, body in (("train-images-idx3-ubyte.gz", struct.pack(">IIII", 2051, n, 28, 28), images),
                               ("train-labels-idx1-ubyte.gz", struct.pack(">II", 2049, n), labels)):
        with gzip.open(folder / name, "wb") as f:
            f.write(header + body.tobytes())
    return str(folder)


def study(path: str, seconds: int, device: str = "cuda") -> dict:
    return {
        "apiVersion": "hpo.strata.dev/v1alpha1", "kind": "HPOStudy", "metadata": {"name": "gpu-check"},
        "spec": {
            "searchSpace": {"convLayers": {"type": "int", "low": 1, "high": 3},
                            "filters": {"type": "categorical", "choices": [18, 32]},
                            "fcLayout": {"type": "categorical", "choices": ["250", "500-250"]},
                            "learningRate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                            "batchSize": {"type": "categorical", "choices": [64, 128]}},
            "sampler": {"name": "tpe", "seed": 1},
            "trials": {"max": 5000, "parallel": 1, "maxFailed": 50, "studyTimeoutSeconds": seconds},
            "training": {"dataset": {"name": "fashion-mnist", "path": path}, "inputSize": 32, "subsetSize": 6000,
                         "epochs": 3, "earlyStopPatience": 0, "device": device},
        },
    }


def sample_gpu(path: Path) -> subprocess.Popen | None:
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,memory.total",
                                 "--format=csv,noheader,nounits", "-lms", "500"], stdout=open(path, "w"),
                                stderr=subprocess.DEVNULL)
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=70, help="study timeout of each arm")
    parser.add_argument("--per-gpu", default="1,2,4,8")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-check"))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script where no GPU is")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data even where Fashion-MNIST is")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="strata-gpu-") as tmp:
        work = Path(tmp)
        path = dataset_path(work, args.synthetic)
        for k in (int(x) for x in args.per_gpu.split(",")):
            arm = work / f"k{k}"
            arm.mkdir()
            (arm / "study.yaml").write_text(yaml.safe_dump(study(path, args.seconds, args.device), sort_keys=False))
            smi = sample_gpu(arm / "smi.csv")
            started = time.monotonic()
            done = subprocess.run([*STRATA, "run", str(arm / "study.yaml"), "--workers", str(k), "--quiet",
                                   "--report", str(arm / "report.json")], capture_output=True, text=True,
                                  env={**os.environ, "STRATA_CPU_LIMIT": str(max(1, cores // k))})
            wall = time.monotonic() - started
            if smi is not None:
                smi.terminate()
                smi.wait()
            if not (arm / "report.json").exists():
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            report = json.loads((arm / "report.json").read_text())
            complete = report["summary"]["complete"] + report["summary"]["pruned"]
            samples = [[float(v) for v in line.split(",")] for line in (arm / "smi.csv").read_text().splitlines()
                       if line.count(",") == 2] if smi is not None else []
            row = {"trials_per_gpu": k, "trials": complete, "wall_s": round(wall, 1),
                   "trials_per_hour": round(complete / wall * 3600),
                   "train_s_per_trial": round(statistics.mean(float(t["train_seconds"]) for t in report["trials"]
                                                              if t.get("train_seconds")), 2) if complete else None,
                   "gpu_util_mean_pct": round(statistics.mean(s[0] for s in samples), 1) if samples else None,
                   "gpu_mem_peak_mib": max(s[1] for s in samples) if samples else None,
                   "gpu_mem_total_mib": samples[0][2] if samples else None,
                   "failed": report["summary"]["failed"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]["trials_per_hour"] or 1
    lines = ["| trials per GPU | trials | wall (s) | trials/hour | x of 1 | train s/trial | GPU util (mean %) | "
             "GPU memory peak (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trials_per_gpu']} | {r['trials']} | {r['wall_s']} | {r['trials_per_hour']} | "
                     f"{r['trials_per_hour'] / base:.2f} | {r['train_s_per_trial']} | {r['gpu_util_mean_pct']} | "
                     f"{r['gpu_mem_peak_mib']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
