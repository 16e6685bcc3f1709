"""The optimizer step of the training loop: compilation, the non-finite guard, phase timing.

- :func:`compile_student`: one graph for the whole student forward and loss where it runs alone,
  one graph per block under DDP and FSDP2 (``fully_shard`` wraps each block).
- :class:`NonFiniteGuard`: a non-finite loss or gradient norm is found on the device and the
  update skipped there (fused AdamW's ``found_inf``); the host reads the flags only when it looks
  anyway (log lines, checkpoints, evaluations, the end), so the step never waits for the GPU.
- :func:`phase`: named regions of a step (tokenizer, student forward + loss, backward, clip +
  optimizer), timed with CUDA events while a :class:`PhaseTimer` is active (the benchmark's
  profiler); a no-op otherwise.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from .distributed import all_reduce, blocks_of

PHASES = ("tokenizer", "student forward + loss", "backward", "clip + optimizer")


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite, on any rank."""


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------
def compile_student(model: nn.Module, parallel: str, **options) -> str:
    """Compile the whole student (forward and loss: one graph, so residual adds fuse with the next
    norm and the glue is compiled) when it runs alone; under DDP and FSDP2 the blocks were compiled
    one by one by :func:`~beitv2_fast.train.distributed.parallelize`, and nothing is done here.
    Returns what was done, for the log."""
    if parallel != "none":
        return f"torch.compile per block ({len(blocks_of(model))} blocks; {parallel} wraps each block)"
    model.compile(fullgraph=True, **options)
    graphs = ", replayed as CUDA graphs" if options.get("mode") == "reduce-overhead" else ""
    return f"torch.compile of the whole student forward and loss (one graph{graphs})"


def cuda_graph_mode(requested: bool, parallel: str) -> str | None:
    """The ``torch.compile`` mode for ``--cuda-graphs``: ``reduce-overhead`` (inductor records each
    compiled graph, forward and backward, after its warm-up runs, so the Triton autotuners have
    chosen their configurations first, and replays it), or None. Not with DDP or FSDP2, whose
    collectives between the per-block graphs the recording cannot hold: the run says so and goes on
    without graphs."""
    if not requested:
        return None
    if parallel != "none":
        from .metrics import log

        log.warning("--cuda-graphs: not with %s (collectives between the block graphs); running without", parallel)
        return None
    return "reduce-overhead"


def begin_graphed_step(mode: str | None) -> None:
    """Tell the CUDA graph trees that a new micro-batch starts: the outputs of the last one's graphs,
    consumed by now, may be overwritten."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def compiled_frames() -> tuple[int, int]:
    """(frames compiled, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


# --------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------
class NonFiniteGuard:
    """Skips the update of a non-finite step on the device, and reports it from the host later.

    Args:
        mode: ``"stop"``: the first non-finite step ends the run; from that step on no update
            is applied (the flag is read a few steps later, and those steps must not change the
            weights either), and :meth:`check` raises :class:`NonFiniteError` naming it.
            ``"skip"``: each non-finite step's update is skipped and named in a warning.
        rank: this process's rank, for the message.
    """

    def __init__(self, mode: str, device: torch.device, rank: int = 0):
        self.mode, self.rank = mode, rank
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        scaler: torch.amp.GradScaler | None = None,
        *,
        deferred: bool = True,
    ) -> torch.Tensor:
        """Apply the update unless the step is non-finite on any rank; return whether it was
        applied (a 0-d bool tensor). ``deferred``: decide on the device through the optimizer's
        ``found_inf`` (fused AdamW only; no host synchronisation); otherwise read the flag here.
        With a gradient scaler a non-finite gradient is the scaler's business, a non-finite loss ours."""
        finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | (scaler is not None))
        # One flag for every rank: all ranks apply, skip or stop at the same steps.
        finite = all_reduce(finite.to(torch.int32), op=torch.distributed.ReduceOp.MIN).bool()
        if self.mode == "stop":
            self.halted |= ~finite
            skip = self.halted
        else:
            skip = ~finite
        self.pending.append((step, finite, loss.detach().float(), grad_norm.detach().float()))
        if deferred:
            if scaler is not None or not optimizer.defaults.get("fused"):
                raise ValueError("a deferred non-finite check needs a fused optimizer and no gradient scaler")
            optimizer.found_inf = skip.float()
            optimizer.step()
            optimizer.found_inf = None
            return ~skip
        if not bool(skip):
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaler is not None:
            scaler.update()
        self.check()
        return ~skip

    def check(self) -> None:
        """Read the flags of the steps since the last check (one host synchronisation): warn for
        each skipped step, or raise :class:`NonFiniteError` for the first non-finite one."""
        if not self.pending:
            return
        steps = [entry[0] for entry in self.pending]
        finite, losses, norms = (torch.stack([entry[i] for entry in self.pending]).tolist() for i in (1, 2, 3))
        self.pending = []
        for step, ok, loss, norm in zip(steps, finite, losses, norms, strict=True):
            if ok:
                continue
            if self.mode == "stop":
                raise NonFiniteError(
                    f"step {step}: non-finite loss or gradient norm on at least one rank (rank {self.rank}: loss "
                    f"{loss:.4g}, gradient norm {norm:.4g}); stopping every rank before the update. "
                    "The last checkpoint is intact; use --nonfinite skip to skip such steps instead."
                )
            from .metrics import log

            log.warning("step %d: non-finite loss or gradient norm; skipping the update", step)


def uses_deferred_check(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> bool:
    """The update can be skipped on the device: a fused optimizer (``found_inf``) and no scaler."""
    return scaler is None and bool(optimizer.defaults.get("fused"))


# --------------------------------------------------------------------------------------------
# Phase timing
# --------------------------------------------------------------------------------------------
class PhaseTimer:
    """Times the :func:`phase` regions of the steps run while it is active: CUDA events on a GPU
    (no synchronisation until :meth:`milliseconds`), the host clock on the CPU."""

    active: PhaseTimer | None = None

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    def __enter__(self) -> PhaseTimer:
        PhaseTimer.active = self
        return self

    def __exit__(self, *exc) -> None:
        PhaseTimer.active = None

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def milliseconds(self) -> dict[str, float]:
        """Total time of each phase over the steps timed (synchronises the GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, start, end in self.marks:
            elapsed = start.elapsed_time(end) if self.cuda else 1e3 * (end - start)
            totals[name] = totals.get(name, 0.0) + elapsed
        return totals


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named region of the step, timed when a :class:`PhaseTimer` is active."""
    timer = PhaseTimer.active
    if timer is None:
        yield
        return
    start = timer.mark()
    yield
    timer.marks.append((name, start, timer.mark()))
