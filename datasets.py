"""What training, evaluation and inference read: images and their transforms, the data-only
readers of the prepared files, CaptionDataset and the feature cache.

The prepared files (one folder per set) are written by captioning/preparation/prepare.py (00_create_input_files.py) and
listed in its docstring; the source formats they come from are read by captioning/preparation/formats.py.
"""
import hashlib
import io
import json
import os
import pickle
import time

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

from utils import (SPLITS, SPECIAL_TOKENS, allocate_blocks, atomic_path, check_free_space, read_json, remove_stale_temp,
                   state_dict_digest)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


# ----------------------------------------------------------------------------------------------
# Images: one loader for preparation, training, evaluation and inference.

def load_image(path, size=None):
    """Open an image file as an RGB PIL image: EXIF orientation applied; grayscale, palette, RGBA
    (composited on white), CMYK and 16-bit images converted. With `size`, JPEGs are decoded at the
    smallest DCT scale that is still at least `size` pixels on each side (much faster, same result
    after resizing to `size`)."""
    img = Image.open(path)
    if size and img.format == 'JPEG':
        img.draft('RGB', (size, size))
    img = ImageOps.exif_transpose(img)
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if img.mode != 'F' and arr.max() > 255 else arr * (255.0 if arr.max() <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert('RGB') if img.mode != 'RGB' else img


def resized_uint8(path, size):
    """Image file -> uint8 array [3, size, size] (the tutorial's squash resize; HDF5 stores these)."""
    img = load_image(path, size).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class ImageTransform:
    """The one image transform: PIL image or uint8 tensor [3, H, W] -> normalised float [3, S, S].

    `size`, `mean` and `std` come from the encoder's weights (models.Encoder.transform_config()).
    Plain numpy and torch ops with the numerics of torchvision's v2 pil_to_tensor /
    resize(antialias=True) / normalize (tests compare them), so captioning does not import
    torchvision (1.3 s). A PIL image is normalised with numpy, which runs no OpenMP work: the web
    server decodes uploads in request threads, and a second thread starting torch's OpenMP team slows
    every later torch op in the process 2-2.5x on 2 cores (04_serve.py, docs/speed.md). The same
    float32 operations in the same order give the same bits as torch's.
    """

    def __init__(self, size, mean, std, crop=False):
        self.size, self.mean, self.std, self.crop = int(size), list(mean), list(std), crop

    def __call__(self, img):
        if isinstance(img, Image.Image):
            if self.crop and img.size != (self.size, self.size):   # shorter side to size, centre crop (antialiased)
                img = ImageOps.fit(img, (self.size, self.size), Image.BICUBIC)
            elif img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            x = np.asarray(img, dtype=np.float32) / np.float32(255.0)             # [S, S, 3]
            x -= np.asarray(self.mean, dtype=np.float32)
            x /= np.asarray(self.std, dtype=np.float32)
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))   # [3, S, S], contiguous
        if img.shape[-2:] != (self.size, self.size):
            # uint8 in, uint8 out, as torchvision resizes uint8 tensors (its AVX path rounds the same way)
            img = torch.nn.functional.interpolate(img.unsqueeze(0), size=[self.size, self.size], mode='bilinear',
                                                  align_corners=False, antialias=True).squeeze(0)
        x = img.float().div_(255.0)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def __repr__(self):
        return f'ImageTransform(size={self.size}, mean={self.mean}, std={self.std}, crop={self.crop})'


class PackedTransform:
    """Several encoders' transforms of one image, flattened and joined: [sum_i 3 * S_i * S_i]
    (an ensemble's input, unpacked by ensemble.EnsembleEncoder). Each transform resizes the source
    image itself; `size` (the largest) is what images are decoded at."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        self.size = max(t.size for t in self.transforms)

    def __call__(self, img):
        return torch.from_numpy(np.concatenate([t(img).reshape(-1).numpy() for t in self.transforms]))

    def __repr__(self):
        return f'PackedTransform({self.transforms})'


def image_transform(encoder):
    """The transform of an encoder's input: an ImageTransform from its weights' settings, or for an
    ensemble (ensemble.EnsembleEncoder: `members`) each member's, packed."""
    members = getattr(encoder, 'members', None)
    if members is not None:
        return PackedTransform([image_transform(e) for e in members])
    return ImageTransform(**encoder.transform_config())


def list_images(paths):
    """Image files from a file, a folder or a list of both, in the order given (folders: every
    jpg/jpeg/png/bmp/webp below them, any letter case, sorted; each file once).

    Only regular files are listed: a FIFO or device named .jpg would block the reader forever. A
    path given explicitly that is missing or not a regular file raises."""
    found, seen = [], set()
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            files = []
            for root, dirs, names in os.walk(path):   # does not follow symlinked folders: no loops
                dirs.sort()
                files += [os.path.join(root, f) for f in sorted(names)
                          if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))]
        elif os.path.isfile(path):
            files = [path]
        elif os.path.exists(path):
            raise ValueError(f'{path}: not a regular file or folder (a FIFO, socket or device cannot be captioned)')
        else:
            raise FileNotFoundError(f'no such image file or folder: {path}')
        for f in files:
            if f not in seen:
                seen.add(f)
                found.append(f)
    return found


class ImageFiles(Dataset):
    """Raw image files for inference. Item -> (tensor [3, S, S] or None, index, error message or '')."""

    def __init__(self, paths, transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(load_image(self.paths[i], self.transform.size)), i, ''
        except Exception as e:  # noqa: BLE001 - any undecodable file is reported, not fatal
            return None, i, f'{e.__class__.__name__}: {e}'


def collate_image_files(batch):
    """-> (images [B, 3, S, S] or None, indices of those images, [(index, error), ...] of the failures)."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    bad = [(i, err) for x, i, err in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


# ----------------------------------------------------------------------------------------------
# Reading prepared files: nothing read from a file may run code.

def check_complete_set(data_folder, data_name):
    """FileNotFoundError unless the word map that 00_create_input_files.py publishes last is there;
    split files without it are a set whose publishing was interrupted."""
    if os.path.exists(os.path.join(data_folder, f'WORDMAP_{data_name}.json')):
        return
    parts = [s for s in SPLITS for kind in ('CAPTIONS', 'paths')
             if os.path.exists(os.path.join(data_folder, f"{s}_{kind}_{data_name}.{'pkl' if kind == 'paths' else 'json'}"))]
    if parts:
        raise FileNotFoundError(f'{data_folder}: incomplete set {data_name} (split files without '
                                f'WORDMAP_{data_name}.json: 00_create_input_files.py was interrupted); re-run 00')
    raise FileNotFoundError(f'{data_folder}: no prepared dataset {data_name} (no WORDMAP_{data_name}.json): '
                            'run 00_create_input_files.py first, or check --data-folder/--data-name')


def split_sizes(data_folder, data_name):
    """{SPLIT: number of images} of a prepared set (a split whose file is missing or unreadable: 0)."""
    sizes = {}
    for split in SPLITS:
        try:
            sizes[split] = len(read_paths_pickle(os.path.join(data_folder, f'{split}_paths_{data_name}.pkl')))
        except (OSError, ValueError):
            sizes[split] = 0
    return sizes



class _Refused(pickle.UnpicklingError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds only pickle's own data types (list, str, int, ...): any class or function that a
    pickle names (the way `__reduce__` payloads run code) is refused."""

    def find_class(self, module, name):
        raise _Refused(f'it names {module}.{name}, and only a list of path strings is allowed')


def read_paths_pickle(path):
    """A prepared {SPLIT}_paths_*.pkl -> list of str, read without running anything the file names.
    Anything else (code, other types, a truncated or empty file) raises ValueError naming the file."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f'image paths file not found: {path} (run 00_create_input_files.py)') from None
    try:
        paths = _DataOnlyUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise ValueError(f'{path}: refused: not a plain image-path pickle ({e})') from None
    except Exception as e:  # noqa: BLE001 - truncated/garbled pickles fail in many ways; one line for all
        raise ValueError(f'{path}: not a readable image-path pickle (truncated or damaged: '
                         f'{e.__class__.__name__}); re-run 00_create_input_files.py') from None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        got = type(paths).__name__ if not isinstance(paths, list) else 'a list holding non-strings'
        raise ValueError(f'{path}: refused: expected a list of image path strings, got {got}')
    return paths


def caption_limits(folder, name):
    """What a new decoder may need to know of prepared data: the positions a caption takes (words +
    <end>; the non-autoregressive repeat_bilstm sizes itself by it)."""
    lengths = [n for split in ('TRAIN', 'VAL')
               for n in read_json(os.path.join(folder, f'{split}_CAPLENS_{name}.json'), 'caption lengths file')]
    return {'max_len': max(lengths) - 1}


def read_word_map(path):
    """A WORDMAP_*.json -> {word: id}, checked: an object of string keys and distinct integer ids
    holding the special tokens (ValueError naming the file otherwise)."""
    word_map = read_json(path, 'word map')
    if (not isinstance(word_map, dict) or not all(type(v) is int and v >= 0 for v in word_map.values())
            or len(set(word_map.values())) != len(word_map) or not set(SPECIAL_TOKENS) <= set(word_map)):
        raise ValueError(f'{path}: not a word map (expected an object word -> distinct id, with '
                         f"{', '.join(SPECIAL_TOKENS)})")
    return word_map


def _check_hdf5(path, num_images):
    """ValueError unless `path` is an HDF5 file with uint8 'images' [num_images, 3, S, S] (checked once
    here, so that a bad file is one line, not a traceback from a DataLoader worker)."""
    import h5py
    try:
        with h5py.File(path, 'r') as h:
            images = h.get('images')
            ok = (isinstance(images, h5py.Dataset) and images.dtype == np.uint8 and images.ndim == 4
                  and images.shape[0] == num_images and images.shape[1] == 3)
    except OSError as e:
        raise ValueError(f'{path}: not a readable HDF5 file ({str(e).splitlines()[0]})') from None
    if not ok:
        raise ValueError(f"{path}: expected a uint8 dataset 'images' [{num_images}, 3, S, S] "
                         '(re-run 00_create_input_files.py --hdf5)')


def _id_table(path, what, ndim):
    """A prepared JSON file of token ids (ndim 2) or lengths (ndim 1) -> long tensor, or ValueError."""
    data = read_json(path, what)
    try:
        table = torch.tensor(data, dtype=torch.long)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        table = None
    if table is None or table.dim() != ndim or (ndim == 1 and not isinstance(data, list)):
        raise ValueError(f'{path}: expected {"rows of integer token ids" if ndim == 2 else "a list of integers"} '
                         f'({what} of 00_create_input_files.py)')
    return table


# ----------------------------------------------------------------------------------------------
# Datasets over prepared files

class CaptionDataset(Dataset):
    """A prepared split (as written by 00_create_input_files.py).

    Per caption (default, the tutorial's): item -> (image, caption [L], caplen [1]) for TRAIN, and
    (image, caption, caplen, all captions of the image [cpi, L]) for VAL/TEST.
    Per image (`per_image=True`): item -> (image, captions [cpi, L], caplens [cpi]), so the encoder
    runs once per image for all of its captions.

    The image comes from `features` (a FeatureCache: fp16 [C, h, w]), else the split's HDF5 file when
    `source` is 'hdf5' (or 'auto' and the file exists), else from the image paths; `transform` turns
    decoded images into tensors. HDF5 files are opened lazily in each DataLoader worker.
    """

    def __init__(self, data_folder, data_name, split, transform=None, per_image=False, source='auto',
                 features=None):
        split = split.upper()
        if split not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
        self.split, self.transform, self.per_image, self.features = split, transform, per_image, features
        self.data_folder, self.data_name = data_folder, data_name
        f = lambda kind, ext: os.path.join(data_folder, f'{split}_{kind}_{data_name}.{ext}')  # noqa: E731
        check_complete_set(data_folder, data_name)
        self.paths = read_paths_pickle(f('paths', 'pkl'))
        self.captions = _id_table(f('CAPTIONS', 'json'), 'captions file', 2)
        self.caplens = _id_table(f('CAPLENS', 'json'), 'caption lengths file', 1)
        self.refs_path = f('REFS', 'json')
        if len(self.paths) == 0 or len(self.captions) % len(self.paths) or len(self.captions) != len(self.caplens):
            raise ValueError(f'{data_folder}: {split} files of {data_name} disagree: {len(self.paths)} images, '
                             f'{len(self.captions)} captions, {len(self.caplens)} lengths')
        self.cpi = len(self.captions) // len(self.paths)
        self.hdf5_path = f('IMAGES', 'hdf5')
        if source == 'hdf5' and not os.path.exists(self.hdf5_path):
            raise FileNotFoundError(f'{self.hdf5_path} not found: run 00_create_input_files.py with --hdf5')
        self.use_hdf5 = features is None and (source == 'hdf5' or (source == 'auto' and os.path.exists(self.hdf5_path)))
        if self.use_hdf5:
            _check_hdf5(self.hdf5_path, len(self.paths))
        self._h5 = None   # opened on first use in each process (h5py handles do not survive fork)
        if features is not None and len(features) != len(self.paths):
            raise ValueError(f'feature cache has {len(features)} images, {split} has {len(self.paths)}')

    @property
    def num_images(self):
        return len(self.paths)

    def refs(self):
        """Every raw reference sentence per image ([N] lists of strings)."""
        return read_json(self.refs_path, 'references file')

    def image(self, i):
        """The encoder input of image i: features fp16 [C, h, w], or a transformed image [3, S, S]."""
        if self.features is not None:
            return self.features[i]
        if self.use_hdf5:
            if self._h5 is None:
                import h5py
                self._h5 = h5py.File(self.hdf5_path, 'r')['images']
            img = torch.from_numpy(self._h5[i])                          # uint8 [3, S, S]
        else:
            img = load_image(self.paths[i], self.transform.size if self.transform else None)
        return self.transform(img) if self.transform else img

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_h5'] = None
        return state

    def __len__(self):
        return len(self.paths) if self.per_image else len(self.captions)

    def __getitem__(self, i):
        if self.per_image:
            rows = slice(i * self.cpi, (i + 1) * self.cpi)
            return self.image(i), self.captions[rows], self.caplens[rows]
        img = self.image(i // self.cpi)
        if self.split == 'TRAIN':
            return img, self.captions[i], self.caplens[i:i + 1]
        first = (i // self.cpi) * self.cpi
        return img, self.captions[i], self.caplens[i:i + 1], self.captions[first:first + self.cpi]


class Indexed(Dataset):
    """Item i -> (i, *dataset[i]): batches that say which items they hold (self-critical training
    looks up each image's references)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (i, *self.dataset[i])


class ImageBatchSampler:
    """Batches of image indices: a seeded shuffle per epoch, cut into global batches of
    `images_per_batch * world` images, of which this process takes its slice.

    `set_epoch(epoch, start)` skips the first `start` images of the epoch's order (resume), so a
    run continues identically whatever the number of processes.
    """

    def __init__(self, num_images, images_per_batch, seed, rank=0, world=1):
        self.n, self.ipb, self.seed, self.rank, self.world = num_images, images_per_batch, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _global_batches(self):
        g = torch.Generator().manual_seed(self.seed + 1000003 * self.epoch)
        order = torch.randperm(self.n, generator=g)[self.start:]
        size = self.ipb * self.world
        return [order[i:i + size] for i in range(0, len(order), size)]

    def __iter__(self):
        for batch in self._global_batches():
            if self.world == 1:
                yield batch.tolist()
            elif len(batch) >= self.world:   # a short last batch is shared out evenly
                yield torch.tensor_split(batch, self.world)[self.rank].tolist()

    def __len__(self):
        return sum(1 for b in self._global_batches() if self.world == 1 or len(b) >= self.world)


# ----------------------------------------------------------------------------------------------
# Feature cache: a frozen encoder runs once over a split; training reads fp16 features from disk.

class FeatureCache:
    """fp16 encoder features [N, C, h, w] in a .npy file. Item -> fp16 tensor [C, h, w].

    Items are read with os.pread at their offset, so memory use stays at a batch's worth whatever
    the cache size (a memory map would keep every page it touched resident in the process), and the
    file handle works in any number of DataLoader workers."""

    def __init__(self, path):
        self.path, self._fd, self._pid = path, None, None
        try:   # allow_pickle stays False: an object array is refused, never unpickled
            header = np.load(path, mmap_mode='r')          # only to read shape, dtype and data offset
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f'{path}: not a feature cache ({e}); delete it to rebuild') from None
        if not header.flags.c_contiguous or header.dtype != np.float16 or header.ndim != 4:
            raise ValueError(f'{path}: not a feature cache (expected a C-ordered float16 [N, C, h, w] array)')
        self.shape, self.offset = header.shape, header.offset
        self.item_bytes = int(np.prod(self.shape[1:])) * 2
        del header

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, i):
        if self._fd is None or self._pid != os.getpid():   # one descriptor per process
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, self.item_bytes, self.offset + i * self.item_bytes)
        return torch.from_numpy(np.frombuffer(data, dtype=np.float16).reshape(self.shape[1:]).copy())

    def __getstate__(self):
        return {**self.__dict__, '_fd': None, '_pid': None}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def feature_cache_path(dataset, encoder):
    """Where the features of `dataset` (a CaptionDataset) under `encoder` are cached: the name holds
    the encoder, its input size and a hash of its weights and of the split's image list, so a
    changed encoder or re-prepared data never reuses a stale cache."""
    h = hashlib.sha1((state_dict_digest(encoder) + json.dumps(dataset.paths)).encode()).hexdigest()[:10]
    return os.path.join(dataset.data_folder, 'features',
                        f'{dataset.split}_FEATURES_{dataset.data_name}_{encoder.name}_{encoder.image_size}px_{h}.npy')


PROGRESS_SECONDS = 15   # without a terminal (logs, nohup), a progress line at most this often


@torch.inference_mode()
def build_feature_cache(encoder, dataset, path, device, batch_size=32, workers=0, progress=True):
    """Run the (frozen, eval-mode) `encoder` once over every image of `dataset` (per-image
    CaptionDataset over images) and store its native feature maps as fp16 [N, C, h, w] at `path`.

    The file's size is known after the first batch: it is checked against the free disk space and
    allocated at once, so a full disk is an OSError naming both sizes (not a Bus error from a
    sparse memory map later). Any failure removes the partial file; one a killed run left is
    removed by the next."""
    from torch.utils.data import DataLoader
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp(folder)
    loader = DataLoader(_Images(dataset), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == 'cuda', generator=torch.Generator())  # leaves the global RNG alone
    encoder.eval()
    out, n = None, dataset.num_images
    desc = f'caching {dataset.split} features'
    bar = tqdm(loader, desc=desc, unit='batch', disable=None if progress else True, leave=False)
    plain = progress and bar.disable   # not a terminal: tqdm is silent, so print plain lines
    start = last = time.time()
    with atomic_path(path) as tmp:
        i = 0
        for images in bar:
            feats = encoder.features(images.to(device, non_blocking=True))   # [B, C, h, w]
            if out is None:
                shape = (n, *feats.shape[1:])
                check_free_space(folder, int(np.prod(shape)) * 2 + 4096, f'the {dataset.split} feature cache')
                try:
                    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float16, shape=shape)
                    allocate_blocks(tmp)
                except OSError as e:   # numpy's own errors name no file
                    raise OSError(e.errno, e.strerror, path) from None
            out[i:i + len(feats)] = feats.half().cpu().numpy()
            i += len(feats)
            if plain and (time.time() - last >= PROGRESS_SECONDS or i == n):
                last = time.time()
                print(f'{desc}: {i}/{n} images ({100 * i // max(n, 1)}%), {last - start:.0f} s', flush=True)
        out.flush()
        del out                                        # closed; renamed to `path` when the block exits
    return FeatureCache(path)


class _Images(Dataset):
    """Just the images of a CaptionDataset (for feature caching)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return self.dataset.num_images

    def __getitem__(self, i):
        return self.dataset.image(i)
