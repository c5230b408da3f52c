"""Stop training cleanly on the signals a scheduler sends before it kills a job.

SLURM sends SIGTERM to a job it preempts or cancels (and ``--signal=<sig>@<s>`` before the time limit:
SIGUSR2 under kdlab's submitit launcher, SIGUSR1 is the other common choice). While
:class:`StopSignals` is active, these signals only set a flag; the trainer finishes the optimizer step it
is in, writes a checkpoint of it and raises :class:`Stopped`, which ``kdlab.run`` turns into one line
and exit status 128 + the signal's number. A handler that was there before (submitit's: requeue on
SIGUSR2, log and continue on SIGTERM) is called then, after the checkpoint, instead of mid-step.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Stopped(Exception):
    """Training stopped at a step boundary after a signal; the checkpoint of that step is written."""

    def __init__(self, signum: int, step: int, previous):
        self.signum, self.step, self.previous = signum, step, previous
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, checkpoint written; run "
                         f"the same command again to resume")

    def chain(self) -> None:
        """Call the handler the signal had before kdlab's (submitit's), as if it had arrived now."""
        if callable(self.previous):
            self.previous(self.signum, None)


class StopSignals:
    """Context manager: while active, :data:`SIGNALS` are recorded instead of acted on.

    Only the main thread can install handlers; elsewhere (a test calling ``fit`` from a thread) it does
    nothing and the signals keep their handlers.
    """

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
        if kind is None and self.signum:   # came after the last step's check: deliver it as if now
            signal.raise_signal(self.signum)

    def requested(self, device) -> int:
        """The signal to stop on (0: none), the same on every rank: a rank the scheduler signalled a
        step later than another would otherwise miss the checkpoint's collectives."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def stop(self, signum: int, step: int) -> Stopped:
        """The stop this signal asks for; it is consumed here (``Stopped.chain`` delivers it, not ``__exit__``)."""
        self.signum = 0
        return Stopped(signum, step, self.previous.get(signum))
