"""Run by torchrun in test_sharded.py: build a split's feature cache with every rank encoding its share."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402
from captioning.scale import sharding  # noqa: E402

if __name__ == '__main__':
    folder, name, split, path, batch_size = sys.argv[1:6]
    rank, world, device = utils.init_distributed('cpu')
    torch.manual_seed(0)
    encoder = models.Encoder('resnet18', 'none', image_size=64).eval()
    ds = datasets.CaptionDataset(folder, name, split, datasets.image_transform(encoder), per_image=True)
    cache = sharding.ensure_feature_cache(encoder, ds, path, device, rank, world, batch_size=int(batch_size))
    assert len(cache) == ds.num_images
    sys.stdout.flush()
    os._exit(0)   # as ddp_worker.py: no C++ teardown of gloo after the work is done
