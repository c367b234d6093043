"""SSD, Scheduled Sliding-window Dropout (SPEC §3): a `transformers.TrainerCallback`.

At each optimizer step every converted layer independently drops its sliding-window branch with
probability p(step); a dropped layer runs `linear_only` for that step, so the linear branch has to
carry the prediction on its own. p is a schedule over the fraction of training (e.g. 0.9 -> 0.75 ->
0.5); a second schedule may change the window size.

Every decision is a pure function of (seed, global_step, layer[, micro-batch]): the generator is
seeded from a hash of those numbers. Resuming from a checkpoint therefore replays exactly the same
decisions (the Trainer restores `global_step`), and all distributed ranks agree without talking to
each other (which DDP needs: a layer running `linear_only` leaves its window logits unused).

What SSD changes is active only between `on_step_begin` and `on_step_end`: evaluation, saving and
everything after training see the model's own modes and window.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from ..layers import HybridMixer
from ..modeling import iter_hybrid_attention, mixers_of

GRANULARITIES = ("layer", "model", "sample")
#: The paper's drop schedule: 0.9 for the first third of training, then 0.75, then 0.5.
PAPER_STAGES = ((0.0, 0.9), (1.0 / 3.0, 0.75), (2.0 / 3.0, 0.5))


@dataclass(frozen=True)
class Schedule:
    """A value as a function of the fraction of training done, f = global_step / max_steps.

    kind "stages": piecewise constant; the value of the last point whose start is <= f.
    kind "linear": linear interpolation between the points, constant outside them."""

    kind: str
    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if self.kind not in ("stages", "linear"):
            raise ValueError(f"Schedule.kind must be 'stages' or 'linear', got {self.kind!r}")
        pts = tuple((float(s), float(v)) for s, v in self.points)
        if not pts:
            raise ValueError("Schedule.points: expected at least one (start_fraction, value) pair")
        starts = [s for s, _ in pts]
        if starts != sorted(starts) or len(set(starts)) != len(starts) or not (0.0 <= starts[0] and starts[-1] <= 1.0):
            raise ValueError(f"Schedule.points: starts must be strictly increasing fractions in [0, 1], got {starts}")
        if self.kind == "stages" and starts[0] != 0.0:
            raise ValueError(f"Schedule.points: the first stage must start at 0, got {starts[0]}")
        object.__setattr__(self, "points", pts)

    @classmethod
    def stages(cls, points: Sequence[tuple[float, float]] = PAPER_STAGES) -> Schedule:
        return cls("stages", tuple(points))

    @classmethod
    def linear(cls, start: float, end: float) -> Schedule:
        return cls("linear", ((0.0, start), (1.0, end)))

    @classmethod
    def constant(cls, value: float) -> Schedule:
        return cls("stages", ((0.0, value),))

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """'0.5' (constant), 'stages:0.9,0.75,0.5' (equal stages), 'stages:0=0.9,0.5=0.5' (explicit
        starts) or 'linear:0.9,0.5' (from 0.9 at the start to 0.5 at the end)."""
        try:
            if ":" not in spec:
                return cls.constant(float(spec))
            kind, rest = spec.split(":", 1)
            items = [x for x in rest.split(",") if x.strip()]
            if kind == "linear":
                if all("=" in x for x in items):
                    return cls("linear", tuple(tuple(map(float, x.split("="))) for x in items))
                a, b = map(float, items)
                return cls.linear(a, b)
            if kind == "stages":
                if all("=" in x for x in items):
                    return cls("stages", tuple(tuple(map(float, x.split("="))) for x in items))
                return cls("stages", tuple((i / len(items), float(v)) for i, v in enumerate(items)))
        except ValueError as e:
            if "Schedule" in str(e):
                raise
        raise ValueError(
            f"schedule: cannot parse {spec!r}; expected '0.5', 'stages:0.9,0.75,0.5', "
            "'stages:0=0.9,0.5=0.5' or 'linear:0.9,0.5'"
        )

    def __call__(self, fraction: float) -> float:
        starts = [s for s, _ in self.points]
        if self.kind == "stages":
            return self.points[max(bisect.bisect_right(starts, fraction) - 1, 0)][1]
        if fraction <= starts[0]:
            return self.points[0][1]
        if fraction >= starts[-1]:
            return self.points[-1][1]
        i = bisect.bisect_right(starts, fraction)
        (s0, v0), (s1, v1) = self.points[i - 1], self.points[i]
        return v0 + (v1 - v0) * (fraction - s0) / (s1 - s0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "points": [list(p) for p in self.points]}

    def describe(self) -> str:
        return f"{self.kind}:" + ",".join(f"{s:g}={v:g}" for s, v in self.points)


def training_fraction(global_step: int, max_steps: int) -> float:
    return global_step / max_steps if max_steps > 0 else 0.0


def decision_generator(seed: int, step: int, layer: int, micro: int = 0) -> torch.Generator:
    """A CPU generator seeded from a stable hash of (seed, step, layer, micro)."""
    digest = hashlib.blake2b(f"ssd:{seed}:{step}:{layer}:{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def drop_decisions(
    seed: int, step: int, layers: Sequence[int], p: float, granularity: str = "layer"
) -> dict[int, bool]:
    """Which layers drop their window branch at `step` (layer / model granularity)."""
    if granularity == "model":
        drop = bool(torch.rand((), generator=decision_generator(seed, step, -1)) < p)
        return {i: drop for i in layers}
    if granularity == "layer":
        return {i: bool(torch.rand((), generator=decision_generator(seed, step, i)) < p) for i in layers}
    raise ValueError(f"granularity: expected 'layer' or 'model' here, got {granularity!r}")


def drop_rows(seed: int, step: int, layer: int, micro: int, batch_size: int, p: float) -> torch.Tensor:
    """Rows [batch_size] of micro-batch `micro` that drop the window in `layer` (sample granularity)."""
    return torch.rand(batch_size, generator=decision_generator(seed, step, layer, micro)) < p


def _batch_size(args, kwargs) -> int:
    for name in ("input_ids", "inputs_embeds"):
        t = kwargs.get(name)
        if t is not None:
            return int(t.shape[0])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[0])
    raise ValueError("SSDCallback(granularity='sample'): cannot find the batch size (no input_ids / inputs_embeds)")


class SSDCallback(TrainerCallback):
    """Scheduled Sliding-window Dropout for `transformers.Trainer`.

    Args:
        drop_schedule: p(fraction of training), the probability that a layer drops its window
            branch at a step; default the paper's stages 0.9 -> 0.75 -> 0.5.
        window_schedule: optional window size over training (values rounded to integers).
        granularity: "layer" (each layer independently), "model" (all layers together) or
            "sample" (each batch row independently, per layer; rows of different micro-batches of one
            optimizer step draw separately).
        seed: the decisions are a pure function of (seed, global_step, layer, micro-batch).
        record: keep `history` (step -> decisions), for tests and audits.
    """

    def __init__(
        self,
        drop_schedule: Schedule | None = None,
        window_schedule: Schedule | None = None,
        granularity: str = "layer",
        seed: int = 0,
        record: bool = False,
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
        self.drop_schedule = drop_schedule if drop_schedule is not None else Schedule.stages()
        for s, v in self.drop_schedule.points:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"drop_schedule: probabilities must lie in [0, 1], got {v} at {s}")
        if window_schedule is not None and any(v < 1 for _, v in window_schedule.points):
            raise ValueError(f"window_schedule: windows must be >= 1, got {window_schedule.describe()}")
        self.window_schedule = window_schedule
        self.granularity, self.seed, self.record = granularity, int(seed), record
        self.history: dict[int, dict] = {}
        self.current_p: float | None = None
        self.current_window: int | None = None
        self._layers: list[tuple[int, list[HybridMixer]]] = []
        self._base: dict[int, tuple[str, int]] = {}
        self._hook = None
        self._active_step: int | None = None
        self._micro = 0

    # -- the schedule at a step (pure) ----------------------------------------------------------
    def probability_at(self, global_step: int, max_steps: int) -> float:
        return float(self.drop_schedule(training_fraction(global_step, max_steps)))

    def window_at(self, global_step: int, max_steps: int) -> int | None:
        if self.window_schedule is None:
            return None
        return max(1, int(round(self.window_schedule(training_fraction(global_step, max_steps)))))

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach(model)

    def _attach(self, model) -> None:
        self._layers = [(i, mixers_of(a)) for i, a in iter_hybrid_attention(model)]
        if not self._layers:
            raise ValueError("SSDCallback: the model has no converted (hybrid) attention layers")
        self._base = {i: (ms[0].mode, ms[0].window) for i, ms in self._layers}
        if self.granularity == "sample" and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self._layers:
            self._attach(model)
        step = state.global_step
        p = self.probability_at(step, state.max_steps)
        window = self.window_at(step, state.max_steps)
        self.current_p, self.current_window = p, window
        if window is not None:
            for _, mixers in self._layers:
                for m in mixers:
                    m.window = window
        entry: dict = {"p": p, "window": window}
        if self.granularity == "sample":
            self._active_step, self._micro = step, 0
            entry["rows"] = {}
        else:
            decisions = drop_decisions(self.seed, step, [i for i, _ in self._layers], p, self.granularity)
            for i, mixers in self._layers:
                if decisions[i] and self._base[i][0] == "hybrid":
                    for m in mixers:
                        m.mode = "linear_only"
            entry["drop"] = decisions
        if self.record:
            self.history[step] = entry

    def _pre_forward(self, module, args, kwargs):
        if self._active_step is None:  # evaluation / outside a training step: no dropout
            return None
        batch = _batch_size(args, kwargs)
        micro = self._micro
        self._micro += 1
        for i, mixers in self._layers:
            if self._base[i][0] != "hybrid":
                continue
            rows = drop_rows(self.seed, self._active_step, i, micro, batch, self.current_p)
            for m in mixers:
                m.swa_drop = rows
            if self.record:
                self.history[self._active_step]["rows"][(i, micro)] = rows.tolist()
        return None

    def on_step_end(self, args, state, control, **kwargs):
        self._restore()

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.current_p is None:
            return
        extra = {"ssd_drop_p": self.current_p}
        if self.current_window is not None:
            extra["ssd_window"] = self.current_window
        if logs is not None and ("loss" in logs or "train_loss" in logs):
            logs.update(extra)
            # the Trainer appends a copy of `logs` to log_history before calling us
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

    def _restore(self) -> None:
        self._active_step = None
        for i, mixers in self._layers:
            mode, window = self._base[i]
            for m in mixers:
                m.mode, m.window, m.swa_drop = mode, window, None
