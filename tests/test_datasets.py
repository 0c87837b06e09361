"""CaptionDataset over paths and HDF5, the raw image loader and the shared transform."""
import io

import numpy as np
import pytest
import torch
from conftest import script
from PIL import Image
from torch.utils.data import DataLoader

import datasets

prep = script('00_create_input_files')


@pytest.fixture(scope='module')
def hdf5_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('h5')
    assert prep.main(['--output-folder', str(folder), '--synthetic-images', '30', '--synthetic-image-size', '48',
                      '--min-word-freq', '1', '--hdf5', '--image-size', '40', '--workers', '1']) == 0
    return str(folder), 'synthetic_5_cap_per_img_1_min_word_freq'


def transform(size=40):
    return datasets.ImageTransform(size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def test_paths_and_hdf5_give_identical_tensors(hdf5_data):
    folder, name = hdf5_data
    for split in ('TRAIN', 'VAL'):
        p = datasets.CaptionDataset(folder, name, split, transform(), source='paths')
        h = datasets.CaptionDataset(folder, name, split, transform(), source='hdf5')
        assert not p.use_hdf5 and h.use_hdf5
        assert len(p) == len(h) == p.num_images * 5
        for i in range(0, len(p), 7):
            for a, b in zip(p[i], h[i]):
                assert torch.equal(a, b)


def test_item_layouts(hdf5_data):
    folder, name = hdf5_data
    train = datasets.CaptionDataset(folder, name, 'TRAIN', transform())
    img, cap, caplen = train[6]
    assert img.shape == (3, 40, 40) and img.dtype == torch.float32
    assert cap.shape == (50 + 2,) and caplen.shape == (1,)
    assert torch.equal(cap, train.captions[6])
    val = datasets.CaptionDataset(folder, name, 'VAL', transform())
    img, cap, caplen, allcaps = val[7]
    assert allcaps.shape == (5, 52) and torch.equal(allcaps[2], cap)       # caption 7 is image 1's third
    per = datasets.CaptionDataset(folder, name, 'TRAIN', transform(), per_image=True)
    img, caps, lens = per[1]
    assert len(per) == train.num_images and caps.shape == (5, 52) and lens.shape == (5,)
    assert torch.equal(caps, train.captions[5:10])
    assert len(per.refs()) == per.num_images


@pytest.mark.parametrize('source', ['paths', 'hdf5'])
def test_dataloader_with_two_workers(hdf5_data, source):
    folder, name = hdf5_data
    ds = datasets.CaptionDataset(folder, name, 'TRAIN', transform(), per_image=True, source=source)
    ds.image(0)                                          # an open HDF5 handle must not break the workers
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    seen = 0
    for imgs, caps, lens in loader:
        assert imgs.shape[1:] == (3, 40, 40) and caps.shape[1:] == (5, 52)
        seen += len(imgs)
    assert seen == ds.num_images


def test_missing_hdf5_is_a_clear_error(tmp_path):
    folder = tmp_path / 'd'
    assert prep.main(['--output-folder', str(folder), '--synthetic-images', '20', '--synthetic-image-size', '32',
                      '--min-word-freq', '0']) == 0
    with pytest.raises(FileNotFoundError, match='--hdf5'):
        datasets.CaptionDataset(str(folder), 'synthetic_5_cap_per_img_0_min_word_freq', 'TRAIN', source='hdf5')


# ---- raw images for inference ----

def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_list_images_recursive_and_case_insensitive(tmp_path):
    (tmp_path / 'sub' / 'deeper').mkdir(parents=True)
    for name in ('a.JPG', 'b.png', 'sub/c.Jpeg', 'sub/deeper/d.webp', 'sub/e.bmp', 'notes.txt', 'f.gif'):
        (tmp_path / name).write_bytes(b'x')
    found = [p.replace(str(tmp_path) + '/', '') for p in datasets.list_images(str(tmp_path))]
    assert found == ['a.JPG', 'b.png', 'sub/c.Jpeg', 'sub/e.bmp', 'sub/deeper/d.webp']
    assert datasets.list_images(str(tmp_path / 'a.JPG')) == [str(tmp_path / 'a.JPG')]
    with pytest.raises(FileNotFoundError):
        datasets.list_images(str(tmp_path / 'nope'))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new('RGB', (60, 30), 'red')
    img.paste((0, 0, 255), (0, 0, 10, 30))            # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees clockwise on display
    path = save(img, tmp_path / 'r.jpg', exif=exif.tobytes(), quality=95)
    out = datasets.load_image(path)
    assert out.size == (30, 60)
    top = np.asarray(out)[:5].mean(axis=(0, 1))
    assert top[2] > 150 and top[0] < 100               # the blue band is now on top


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK', 'I;16', 'LA', '1'])
def test_image_modes_become_rgb(tmp_path, mode):
    if mode == 'I;16':
        img = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
        ext = 'png'
    elif mode == 'CMYK':
        img = Image.new('CMYK', (20, 20), (0, 255, 255, 0))
        ext = 'jpg'
    else:
        img = Image.new('RGB', (20, 20), (200, 30, 30)).convert(mode)
        ext = 'png'
    path = save(img, tmp_path / f'x.{ext}')
    out = datasets.load_image(path)
    assert out.mode == 'RGB' and out.size == (20, 20)
    if mode == 'I;16':
        assert abs(int(np.asarray(out)[0, 0, 0]) - 40000 // 257) <= 1


def test_transparent_png_is_composited_on_white(tmp_path):
    img = Image.new('RGBA', (10, 10), (255, 0, 0, 0))
    path = save(img, tmp_path / 't.png')
    assert tuple(np.asarray(datasets.load_image(path))[0, 0]) == (255, 255, 255)


def test_transform_normalises_pil_and_uint8_alike():
    t = transform(8)
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (8, 8, 3), dtype=np.uint8))
    a = t(img)
    b = t(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    mean = torch.tensor(t.mean).view(3, 1, 1)
    std = torch.tensor(t.std).view(3, 1, 1)
    assert torch.allclose(a * std + mean, b.new_tensor(np.asarray(img).transpose(2, 0, 1) / 255.0), atol=1e-6)


def test_image_files_dataset_reports_undecodable(tmp_path):
    good = save(Image.new('RGB', (12, 12)), tmp_path / 'g.png')
    bad = tmp_path / 'b.jpg'
    bad.write_bytes(io.BytesIO(b'not an image').getvalue())
    ds = datasets.ImageFiles([good, str(bad)], transform(16))
    images, idx, failures = datasets.collate_image_files([ds[0], ds[1]])
    assert images.shape == (1, 3, 16, 16) and idx == [0]
    assert failures[0][0] == 1 and 'UnidentifiedImageError' in failures[0][1]
