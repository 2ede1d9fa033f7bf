"""Data-parallel training over :mod:`torch.distributed` (``torchrun``; gloo on CPU, NCCL on CUDA).

Every process (rank) builds the same model from the same seed and runs the same negative sampler, so all
ranks draw the same *global* batches as a single-process run; rank ``r`` of ``W`` trains on rows
``[n r / W, n (r + 1) / W)`` of each. After the backward pass every gradient is scaled by the rank's share
of the rows and summed over the ranks (``all_reduce``), so all ranks take the same optimiser step with the
gradient of the mean loss over the global batch. That is exact for losses that are means over the batch
rows (BPR); terms that couple the rows of a batch (unsquared norms of the whole batch, in-batch negatives of
contrastive losses) are computed on each rank's rows and averaged, an approximation of the global term.

The model's hooks (``before_epoch``, ``after_epoch``, ``before_evaluation``; e.g. DGMRec's generation of
missing features, its graph refresh and its CLUB estimator steps, which draw random numbers) run on every
rank, each starting from rank 0's random state: with identical parameters they compute identical results.
After every evaluation the ranks compare a checksum of their parameters and buffers; should they ever differ
(a kernel that is not deterministic), rank 0's values are broadcast, with a warning.

Rank 0 evaluates (the other ranks wait), writes the run directory (``log.jsonl``, ``checkpoint.pt``,
``best.pt``, ``results.json``) and broadcasts the evaluation and the early-stopping state. A resumed run
reads ``checkpoint.pt`` on rank 0 and sends it to the others, so the run directory need not be shared between
machines; checkpoints are the same as a single-process run's (a run may resume with another number of
processes). Launch: ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dgmrec.data.dataset import RecDataset
from dgmrec.data.spec import DatasetSpec
from dgmrec.errors import ConfigError, InputError
from dgmrec.models.base import Batch, Recommender
from dgmrec.training.trainer import Trainer, TrainResult

_HOOKS = ("before_epoch", "after_epoch", "before_evaluation")


def launched() -> bool:
    """True in a process started by ``torchrun`` (or any launcher that sets the ``env://`` variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def active() -> bool:
    """True once this process belongs to a process group."""
    return dist.is_available() and dist.is_initialized()


def join(device: torch.device) -> tuple[torch.device, bool]:
    """Join the ``env://`` process group when launched by torchrun; returns this rank's device and whether a
    group was created here.

    CUDA devices use NCCL and the GPU ``LOCAL_RANK`` of the node; the CPU uses gloo. Outside torchrun, and when
    a group already exists, nothing is joined.
    """
    if launched() and device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if launched() and not active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device, True
    return device, False


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """:func:`join` for the duration of the block (the group is destroyed at its end if it was created here)."""
    device, created = join(device)
    try:
        yield device
    finally:
        if created and active():
            dist.destroy_process_group()


class DistributedTrainer(Trainer):
    """A :class:`Trainer` for one rank of a process group (see the module documentation).

    Built like a :class:`Trainer`, after :func:`join` (or ``init_process_group``), with the same ``out_dir``
    on every rank; only rank 0 writes it (the others write their logs to a temporary directory).
    """

    def __init__(self, model: Recommender, dataset: RecDataset, config: Mapping[str, Any], out_dir: str | Path, *,
                 spec: DatasetSpec | None = None, run_info: Mapping[str, Any] | None = None,
                 progress: bool = True) -> None:
        if not active():
            raise RuntimeError("DistributedTrainer needs a process group (dgmrec.training.distributed.join)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(out_dir)
        self._scratch = tempfile.TemporaryDirectory(prefix=f"dgmrec-rank{self.rank}-") if self.rank else None
        super().__init__(model, dataset, config, self._scratch.name if self._scratch else out_dir, spec=spec,
                         run_info={**(run_info or {}), "world_size": self.world_size},
                         progress=progress and self.rank == 0)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._share = 1.0  # this rank's share of the rows of the current global batch
        self._broadcast_state()
        for name in _HOOKS:  # every hook starts from rank 0's random state
            setattr(model, name, functools.partial(self._synchronised, getattr(model, name)))

    # --------------------------------------------------------------------------- communication
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device the backend communicates from (NCCL: the GPU; gloo: the CPU)."""
        return t.to(self.device) if dist.get_backend() == "nccl" else t.cpu()

    def _broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _synchronised(self, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._sync_rng()
        return hook(*args, **kwargs)

    def _sync_rng(self) -> None:
        state = self._comm(torch.get_rng_state())
        dist.broadcast(state, src=0)
        torch.set_rng_state(state.cpu())
        if self.device.type == "cuda":
            cuda_state = self._comm(torch.cuda.get_rng_state(self.device))
            dist.broadcast(cuda_state, src=0)
            torch.cuda.set_rng_state(cuda_state.cpu(), self.device)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]

    def _broadcast_state(self) -> None:
        with torch.no_grad():
            for t in self._state_tensors():
                c = self._comm(t.data)
                dist.broadcast(c, src=0)
                if c is not t.data:
                    t.data.copy_(c)

    def state_digests(self) -> list[str]:
        """Every rank's digest of its parameters and buffers (equal when the ranks are in step)."""
        h = hashlib.sha1()
        for t in self._state_tensors():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, h.hexdigest())
        return [str(d) for d in digests]

    # ------------------------------------------------------------------------------ the steps
    def batches(self) -> Iterator[Batch]:
        """This rank's rows of every global batch (a rank left without rows trains on one row with weight 0)."""
        for batch in super().batches():
            n = len(batch.users)
            lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
            self._share = (hi - lo) / n
            if hi == lo:
                lo, hi = 0, 1
            yield Batch(batch.users[lo:hi], batch.pos[lo:hi], batch.neg[lo:hi])

    def reduce_gradients(self) -> None:
        """Sum over the ranks of the gradients scaled by each rank's share of the batch rows."""
        has = torch.tensor([p.grad is not None for p in self._params], dtype=torch.float32)
        has = self._comm(has)
        dist.all_reduce(has)
        pending = []
        for p, flag in zip(self._params, has.tolist(), strict=True):
            if not flag:
                continue  # no rank has a gradient: the parameter is skipped by the optimiser, as in one process
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(self._share)
            pending.append(dist.all_reduce(p.grad, async_op=True))
        for work in pending:
            work.wait()

    def reduce_totals(self, totals: dict[str, float], n_batches: int) -> tuple[dict[str, float], int]:
        keys = sorted(totals)
        if self._broadcast_object(keys) != keys:
            raise RuntimeError("the ranks logged different loss parts")
        sums = self._comm(torch.tensor([*(totals[k] for k in keys), n_batches], dtype=torch.float64))
        dist.all_reduce(sums)
        values = sums.tolist()
        return dict(zip(keys, values[:-1], strict=True)), round(values[-1])

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Rank 0 evaluates; every rank runs ``before_evaluation`` and receives the result and stopper state."""
        if self.rank == 0:
            out = super().evaluate(epoch)
        else:
            self.model.eval()
            self.model.before_evaluation(epoch)
            out = None
        out, stopper, best = self._broadcast_object((out, self.stopper.state(), self.best_eval))
        self.stopper.load(stopper)
        self.best_eval = best
        digests = self.state_digests()
        if len(set(digests)) > 1:
            warnings.warn(f"epoch {epoch}: the ranks' parameters drifted apart; continuing from rank 0's",
                          RuntimeWarning, stacklevel=2)
            self._broadcast_state()
        return out

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            super().save_checkpoint()

    def write_results(self) -> dict[str, Any]:
        return super().write_results() if self.rank == 0 else self.results()

    def restore(self, path: str | Path | None = None) -> None:
        """Rank 0 reads the checkpoint (default: the run directory's) and sends it to every rank."""
        ckpt = Path(path) if path is not None else self.run_dir / "checkpoint.pt"
        payload = ckpt.read_bytes() if self.rank == 0 and ckpt.is_file() else None
        payload = self._broadcast_object(payload)
        if payload is None:
            raise ConfigError(f"nothing to resume: no checkpoint.pt in {ckpt.parent}", source="--resume")
        if self.rank == 0:
            super().restore(ckpt)
            return
        local = self.checkpoint_path  # in this rank's temporary directory
        local.write_bytes(payload)
        super().restore(local)

    def fit(self, resume: bool = False, stop: Callable[[], bool] | None = None) -> TrainResult:
        if stop is not None:  # the ranks would have to agree on stopping in the same epoch
            raise InputError("a stop callback is not supported in data-parallel training", source="stop")
        try:
            return super().fit(resume)
        finally:
            self.close()

    def close(self) -> None:
        """Give the model its own hooks back and remove this rank's temporary directory."""
        for name in _HOOKS:
            self.model.__dict__.pop(name, None)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
