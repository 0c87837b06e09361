"""Attention figures: the image, then each word with where the model looked (02 --visualize, demo)."""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from captioning import text
from utils import atomic_path

# ----------------------------------------------------------------------------------------------
# Attention figures

def _jet(x):
    """[H, W] floats in [0, 1] -> [H, W, 3] uint8 colours of the 'jet' colour map."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def attention_figure(image, words, alphas, panel=192, columns=5):
    """The image, then one panel per word with its attention map upsampled and overlaid.

    image: PIL RGB; words: the emitted words (add '<end>' to show its map too); alphas: [T, P] with
    T >= len(words) and P a square grid. Returns a PIL image.
    """
    grid = int(round(math.sqrt(alphas.shape[1])))
    img = image.convert('RGB').resize((panel, panel), Image.BILINEAR)
    base = np.asarray(img, dtype=np.float32)
    font = text.label_font(words, max(12, panel // 12))        # a CJK font when a label needs one
    label_h = panel // 6
    n = len(words) + 1
    rows = math.ceil(n / columns)
    fig = Image.new('RGB', (columns * panel, rows * (panel + label_h)), 'white')
    draw = ImageDraw.Draw(fig)
    for k in range(n):
        x, y = (k % columns) * panel, (k // columns) * (panel + label_h)
        if k == 0:
            fig.paste(img, (x, y))
            label = '(image)'
        else:
            a = torch.as_tensor(alphas[k - 1], dtype=torch.float32).view(1, 1, grid, grid)
            a = F.interpolate(a, size=(panel, panel), mode='bilinear', align_corners=False)[0, 0].numpy()
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
            over = 0.45 * base + 0.55 * _jet(a).astype(np.float32) * (0.35 + 0.65 * a[..., None])
            fig.paste(Image.fromarray(np.clip(over, 0, 255).astype(np.uint8)), (x, y))
            label = words[k - 1]
        draw.text((x + panel // 2, y + panel + label_h // 2), label, fill='black', font=font, anchor='mm')
    return fig


def save_attention_figure(image, words, alphas, path, **kw):
    with atomic_path(path) as tmp:
        attention_figure(image, words, alphas, **kw).save(tmp, format='PNG')
    return path


def figure_name(image_path, used):
    """A unique PNG name for an image's attention figure."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, i = f'{stem}_attention.png', 1
    while name in used:
        i += 1
        name = f'{stem}_{i}_attention.png'
    used.add(name)
    return name
