"""Run by torchrun in test_distributed.py: train like 01_train.py, then each rank saves its decoder."""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from captioning.scale import sharding  # noqa: E402

if __name__ == '__main__':
    dump, argv = sys.argv[1], sys.argv[2:]
    rank, world, device = utils.init_distributed('cpu')
    trainer = importlib.import_module('01_train').Trainer(argv, rank, world, device)
    trainer.run()
    torch.save(trainer.decoder.state_dict(), os.path.join(dump, f'rank{rank}.pt'))
    sharding.barrier()
    # Both ranks have saved: leave without the C++ teardown, where gloo's threads sometimes abort a rank
    # ("terminate called without an active exception", about 1 run in 10 here) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
