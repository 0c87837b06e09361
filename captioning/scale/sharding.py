"""Work shared out over torchrun processes: each rank's share of a list (in whole batches), the
coordination between ranks (a gloo group that waits as long as the slowest rank needs), and the
frozen encoder's feature cache encoded by every rank into the one file.

Under torchrun (utils.init_distributed: gloo on CPU, NCCL on GPUs, one device per rank) a share is
a contiguous run of whole batches of the single-process order, so every rank sees exactly the
batches one process would see: its results are the same numbers, not merely close ones.
Nothing here does work at import time.
"""
import contextlib
import datetime
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import utils

WAIT = datetime.timedelta(days=7)   # a rank that finished its share waits this long for the slowest
_GROUP = []                          # the coordination group, made once per process group


def batch_share(n, rank, world, batch_size):
    """(start, stop) of rank's share of n items: contiguous whole batches of `batch_size` (the last
    batch may be short), as evenly as batches allow; ranks with no batch get an empty range."""
    batches = -(-n // batch_size)
    base, extra = divmod(batches, world)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return min(first * batch_size, n), min(last * batch_size, n)


def _group():
    """A gloo group over all ranks with a long timeout (a plain barrier on the default group gives
    up after its 10-30 minutes, and a resumed run's ranks may finish hours apart)."""
    if not utils.is_distributed():
        return None
    if not _GROUP:
        _GROUP.append(dist.new_group(backend='gloo', timeout=WAIT))
    return _GROUP[0]


def barrier():
    """Wait for every rank (no-op in one process)."""
    group = _group()
    if group is not None:
        dist.barrier(group=group)


def any_rank(flag):
    """True on every rank when `flag` is true on any rank (a failure seen by one is seen by all)."""
    group = _group()
    if group is None:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    group = _group()
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather(obj):
    """[every rank's obj] in rank order on rank 0; None on the others."""
    group = _group()
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


# ----------------------------------------------------------------------------------------------
# The feature cache, encoded by every rank

def feature_caches(encoder, folder, name, transform, device, rank=0, world=1, workers=0, log=print):
    """{'TRAIN': FeatureCache, 'VAL': FeatureCache} of prepared data (01_train.py): each found, or
    built by ensure_feature_cache (every process its share)."""
    import datasets
    caches = {}
    for split in ('TRAIN', 'VAL'):
        ds = datasets.CaptionDataset(folder, name, split, transform, per_image=True)
        path = datasets.feature_cache_path(ds, encoder)
        caches[split] = ensure_feature_cache(encoder, ds, path, device, rank, world, batch_size=32, workers=workers,
                                             log=log)
    return caches


def ensure_feature_cache(encoder, dataset, path, device, rank=0, world=1, batch_size=32, workers=0, log=print):
    """The FeatureCache of `dataset` at `path`, built first when missing: by one process as
    datasets.build_feature_cache does, or under torchrun by every rank at once, each encoding its
    share of whole batches into the one file (rank 0 allocates it and renames it into place when
    all are done). The file is byte-identical to the single-process one: the same batches go
    through the same encoder, and the same .npy header is written."""
    import datasets
    missing = broadcast(not os.path.exists(path))   # one decision for all ranks
    if missing:
        log(f'caching {dataset.split} features of {dataset.num_images} images with the frozen {encoder.name} '
            f"{f'on {world} processes ' if world > 1 else ''}-> {path}")
        if world == 1:
            datasets.build_feature_cache(encoder, dataset, path, device, batch_size=batch_size, workers=workers)
        else:
            _build_shared(encoder, dataset, path, device, rank, world, batch_size, workers)
    barrier()
    return datasets.FeatureCache(path)


@torch.inference_mode()
def _build_shared(encoder, dataset, path, device, rank, world, batch_size, workers):
    from torch.utils.data import DataLoader, Subset

    import datasets
    folder = os.path.dirname(os.path.abspath(path))
    encoder.eval()
    tmp, error = None, None
    if rank == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            utils.remove_stale_temp(folder)
            tmp = _allocate_cache(encoder, dataset, path, folder, device)
        except OSError as e:
            error = utils.describe_error(e)
    tmp, error = broadcast((tmp, error))
    if error:
        raise OSError(error)
    failed = None
    try:
        start, stop = batch_share(dataset.num_images, rank, world, batch_size)
        loader = DataLoader(Subset(datasets._Images(dataset), range(start, stop)), batch_size=batch_size,
                            num_workers=workers, pin_memory=device.type == 'cuda', generator=torch.Generator())
        out = np.load(tmp, mmap_mode='r+')
        i, last, began = start, time.time(), time.time()
        for images in loader:
            feats = encoder.features(images.to(device, non_blocking=True))   # [B, C, h, w]
            out[i:i + len(feats)] = feats.half().cpu().numpy()
            i += len(feats)
            if rank == 0 and time.time() - last >= datasets.PROGRESS_SECONDS:
                last = time.time()
                print(f'caching {dataset.split} features: rank 0 at {i - start}/{stop - start} images of its share, '
                      f'{last - began:.0f} s', flush=True)
        out.flush()
        del out
    except (OSError, RuntimeError, ValueError) as e:
        failed = f'rank {rank}: {utils.describe_error(e)}'
    failures = gather(failed)
    if rank == 0:
        problems = [f for f in failures if f]
        if problems:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        else:
            os.chmod(tmp, 0o666 & ~utils._umask())
            os.replace(tmp, path)
        failed = '; '.join(problems) or None
    failed = broadcast(failed)
    if failed:
        raise RuntimeError(f'feature caching failed ({failed})')


def _allocate_cache(encoder, dataset, path, folder, device):
    """Rank 0: write the .npy header and give the file its blocks; -> the temporary path (renamed
    to `path` once every rank has written its rows). The feature shape comes from the first image."""
    shape = (dataset.num_images, *encoder.features(dataset.image(0).unsqueeze(0).to(device)).shape[1:])
    utils.check_free_space(folder, int(np.prod(shape)) * 2 + 4096, f'the {dataset.split} feature cache')
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.shards.tmp')
    try:
        out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float16, shape=shape)
        del out
        utils.allocate_blocks(tmp)
    except OSError as e:   # numpy's own errors name no file
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, path) from None
    return tmp


def caption_paths(encoder, decoder, word_map, paths, beam_sizes, batch_size, workers, device, rank=0, world=1,
                  **beam_kw):
    """files.caption_paths shared out over torchrun ranks, each captioning its share (whole batches).
    -> on rank 0 (results, failures) of every image in the order of `paths`, results holding each
    beam size's 'words' (all one process needs to score them) and, where recorded, 'tags' and 'guided';
    (None, None) on the other ranks."""
    from captioning.decoding import files
    if world == 1:
        return files.caption_paths(encoder, decoder, word_map, paths, beam_sizes, batch_size, workers, device,
                                     **beam_kw)
    start, stop = batch_share(len(paths), rank, world, batch_size)
    results, failures = files.caption_paths(encoder, decoder, word_map, paths[start:stop], beam_sizes, batch_size,
                                              workers, device, progress=rank == 0, **beam_kw)
    words = [None if r is None else {k: {key: hyp[key] for key in ('words', 'tags', 'guided') if key in hyp}
                                     for k, hyp in r.items()} for r in results]
    shares = gather((words, failures))
    if rank != 0:
        return None, None
    return [r for share, _ in shares for r in share], [f for _, fails in shares for f in fails]
