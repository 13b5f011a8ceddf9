"""Model families, measured side by side in one run.

    python bench/families.py                  # full: about 20 minutes on 2 cores
    python bench/families.py --quick          # about 2 minutes (CI: tests/test_families_bench.py)
    python bench/families.py --only throughput --out /tmp/families

Parts:

throughput    per family, the trainer's loop (strata_trainer.training.train: epochs, validation, best
              weights) against a plain PyTorch loop on the same model, data, batch size and optimizer
              (the same seeds: the same weights). Ratio = plain seconds / Strata seconds (target >= 0.95).
reuse         a ResNet depth search (ResNet-8/14/20 x 2 learning rates, grid, Fashion-MNIST) through
              `strata run`, reuse on and off, warm workers, for each seed: wall-time ratio, training-time
              ratio, best validation loss and the best trial's test accuracy.
augmentation  one ResNet-20 trial taking ResNet-14's stem and first 2 blocks (3 units, frozen): without
              augmentation (frozen outputs cached), with crop+flip (not cacheable: the frozen prefix
              runs forward every epoch, without backward or optimizer state), and with crop+flip from
              scratch; seconds per epoch.

Prints a table per part and writes results.json and results.md into --out
(default bench/results/families-<timestamp>).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import run_study  # noqa: E402

TARGETS = {"throughput_ratio": 0.95}
THROUGHPUT_MODELS = [  # (family, params, label): sized so an epoch takes seconds on 2 CPU cores
    ("paper-cnn", {"convLayers": 3, "filters": 18, "fcLayout": "500"}, "paper CNN 3x18"),
    ("vgg", {"layersPerGroup": "2-2-3-3-3", "width": 16}, "VGG-16-BN, width 16"),
    ("resnet", {"depth": 20}, "ResNet-20"),
    ("mobilenetv2", {"widthMultiplier": 0.5}, "MobileNetV2 x0.5"),
]


def _spec(family: str, quick: bool, **training: Any):
    from strata.spec import parse_spec

    return parse_spec({"model": {"family": family},
                       "searchSpace": {"learningRate": {"type": "categorical", "choices": [0.05]}},
                       "trials": {"max": 1},
                       "training": {"dataset": {"name": "fashion-mnist"}, "inputSize": 32,
                                    "subsetSize": 200 if quick else 1600, "optimizer": "sgd", "learningRate": 0.05,
                                    "batchSize": 64, "device": "cpu", **training}})


def plain_loop(model, data, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    """What a user writes without Strata: shuffle, forward, backward, step; validate each epoch."""
    import torch
    from torch import nn

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    x, y, n = data.train.x, data.train.y, len(data.train.y)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        for begin in range(0, n, batch_size):
            index = order[begin:begin + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            loss.item()
        model.eval()
        with torch.no_grad():
            for begin in range(0, len(data.val.y), 1024):
                nn.functional.cross_entropy(model(data.val.x[begin:begin + 1024]), data.val.y[begin:begin + 1024])
    return time.perf_counter() - started


def _first(data, n: int):
    """The first n training images of the splits (a warm-up's data)."""
    import dataclasses

    return dataclasses.replace(data, train=dataclasses.replace(data.train, x=data.train.x[:n], y=data.train.y[:n]),
                               val=dataclasses.replace(data.val, x=data.val.x[:n], y=data.val.y[:n]))


def throughput_part(quick: bool, work: Path) -> dict[str, Any]:
    import torch

    from strata.families import architecture_from_params
    from strata_trainer.data import load_dataset
    from strata_trainer.models import build_model
    from strata_trainer.training import train

    torch.set_num_threads(2)
    epochs, repeats = (1, 1) if quick else (1, 3)
    rows = []
    for family, params, label in THROUGHPUT_MODELS:
        spec = _spec(family, quick, evaluateTest=False)
        data = load_dataset(spec.training)
        arch = architecture_from_params(spec, params)
        plain_times, strata_times = [], []
        torch.manual_seed(0)  # warm-up, untimed: the first passes set up torch's thread pool and allocator
        plain_loop(build_model(arch, data.num_classes, spec.model), _first(data, 128), 1, 64, 0.05, seed=0)
        for _ in range(repeats):  # alternated, so machine noise hits both alike
            torch.manual_seed(0)
            plain_times.append(plain_loop(build_model(arch, data.num_classes, spec.model), data, epochs,
                                          arch.training.batch_size, arch.training.learning_rate, seed=0))
            torch.manual_seed(0)
            model = build_model(arch, data.num_classes, spec.model)
            started = time.perf_counter()
            train(model, data, frozen_layers=0, epochs=epochs, patience=0, seed=0, device=torch.device("cpu"),
                  cache_features=False)
            strata_times.append(time.perf_counter() - started)
        plain, strata = statistics.median(plain_times), statistics.median(strata_times)
        images = epochs * len(data.train.y)
        row = {"family": family, "model": label, "params": sum(p.numel() for p in model.parameters()),
               "plain_seconds": plain, "strata_seconds": strata, "ratio": plain / strata,
               "strata_images_per_second": images / strata}
        rows.append(row)
        print(f"  {label:22s} plain {plain:6.2f} s  strata {strata:6.2f} s  ratio {row['ratio']:.3f}  "
              f"({row['strata_images_per_second']:.0f} images/s)", flush=True)
    return {"epochs": epochs, "repeats": repeats, "rows": rows, "min_ratio": min(r["ratio"] for r in rows)}


RESNET_STUDY: dict[str, Any] = {
    "apiVersion": "hpo.strata.dev/v1alpha1",
    "kind": "HPOStudy",
    "metadata": {"name": "resnets"},
    "spec": {
        "model": {"family": "resnet"},
        "objective": {"metric": "val_loss"},
        "searchSpace": {"depth": {"type": "categorical", "choices": [8, 14, 20]},
                        "learningRate": {"type": "categorical", "choices": [0.05, 0.1]}},
        "sampler": {"name": "grid"},
        "trials": {"max": 6, "parallel": 1, "maxFailed": 1, "retries": 0},
        "training": {"dataset": {"name": "fashion-mnist"}, "subsetSize": 2000, "epochs": 3, "epochsWhenReusing": 2,
                     "earlyStopPatience": 1, "optimizer": "sgd", "weightDecay": 0.0005, "batchSize": 64,
                     "schedule": {"kind": "cosine"}, "device": "cpu"},
        "reuse": {"enabled": True},
    },
}


def reuse_part(quick: bool, work: Path, seeds: int) -> dict[str, Any]:
    document = copy.deepcopy(RESNET_STUDY)
    if quick:
        document["spec"]["searchSpace"]["depth"]["choices"] = [8, 14]
        document["spec"]["searchSpace"]["learningRate"]["choices"] = [0.05]
        document["spec"]["trials"]["max"] = 2
        document["spec"]["training"].update({"subsetSize": 300, "epochs": 1, "epochsWhenReusing": 1,
                                             "inputSize": 16})
    runs = []
    for seed in range(seeds):
        document["spec"]["training"]["seed"] = seed
        for arm, enabled in (("reuse on", True), ("reuse off", False)):  # alternated per seed
            document["spec"]["reuse"]["enabled"] = enabled
            result = run_study(document, work / f"resnet-{seed}-{arm.replace(' ', '-')}")
            report = json.loads((work / f"resnet-{seed}-{arm.replace(' ', '-')}" / "report.json").read_text())
            best = report["best"] or {}
            row = {"seed": seed, "arm": arm, "wall": result["wall"], "train": result["train"],
                   "startup": result["startup"], "trials": result["trials"], "reused_trials": result["reused_trials"],
                   "best_val_loss": best.get("value"), "best_model": best.get("model"),
                   "best_test_accuracy": best.get("test_accuracy"),
                   "test_seconds": sum(float(t.get("test_seconds") or 0) for t in report["trials"]),
                   "epochs": sum(int(t.get("epochs_run") or 0) for t in report["trials"])}
            runs.append(row)
            print(f"  seed {seed} {arm:9s}: wall {row['wall']:6.1f} s, training {row['train']:6.1f} s, "
                  f"{row['reused_trials']} reused, best val {row['best_val_loss']:.4f} ({row['best_model']}), "
                  f"test accuracy {row['best_test_accuracy']:.4f}", flush=True)
    on = [r for r in runs if r["arm"] == "reuse on"]
    off = [r for r in runs if r["arm"] == "reuse off"]
    pair = lambda key: [b[key] / a[key] for a, b in zip(on, off)]  # noqa: E731  off / on, per seed
    return {"runs": runs, "wall_ratio": statistics.median(pair("wall")), "train_ratio": statistics.median(pair("train")),
            "wall_ratios": pair("wall"), "train_ratios": pair("train")}


def augmentation_part(quick: bool, work: Path) -> dict[str, Any]:
    import torch

    from strata.families import architecture_from_params
    from strata_trainer.data import load_dataset
    from strata_trainer.models import build_model
    from strata_trainer.training import train

    torch.set_num_threads(2)
    epochs = 1 if quick else 3
    plain = _spec("resnet", quick, evaluateTest=False)
    augmented = _spec("resnet", quick, evaluateTest=False, augmentation={"randomCropPadding": 4, "horizontalFlip": True})
    data = load_dataset(plain.training)
    torch.manual_seed(0)
    donor = build_model(architecture_from_params(plain, {"depth": 14}), data.num_classes, plain.model)
    prefix = donor.prefix_state(3)
    warm = build_model(architecture_from_params(plain, {"depth": 20}), data.num_classes, plain.model)
    train(warm, _first(data, 128), frozen_layers=0, epochs=1, patience=0, seed=0, device=torch.device("cpu"),
          cache_features=False)  # warm-up, untimed
    rows = []
    for label, spec, reuse in (("reused prefix, no augmentation (cached)", plain, True),
                               ("reused prefix, crop+flip (not cached)", augmented, True),
                               ("from scratch, crop+flip", augmented, False)):
        torch.manual_seed(1)
        model = build_model(architecture_from_params(spec, {"depth": 20}), data.num_classes, spec.model)
        if reuse:
            model.load_prefix(prefix, 3)
        result = train(model, data, frozen_layers=3 if reuse else 0, epochs=epochs, patience=0, seed=0,
                       device=torch.device("cpu"), cache_features=True)
        epoch_seconds = statistics.mean(r.seconds for r in result.epochs)
        rows.append({"arm": label, "seconds": result.train_seconds, "epoch_seconds": epoch_seconds,
                     "feature_cache": result.feature_cache,
                     "cache_seconds": result.train_seconds - sum(r.seconds for r in result.epochs)})
        print(f"  {label:42s} {epoch_seconds:6.2f} s/epoch (cache {result.feature_cache})", flush=True)
    return {"epochs": epochs, "rows": rows}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Model families", ""]
    if "throughput" in results:
        t = results["throughput"]
        lines += [f"Trainer throughput against a plain PyTorch loop ({t['epochs']} epoch(s), median of "
                  f"{t['repeats']}):", "", "| model | parameters | plain (s) | strata (s) | ratio | images/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['params']:,} | {r['plain_seconds']:.2f} | {r['strata_seconds']:.2f} | "
                  f"{r['ratio']:.3f} | {r['strata_images_per_second']:.0f} |" for r in t["rows"]]
        lines += ["", f"Lowest ratio {t['min_ratio']:.3f} (target >= {TARGETS['throughput_ratio']}).", ""]
    if "reuse" in results:
        r = results["reuse"]
        lines += ["ResNet depth search, reuse on and off:", "",
                  "| seed | arm | wall (s) | training (s) | start-up (s) | reused trials | epochs | best val loss | "
                  "best model | test accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {x['seed']} | {x['arm']} | {x['wall']:.1f} | {x['train']:.1f} | {x['startup']:.1f} | "
                  f"{x['reused_trials']} | {x['epochs']} | {x['best_val_loss']:.4f} | {x['best_model']} | "
                  f"{x['best_test_accuracy']:.4f} |" for x in r["runs"]]
        lines += ["", f"Reuse speed-up: wall {r['wall_ratio']:.2f}x, training {r['train_ratio']:.2f}x (median over "
                  "seeds, off / on).", ""]
    if "augmentation" in results:
        a = results["augmentation"]
        lines += ["ResNet-20 taking 3 frozen units, with and without augmentation:", "",
                  "| arm | s/epoch | feature cache |", "|---|---:|---|"]
        lines += [f"| {x['arm']} | {x['epoch_seconds']:.2f} | {x['feature_cache']} |" for x in a["rows"]]
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--only", default="throughput,reuse,augmentation")
    parser.add_argument("--seeds", type=int, default=None, help="reuse part: seeds (default 2, quick 1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"families-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    results: dict[str, Any] = {"quick": args.quick}
    started = time.monotonic()
    if "throughput" in parts:
        print("throughput: trainer loop against a plain PyTorch loop", flush=True)
        results["throughput"] = throughput_part(args.quick, out)
    if "reuse" in parts:
        print("reuse: ResNet depth search through strata run", flush=True)
        results["reuse"] = reuse_part(args.quick, out, args.seeds or (1 if args.quick else 2))
    if "augmentation" in parts:
        print("augmentation: a reusing ResNet-20 trial", flush=True)
        results["augmentation"] = augmentation_part(args.quick, out)
    results["seconds"] = time.monotonic() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
