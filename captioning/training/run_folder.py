"""The run folder of 01_train.py: refusing to replace a run silently, tidying what killed runs left,
saving the resumable checkpoint, and Ctrl-C (save after this step, then exit).

Trainer inherits RunFolder's methods; they use its attributes (config, out_dir, state, log and the
models, optimiser, scheduler, scaler and ema that a checkpoint holds).
"""
import contextlib
import os
import signal
import sys

import utils
from captioning import checkpoint


def check_run_folder(config):
    """A new run must not silently replace a run in its folder: its resumable checkpoint could be
    the one a Ctrl-C told the user to --resume."""
    out = config['out_dir']
    found = sorted(f for f in (os.listdir(out) if os.path.isdir(out) else [])
                   if f.endswith('.pt') and (f.startswith('checkpoint_') or f.startswith('BEST_checkpoint_')))
    if found and not config.get('overwrite'):
        resumable = [f for f in found if f.startswith('checkpoint_')]
        offer = f'continue it with --resume {os.path.join(out, resumable[0])}, ' if resumable else ''
        raise ValueError(f'{out} already holds a run ({", ".join(found)}): {offer}pass --overwrite to replace it, '
                         'or choose another --out-dir')
    return found


class RunFolder:
    """Trainer's _tidy_run_folder and save."""

    def _tidy_run_folder(self, resume_ckpt):
        """Remove what killed runs left (checkpoint temp files); a new --overwrite run removes the old
        run's checkpoints and logs; a resumed run drops log lines past its checkpoint (steps a kill
        made it lose, which it now trains again), so no step or epoch is logged twice."""
        freed = utils.remove_stale_temp(self.out_dir)
        if freed:
            self.log(f'removed {utils.format_size(freed)} of temporary files left by a killed run in {self.out_dir}')
        if resume_ckpt is None:
            for f in check_run_folder(self.config) + ['steps.jsonl', 'metrics.jsonl']:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out_dir, f))
            return
        utils.truncate_jsonl(os.path.join(self.out_dir, 'steps.jsonl'), lambda r: r.get('step', 0) <= self.state['step'])
        utils.truncate_jsonl(os.path.join(self.out_dir, 'metrics.jsonl'),
                             lambda r: r.get('epoch', 0) < self.state['epoch'])

    def save(self, path, val_metrics=None):
        if self.main:
            checkpoint.save_checkpoint(path, {
                'format': checkpoint.FORMAT, 'config': self.config, 'word_map': self.word_map,
                'encoder': self.encoder.state_dict(), 'decoder': self.decoder.state_dict(),
                'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'scaler': self.scaler.state_dict() if self.scaler.is_enabled() else None,
                'decoder_ema': self.ema.module.state_dict() if self.ema else None,
                'decoder_ema_state': self.ema.state_dict() if self.ema else None,
                'val_metrics': val_metrics, 'rng': utils.get_rng_state(),
                'endings': {w: list(c) for w, c in self.endings().items() if w in self.word_map}, **self.state})


class Stopper:
    """First Ctrl-C: finish the current step, save, exit. Second Ctrl-C: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._pid = os.getpid()
        with contextlib.suppress(ValueError):   # not the main thread: no handler
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:   # a forked DataLoader worker inherited the handler: the parent speaks
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print('\nCtrl-C: saving a resumable checkpoint after this step (Ctrl-C again to abort) ...',
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
