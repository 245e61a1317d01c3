"""Figures of 11_compare_runs.py (matplotlib, Agg backend: no display needed).

    bars_by_policy(policies, "plots/reward_vs_method.png")
    efficiency_vs_quality(policies, "plots/efficiency_vs_quality.png")
    training_curves(policies, "plots/training_curves.png")       # rows with "log": training log entries
    score_vs_seed(policies, "plots/score_vs_seed.png")

`policies` are summary rows (11_compare_runs.py) with label, method, seed, exec_acc,
exec_acc_ci_low/high, reward_mean, optional reward_mean_ci_low/high, compute_hours,
compute_device, train_tokens, and log (the training log's entries, [] when none).
Every function writes its PNG even with nothing to draw (then a panel says why), so the report's
links never break. Legends sit outside the axes.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import transforms  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from utils.comparison import mean_std  # noqa: E402

ORDER = ("base", "sft", "ppo", "grpo", "rloo", "dpo")
PALETTE = plt.get_cmap("tab10").colors
DPI = 120
DODGE = 7.0  # points between markers of policies with the same (cost, exec_acc)


def method_color(method: str, methods: list[str]):
    """One stable color per method: known methods keep theirs across reports."""
    index = ORDER.index(method) if method in ORDER else len(ORDER) + sorted(set(methods)).index(method)
    return PALETTE[index % len(PALETTE)]


def seed_key(seed) -> tuple:
    """Sort key for seeds: numbers in numeric order (2 before 10), then other values, unknown last."""
    return (seed is None, not isinstance(seed, int), seed if isinstance(seed, int) else str(seed))


def _sorted(policies: list[dict]) -> list[dict]:
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(policies, key=lambda p: (rank.get(p["method"], len(ORDER)), p["method"], seed_key(p["seed"]),
                                           p["label"]))


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _errors(values, lows, highs):
    """Asymmetric error bars; missing CIs draw none. Clamped at 0: a mean and a degenerate CI that are
    equal up to rounding (mean -0.20000000000000004, CI [-0.2, -0.2]) give -3e-17, which matplotlib rejects."""
    below = [max(0.0, v - lo) if None not in (v, lo) else 0.0 for v, lo in zip(values, lows)]
    above = [max(0.0, hi - v) if None not in (v, hi) else 0.0 for v, hi in zip(values, highs)]
    return [below, above]


def _method_legend(fig, methods: list[str], all_methods: list[str]) -> None:
    handles = [plt.Rectangle((0, 0), 1, 1, color=method_color(m, all_methods)) for m in methods]
    fig.legend(handles, methods, title="method", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def bars_by_policy(policies: list[dict], path) -> Path:
    """Two panels: exec_acc and reward_mean per policy, bars colored by method, 95% CI error bars."""
    policies = _sorted(policies)
    methods = [p["method"] for p in policies]
    if len(policies) <= 8:  # side by side while the bars are few, else stacked to keep the figure readable
        fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(policies) + 4), 4.2))
    else:
        fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.45 * len(policies) + 3), 8.5))
    xs = range(len(policies))
    colors = [method_color(m, methods) for m in methods]
    for ax, key, title in ((axes[0], "exec_acc", "Execution accuracy"), (axes[1], "reward_mean", "Mean reward")):
        values = [p[key] if p[key] is not None else math.nan for p in policies]
        errors = _errors(values, [p.get(f"{key}_ci_low") for p in policies],
                         [p.get(f"{key}_ci_high") for p in policies])
        ax.bar(xs, values, color=colors, yerr=errors, capsize=4, ecolor="black")
        ax.set_xticks(list(xs), [p["label"] for p in policies], rotation=30, ha="right")
        ax.set_xlabel("policy")
        ax.set_ylabel(key)
        ax.set_title(f"{title} (95% bootstrap CI)")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1.05)
    _method_legend(fig, list(dict.fromkeys(methods)), methods)
    fig.tight_layout()
    return _save(fig, path)


def efficiency_vs_quality(policies: list[dict], path) -> Path:
    """exec_acc against training cost (compute hours, else train tokens), one labelled marker per policy."""
    policies = _sorted(policies)
    methods = [p["method"] for p in policies]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, label in (("compute_hours", "training compute (device-hours)"), ("train_tokens", "training tokens")):
        points = [p for p in policies if p.get(key) is not None]
        if any(p["method"] != "base" for p in points):  # base alone (cost 0 by definition) shows nothing
            break
    else:
        _empty(ax, "No training cost logged (no training manifests found):\nnothing to plot.")
        ax.set_title("Efficiency vs quality")
        return _save(fig, path)
    ax.set_ylim(-0.02, 1.05)
    xs = [float(p[key]) for p in points]
    pad = (max(xs) - min(xs)) * 0.15 or 0.5
    ax.set_xlim(max(min(xs) - pad, -0.05 * (max(xs) + pad)) if min(xs) >= 0 else min(xs) - pad, max(xs) + pad)
    spots = [(x, p["exec_acc"]) for p, x in zip(points, xs)]
    seen, labels = {}, []
    for p, (x, y) in zip(points, spots):
        # policies on the same spot are dodged sideways on screen (DODGE points apart), so no marker hides another
        dodge = DODGE * (seen.setdefault((x, y), 0) - (spots.count((x, y)) - 1) / 2)
        seen[(x, y)] += 1
        ax.errorbar([x], [y], yerr=_errors([y], [p.get("exec_acc_ci_low")], [p.get("exec_acc_ci_high")]),
                    fmt="o", color=method_color(p["method"], methods), capsize=3, markersize=7,
                    transform=transforms.offset_copy(ax.transData, fig=fig, x=dodge, units="points"))
        device = _device_short(p.get("compute_device")) if key == "compute_hours" else ""
        cluster_right = DODGE * (spots.count((x, y)) - 1) / 2
        labels.append(((x, y), dodge, cluster_right, p["label"] + (f" ({device})" if device else "")))
    _place_labels(fig, ax, labels)
    ax.set_xlabel(label + (" of the policy's own training stage" + ("; base = 0" if key == "compute_hours" else "")))
    ax.set_ylabel("exec_acc")
    ax.set_title("Efficiency vs quality (exec_acc with 95% CI)")
    ax.grid(alpha=0.3)
    _method_legend(fig, list(dict.fromkeys(p["method"] for p in points)), methods)
    fig.tight_layout()
    return _save(fig, path)


def _place_labels(fig, ax, labels: list[tuple], step: float = 11.0) -> None:
    """Label markers without overlaps. labels: ((x, y), dodge, cluster_right, text), offsets in points.

    Each label starts right of its cluster of dodged markers and moves up or down by `step` points
    until its box touches no marker and no label placed before it; a thin line links it to its marker.
    """
    fig.canvas.draw()
    renderer, placed = fig.canvas.get_renderer(), []
    points_to_px = fig.dpi / 72.0
    for (x, y), dodge, _, _ in labels:  # markers are obstacles
        px, py = ax.transData.transform((x, y))
        px += dodge * points_to_px
        placed.append(transforms.Bbox([[px - 5, py - 5], [px + 5, py + 5]]))
    for (x, y), dodge, cluster_right, text in labels:
        anchor = transforms.offset_copy(ax.transData, fig=fig, x=dodge, units="points")
        note = ax.annotate(text, (x, y), xycoords=anchor, xytext=(0, 0), textcoords="offset points", fontsize=8,
                           va="center", arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5,
                                                    "shrinkA": 1, "shrinkB": 4})
        for k in (0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6, 7, -7, 8, -8, 9, -9, 10, -10):
            note.xyann = (cluster_right - dodge + 9, k * step)
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text alone: its leader line may cross others
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def _device_short(device) -> str:
    """'cuda:NVIDIA H100 80GB HBM3 x2' -> 'GPU x2', 'cpu' -> 'CPU'; '' when unknown."""
    if not device or device in ("none", "unknown"):
        return ""
    count = device.rsplit(" x", 1)[1] if " x" in device and device.rsplit(" x", 1)[1].isdigit() else "1"
    kind = "GPU" if device.startswith("cuda") else device.split(":")[0].upper()
    return kind if count == "1" else f"{kind} x{count}"


def _series(entries: list[dict], keys: tuple[str, ...]):
    """(steps, values) of the first key logged with a step; NaN/None values dropped."""
    for key in keys:
        pairs = [(e["step"], e[key]) for e in entries if isinstance(e.get(key), (int, float))
                 and isinstance(e.get("step"), (int, float)) and math.isfinite(e[key])]
        if pairs:
            return [s for s, _ in pairs], [v for _, v in pairs], key
    return [], [], None


def training_curves(policies: list[dict], path) -> Path:
    """Two panels over training steps: reward and KL to the reference, one line per policy (color = method)."""
    logs = {p["label"]: (p["method"], p["log"]) for p in _sorted(policies) if p.get("log")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = [method for method, _ in logs.values()]
    panels = ((axes[0], ("reward",), "reward (batch mean)", "Reward during training"),
              (axes[1], ("kl", "objective/kl", "ppo/approx_kl"), "KL to reference", "KL during training"))
    styles = ("-", "--", ":", "-.")
    for ax, keys, ylabel, title in panels:
        drawn, missing, per_method = 0, [], {}
        for label, (method, entries) in logs.items():
            steps, values, key = _series(entries, keys)
            if not steps:
                missing.append(label)
                continue
            style = styles[per_method.setdefault(method, 0) % len(styles)]
            per_method[method] += 1
            ax.plot(steps, values, style, color=method_color(method, methods), label=label, linewidth=1.5)
            drawn += 1
        if not drawn:
            _empty(ax, "nothing logged" + (f" ({', '.join(missing)} have no {keys[0]})" if missing
                                           else " (no training logs found)"))
        else:
            ax.set_xlabel("training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if missing:
                ax.text(0.01, -0.22, f"not logged: {', '.join(missing)}", transform=ax.transAxes, fontsize=8,
                        color="grey", va="top")
        ax.set_title(title)
    handles, labels = {}, {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), title="policy", loc="center left",
                   bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def score_vs_seed(policies: list[dict], path) -> Path:
    """exec_acc of each seed per method (95% CI), and in a last column each method's mean ± std over seeds."""
    policies = _sorted(policies)
    methods = [p["method"] for p in policies]
    seeds = sorted({p["seed"] for p in policies}, key=seed_key)
    column = {seed: i for i, seed in enumerate(seeds)}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 * len(seeds) + 5), 4.2))
    count = len(set(methods))
    for i, method in enumerate(dict.fromkeys(methods)):
        group = [p for p in policies if p["method"] == method]
        nudge = (i - (count - 1) / 2) * min(0.08, 0.6 / count)  # methods sharing a seed stay apart
        ys = [p["exec_acc"] for p in group]
        errors = _errors(ys, [p.get("exec_acc_ci_low") for p in group], [p.get("exec_acc_ci_high") for p in group])
        color = method_color(method, methods)
        ax.errorbar([column[p["seed"]] + nudge for p in group], ys, yerr=errors, fmt="o", color=color, capsize=3,
                    markersize=7, label=method)
        mean, std = mean_std(ys)
        if std is not None:
            ax.errorbar([len(seeds) + nudge], [mean], yerr=[[std], [std]], fmt="D", color=color, capsize=3,
                        markersize=6)
    ax.axvline(len(seeds) - 0.5, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(seeds) + 1), ["unknown" if s is None else str(s) for s in seeds] + ["mean ± std"])
    ax.set_xlim(-0.5, len(seeds) + 0.5)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("seed")
    ax.set_ylabel("exec_acc")
    ax.set_title("Execution accuracy per seed (95% CI) and across seeds (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(title="method", loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, path)
