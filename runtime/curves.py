"""A run's loss curves: ``<run dir>/events.jsonl`` (every progress event, as it arrives) and
``<run dir>/curves.png`` drawn from it, at each validation and at the end of ``llmtrain run``;
``<run dir>/summary.json`` holds the final report. ``llmtrain report RUN_DIR`` redraws the
picture and prints the report again from those two files alone.

matplotlib (the Agg backend: no display) and the standard library only; no torch, no ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain.api.progress import ProgressEvent

EVENTS = "events.jsonl"
CURVES = "curves.png"
SUMMARY = "summary.json"


class EventLog:
    """Appends each event to ``events.jsonl`` (a resumed run continues the same file)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / EVENTS
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: ProgressEvent) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(event.to_json() + "\n")


def read_events(run_dir: Path) -> list[ProgressEvent]:
    path = run_dir / EVENTS
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ProgressEvent.from_json(line) for line in lines if line.strip()]


@dataclass
class Curves:
    """The points of each curve; a resumed run's replayed steps keep their newest value."""

    train: dict[int, tuple[int, float]] = field(default_factory=dict)  # step → (tokens, loss)
    val: dict[int, tuple[int, float]] = field(default_factory=dict)
    speed: dict[int, float] = field(default_factory=dict)  # step → tokens/s

    @classmethod
    def of(cls, events: Iterable[ProgressEvent]) -> Curves:
        c = cls()
        for e in events:
            # A validation event repeats the last log step's train loss: taken from log steps only.
            if e.stage == "training" and e.train_loss is not None and math.isfinite(e.train_loss):
                c.train[e.step] = (e.tokens, e.train_loss)
            if e.stage == "training" and e.tokens_per_second is not None:
                c.speed[e.step] = e.tokens_per_second
            if e.val_loss is not None and math.isfinite(e.val_loss):
                c.val[e.step] = (e.tokens, e.val_loss)
        return c


def draw(events: Iterable[ProgressEvent], path: Path, title: str = "") -> Path:
    """Train and validation loss against step and against tokens, and tokens/s against step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever the environment's default backend
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    c = Curves.of(events)
    fig, (by_step, by_tokens, speed) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for ax, x_of, xlabel in ((by_step, 0, "step"), (by_tokens, 1, "tokens")):
        for points, label, style in ((c.train, "train", "-"), (c.val, "validation", "o-")):
            steps = sorted(points)
            xs = steps if x_of == 0 else [points[s][0] for s in steps]
            ax.plot(xs, [points[s][1] for s in steps], style, label=label, markersize=4)
        ax.set_xlabel(xlabel)
        if x_of == 1:
            ax.xaxis.set_major_formatter(EngFormatter())  # 200k, 1.5M: token counts stay legible
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    steps = sorted(c.speed)
    speed.plot(steps, [c.speed[s] for s in steps], "-", color="tab:green")
    speed.set_xlabel("step")
    speed.set_ylabel("tokens/s")
    speed.yaxis.set_major_formatter(EngFormatter())
    speed.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)  # a reader never sees half a picture
    return path


def redraw(run_dir: Path, title: str = "") -> Path:
    return draw(read_events(run_dir), run_dir / CURVES, title)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    # Key order kept: the report lists stage_seconds in the order the stages ran.
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def read_summary(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
    return out
