"""Benchmark runs become numbers (per-arm summaries, ratios, a timing breakdown), markdown and plots.

Pure functions of the records that bench/reuse_benchmark.py writes; matplotlib only draws.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from bench.arms import ARMS, BASELINE, PAPER, STRATA

ARM_COLOURS = {BASELINE: "#7f7f7f", PAPER: "#1f77b4", STRATA: "#d62728"}
TPE_COLOURS = {"no-reuse": "#7f7f7f", "reuse": "#d62728"}


# --- numbers ----------------------------------------------------------------------------------


def quartiles(values: Iterable[float]) -> dict[str, float | None]:
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if data.size == 0:
        return {"q1": None, "median": None, "q3": None, "min": None, "max": None}
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    return {"q1": float(q1), "median": float(median), "q3": float(q3), "min": float(data.min()),
            "max": float(data.max())}


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in runs if r["val_loss"] is not None]
    return min(done, key=lambda r: r["val_loss"]) if done else None


def summarise_arm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = best_run(runs)
    epochs = [r["epochs_run"] for r in runs if r["failed"] is None]
    return {
        "configs": len(runs),
        "failed": sum(1 for r in runs if r["failed"] is not None),
        "total_seconds": float(sum(r["seconds"] for r in runs)),
        "time": quartiles(r["seconds"] for r in runs),
        "val_loss": quartiles(r["val_loss"] for r in runs),
        "best_val_loss": best["val_loss"] if best else None,
        "best_config": best["label"] if best else None,
        "best_params": best["config"] if best else None,
        "reused": sum(1 for r in runs if r["reused_layers"]),
        "shared_feature_hits": sum(1 for r in runs if r.get("shared_features") == "hit"),
        "epochs_run": int(sum(epochs)),
        "stopped_early": sum(1 for r in runs if r["stopped_early"]),
        "seconds_per_epoch": float(sum(r["epoch_seconds"] for r in runs) / max(1, sum(epochs))),
        "breakdown_seconds": {
            "donor_lookup_and_load": float(sum(r["donor_seconds"] for r in runs)),
            "feature_cache": float(sum(r["cache_seconds"] for r in runs)),
            "epochs": float(sum(r["epoch_seconds"] for r in runs)),
            "publish": float(sum(r["publish_seconds"] for r in runs)),
            "other": float(sum(r["seconds"] - r["donor_seconds"] - r["cache_seconds"] - r["epoch_seconds"]
                               - r["publish_seconds"] for r in runs)),
        },
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: the multi-layer configurations (what the paper's figures show) and the whole search.

    The paper arm's 1-layer configurations are the baseline's (nothing to reuse there); its whole
    search is those plus its own multi-layer runs.
    """
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    by_arm[PAPER] = [r for r in by_arm[BASELINE] if r["depth"] == 1] + [r for r in by_arm[PAPER] if r["depth"] > 1]
    arms: dict[str, Any] = {}
    for arm, arm_runs in by_arm.items():
        arms[arm] = {
            "multi_layer": summarise_arm([r for r in arm_runs if r["depth"] > 1]),
            "whole_search": summarise_arm(arm_runs),
        }
    for arm in ARMS:
        for scope in ("multi_layer", "whole_search"):
            base, mine = arms[BASELINE][scope], arms[arm][scope]
            mine["speedup_vs_baseline"] = _ratio(base["total_seconds"], mine["total_seconds"])
            mine["best_val_loss_ratio_to_baseline"] = _ratio(mine["best_val_loss"], base["best_val_loss"])
            mine["median_time_ratio_to_baseline"] = _ratio(base["time"]["median"], mine["time"]["median"])
    return arms


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a / b)


def table2(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation loss per epoch of each arm's best multi-layer configuration (the paper's Table 2)."""
    out = {}
    for arm in ARMS:
        best = best_run([r for r in runs if r["arm"] == arm and r["depth"] > 1])
        if best:
            out[arm] = {"config": best["label"], "val_loss_per_epoch": best["val_loss_per_epoch"],
                        "best_epoch": best["best_epoch"], "reused_layers": best["reused_layers"]}
    return out


def targets(arms: dict[str, Any], speedup_target: float) -> dict[str, Any]:
    strata, paper, base = arms[STRATA]["multi_layer"], arms[PAPER]["multi_layer"], arms[BASELINE]["multi_layer"]
    strata_whole, base_whole = arms[STRATA]["whole_search"], arms[BASELINE]["whole_search"]
    return {
        "strata_speedup_target": speedup_target,
        "strata_speedup_multi_layer": strata["speedup_vs_baseline"],
        "strata_speedup_met": bool(strata["speedup_vs_baseline"] and strata["speedup_vs_baseline"] >= speedup_target),
        "strata_best_no_worse_multi_layer": _no_worse(strata["best_val_loss"], base["best_val_loss"]),
        "strata_best_no_worse_whole_search": _no_worse(strata_whole["best_val_loss"], base_whole["best_val_loss"]),
        "paper_faster": bool(paper["speedup_vs_baseline"] and paper["speedup_vs_baseline"] > 1.0),
        "paper_best_lower": _no_worse(paper["best_val_loss"], base["best_val_loss"], strict=True),
        "paper_reference": {"speedup_multi_layer": 14000 / 11000, "best_val_loss_without_reuse": 1.0016,
                            "best_val_loss_with_reuse": 0.9651},
    }


def _no_worse(mine: float | None, base: float | None, strict: bool = False) -> bool:
    if mine is None or base is None:
        return False
    return mine < base if strict else mine <= base


def tpe_summary(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: time for each arm to reach the no-reuse search's final best, and the ratios."""
    ratios = [s["time_to_no_reuse_best"]["no-reuse"] / s["time_to_no_reuse_best"]["reuse"]
              for s in seeds if s["time_to_no_reuse_best"]["reuse"]]
    reached = sum(1 for s in seeds if s["time_to_no_reuse_best"]["reuse"] is not None)
    total_ratio = [s["arms"]["no-reuse"]["seconds"] / s["arms"]["reuse"]["seconds"] for s in seeds
                   if s["arms"]["reuse"]["seconds"]]
    return {
        "seeds": len(seeds),
        "reuse_reached_no_reuse_best": reached,
        "time_to_target_speedup": quartiles(ratios),
        "budget_time_speedup": quartiles(total_ratio),
        "final_best": {arm: quartiles(s["arms"][arm]["best_val_loss"] for s in seeds) for arm in ("no-reuse", "reuse")},
    }


def time_to_reach(timeline: list[list[float]], target: float | None) -> float | None:
    """First elapsed time at which the best-so-far value is at or below target."""
    if target is None:
        return None
    for elapsed, best in timeline:
        if best is not None and best <= target + 1e-12:
            return elapsed
    return None


# --- markdown ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _q(stats: dict[str, float | None], digits: int) -> str:
    if stats["median"] is None:
        return "—"
    return f"{stats['median']:.{digits}f} [{stats['q1']:.{digits}f}, {stats['q3']:.{digits}f}]"


def results_table(arms: dict[str, Any]) -> str:
    head = ("| arm | multi-layer time (s) | speedup vs baseline | whole search (s) | speedup vs baseline "
            "| best val loss, multi-layer (ratio to baseline) | its configuration | best val loss, whole search "
            "| time per config, s: median [Q1, Q3] | val loss: median [Q1, Q3] |")
    rows = [head, "|" + "---|" * 10]
    for arm in ARMS:
        m, w = arms[arm]["multi_layer"], arms[arm]["whole_search"]
        rows.append(
            f"| {arm} | {m['total_seconds']:.1f} | {_x(m['speedup_vs_baseline'])} | {w['total_seconds']:.1f} "
            f"| {_x(w['speedup_vs_baseline'])} | {_f(m['best_val_loss'], 4)} ({_f(m['best_val_loss_ratio_to_baseline'])}) "
            f"| `{m['best_config']}` | {_f(w['best_val_loss'], 4)} | {_q(m['time'], 2)} | {_q(m['val_loss'], 3)} |"
        )
    return "\n".join(rows)


def breakdown_table(arms: dict[str, Any]) -> str:
    rows = ["| arm (multi-layer configs) | total (s) | donor lookup + load | feature cache | epochs | publish | other "
            "| epochs run | s per epoch | stopped early | reused | frozen outputs read, not computed |",
            "|" + "---|" * 12]
    for arm in ARMS:
        m = arms[arm]["multi_layer"]
        b = m["breakdown_seconds"]
        rows.append(
            f"| {arm} | {m['total_seconds']:.1f} | {b['donor_lookup_and_load']:.1f} | {b['feature_cache']:.1f} "
            f"| {b['epochs']:.1f} | {b['publish']:.1f} | {b['other']:.1f} | {m['epochs_run']} "
            f"| {m['seconds_per_epoch']:.3f} | {m['stopped_early']} | {m['reused']}/{m['configs']} "
            f"| {m['shared_feature_hits']}/{m['configs']} |"
        )
    return "\n".join(rows)


def table2_markdown(t2: dict[str, Any]) -> str:
    arms = [arm for arm in ARMS if arm in t2]
    epochs = max((len(t2[a]["val_loss_per_epoch"]) for a in arms), default=0)
    rows = ["| epoch | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for e in range(epochs):
        cells = []
        for arm in arms:
            losses = t2[arm]["val_loss_per_epoch"]
            cells.append(f"{losses[e]:.4f}" if e < len(losses) else "—")
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    rows.append("| config | " + " | ".join(f"`{t2[a]['config']}`" for a in arms) + " |")
    return "\n".join(rows)


def tpe_table(seeds: list[dict[str, Any]]) -> str:
    rows = ["| seed | arm | trials | wall time (s) | final best val loss | time to no-reuse best (s) "
            "| time to grid baseline best (s) |", "|" + "---|" * 7]
    for s in seeds:
        for arm in ("no-reuse", "reuse"):
            a = s["arms"][arm]
            rows.append(
                f"| {s['seed']} | {arm} | {a['trials']} | {a['seconds']:.1f} | {_f(a['best_val_loss'], 4)} "
                f"| {_f(s['time_to_no_reuse_best'][arm], 1) if s['time_to_no_reuse_best'][arm] is not None else 'not reached'} "
                f"| {_f(s['time_to_grid_best'][arm], 1) if s['time_to_grid_best'][arm] is not None else 'not reached'} |"
            )
    return "\n".join(rows)


def results_markdown(result: dict[str, Any]) -> str:
    meta, arms, t = result["meta"], result["arms"], result["targets"]
    lines = [
        f"# Layer reuse benchmark: {meta['space'].upper()} space{' (quick)' if meta['quick'] else ''}",
        "",
        f"- command: `{meta['command']}`",
        *([f"- **partial**: summarised from `{meta['partial_from']}` while or after an unfinished run; "
           "times are the runs' own, the wall times below are not measured"] if meta.get("partial_from") else []),
        f"- machine: {meta['machine']['nproc']} cores, {meta['machine']['cpu_model']}, torch "
        f"{meta['machine']['torch']}, {meta['machine']['threads']} threads, load average at start "
        f"{meta['machine']['loadavg_start']}, at end {meta['machine'].get('loadavg_end')}",
        f"- dataset: {meta['dataset']['source']}, {meta['dataset']['train']} training + {meta['dataset']['val']} "
        f"validation images (subset {meta['dataset']['subset']}), input {meta['dataset']['input_shape']}",
        f"- grid: {meta['grid_size']} configurations ({meta['grid']}), {meta['grid_configs_run']} run per arm",
        f"- epochs {meta['epochs']}; strata: {meta['epochs_when_reusing'] or meta['epochs']} when reusing, early-stop patience "
        f"{meta['patience']}, feature cache on",
        f"- wall time of the whole benchmark: {meta['wall_seconds']:.0f} s (grid pass {meta['grid_seconds']:.0f} s, "
        f"TPE part {meta['tpe_seconds']:.0f} s)",
        "",
        "## Results (speedup = baseline time / arm time; multi-layer = configurations with 2 or 3 conv layers)",
        "",
        results_table(arms),
        "",
        f"Targets: strata multi-layer speedup {_x(t['strata_speedup_multi_layer'])} (target "
        f"{t['strata_speedup_target']:.1f}x: {'met' if t['strata_speedup_met'] else 'missed'}); strata best val "
        f"loss no worse than baseline: multi-layer {t['strata_best_no_worse_multi_layer']}, whole search "
        f"{t['strata_best_no_worse_whole_search']}; paper arm faster: {t['paper_faster']}, lower best loss: "
        f"{t['paper_best_lower']} (the paper: 1.27x, 1.0016 -> 0.9651).",
        "",
        "## Where the time goes (multi-layer configurations)",
        "",
        breakdown_table(arms),
        "",
        "## Validation loss per epoch of each arm's best multi-layer configuration (Table 2)",
        "",
        table2_markdown(result["table2"]),
        "",
        "![training time](fig_time.png) ![validation loss](fig_val_loss.png) ![table 2](table2_epochs.png)",
    ]
    tpe = result.get("tpe")
    if tpe and tpe["seeds"]:
        s = tpe["summary"]
        lines += [
            "",
            f"## TPE search, {tpe['trials']} trials, with and without reuse ({s['seeds']} seeds)",
            "",
            tpe_table(tpe["seeds"]),
            "",
            f"Reuse reached the no-reuse search's final best in {s['reuse_reached_no_reuse_best']} of {s['seeds']} "
            f"seeds; time-to-that-loss speedup median {_f(s['time_to_target_speedup']['median'], 2)}x, "
            f"whole-budget speedup median {_f(s['budget_time_speedup']['median'], 2)}x.",
            "",
            "![best loss over time](tpe_claim.png)",
        ]
    return "\n".join(lines) + "\n"


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def box_plot(runs: list[dict[str, Any]], key: str, ylabel: str, title: str, path: str) -> None:
    """The paper's Figures 2 and 3: one box per arm over the multi-layer configurations."""
    plt = _pyplot()
    data, labels = [], []
    for arm in ARMS:
        values = [r[key] for r in runs if r["arm"] == arm and r["depth"] > 1 and r[key] is not None]
        data.append(values or [float("nan")])
        labels.append(f"{arm}\n(n={len(values)})")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    boxes = ax.boxplot(data, patch_artist=True, widths=0.55)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    for patch, arm in zip(boxes["boxes"], ARMS):
        patch.set_facecolor(ARM_COLOURS[arm])
        patch.set_alpha(0.55)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table2_plot(t2: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm, row in t2.items():
        losses = row["val_loss_per_epoch"]
        ax.plot(range(1, len(losses) + 1), losses, marker="o", color=ARM_COLOURS[arm],
                label=f"{arm}: {row['config']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss per epoch, best multi-layer configuration")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tpe_plot(seeds: list[dict[str, Any]], grid_best: float | None, path: str) -> None:
    """Best validation loss reached so far against the search's own wall time, per seed and arm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in seeds:
        for arm in ("no-reuse", "reuse"):
            timeline = [(t, b) for t, b in s["arms"][arm]["timeline"] if b is not None]
            if not timeline:
                continue
            xs, ys = zip(*timeline)
            ax.step(xs, ys, where="post", color=TPE_COLOURS[arm], alpha=0.75,
                    label=arm if s is seeds[0] else None, linestyle="-" if arm == "reuse" else "--")
    if grid_best is not None:
        ax.axhline(grid_best, color="black", linewidth=0.8, linestyle=":", label="grid baseline best")
    ax.set_xlabel("search wall time (s)")
    ax.set_ylabel("best validation loss so far")
    ax.set_title(f"TPE, {len(seeds)} seed(s): best loss against time")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
