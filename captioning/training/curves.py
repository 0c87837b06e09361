"""Training curves as pictures: curves.png in a run folder after every epoch of 01_train.py (train and
VAL loss, VAL BLEU-4 and CIDEr-D, the self-critical reward), several runs in one figure
(tools/plot_runs.py), and TensorBoard event files on request (01_train.py --tensorboard).

Everything comes from the logs a run already writes (metrics.jsonl: one record per epoch;
steps.jsonl: one every --log-every steps), so nothing new is kept and an old run folder can be drawn
too. The x axis is epochs trained: epoch e's record is the point at e + 1, a logged step sits at its
fraction of its epoch. Drawn with Pillow (already a dependency, as for the attention figures).
"""
import collections
import json
import math
import os
import shutil

from utils import atomic_path

CURVES_FILE = 'curves.png'
TENSORBOARD_DIR = 'tensorboard'
TENSORBOARD_PIN = 'tensorboard==2.21.0'   # as requirements-extras.txt

# A plotted line: its legend label, points, colour, dashed or not, markers on the points, width.
Line = collections.namedtuple('Line', 'label xs ys color dashed markers width')
Line.__new__.__defaults__ = (False, True, 2)

# Panels in order: key -> title. The reward panel appears for self-critical runs only.
PANELS = {'loss': 'loss (per caption token)', 'bleu4': 'VAL BLEU-4 (generated captions)',
          'cider': 'VAL CIDEr-D (generated captions)', 'reward': 'self-critical reward (CIDEr-D of samples)'}
# Per-epoch series of one run: (panel, metrics.jsonl key, label, colour, dashed)
EPOCH_SERIES = [('loss', 'train_loss', 'train loss (epoch mean)', (31, 119, 180), False),
                ('loss', 'val_tf_loss', 'VAL loss (teacher-forced)', (255, 127, 14), False),
                ('bleu4', 'bleu4', 'VAL BLEU-4', (44, 160, 44), False),
                ('cider', 'cider', 'VAL CIDEr-D', (214, 39, 40), False),
                ('reward', 'train_reward', 'train reward (epoch mean)', (148, 103, 189), False),
                ('reward', 'train_baseline', 'baseline (epoch mean)', (140, 86, 75), True)]
# Per-step series of one run: (panel, steps.jsonl key, label, colour)
STEP_SERIES = [('loss', 'loss', 'train loss (logged steps)', (158, 202, 225)),
               ('reward', 'reward', 'reward (logged steps)', (203, 180, 220))]
# Colours of overlaid runs (tools/plot_runs.py)
RUN_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
              (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# ----------------------------------------------------------------------------------------------
# Reading the logs

def read_jsonl(path):
    """The records of a JSON-lines log ([] when it does not exist); a torn line (a killed run's) is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def read_run(folder):
    """(epoch records, step records) of a run folder, epochs in order (ValueError, one line, when
    the folder holds no training log)."""
    if not os.path.isdir(folder):
        raise ValueError(f'{folder}: no such run folder')
    epochs = [r for r in read_jsonl(os.path.join(folder, 'metrics.jsonl')) if isinstance(r.get('epoch'), int)]
    steps = [r for r in read_jsonl(os.path.join(folder, 'steps.jsonl')) if isinstance(r.get('step'), int)]
    if not epochs and not steps:
        raise ValueError(f'{folder}: no metrics.jsonl or steps.jsonl (not a 01_train.py run folder, or no '
                         'step logged yet)')
    return sorted(epochs, key=lambda r: r['epoch']), steps


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def step_positions(epochs, steps):
    """x (epochs trained) of each step record: epoch e's steps spread over (e, e + 1] by the global step
    numbers at the ends of epochs e - 1 and e. Steps of an epoch that has not ended are placed by the
    previous epoch's length (or left out before one has ended). -> [(x, record)]."""
    end = {r['epoch']: r['step'] for r in epochs if isinstance(r.get('step'), int)}
    out = []
    for r in steps:
        e = r.get('epoch')
        if not isinstance(e, int):
            continue
        start = end.get(e - 1, 0)
        if e in end:
            length = end[e] - start
        elif e - 1 in end:
            length = end[e - 1] - end.get(e - 2, 0)
        else:
            continue
        if length > 0 and r['step'] > start:
            out.append((e + min((r['step'] - start) / length, 1.0), r))
    return out


def _same(epochs, key, other):
    """Whether two per-epoch series are equal wherever both are logged (the mean baseline's epoch mean
    is the reward's own)."""
    pairs = [(r[key], r[other]) for r in epochs if _finite(r.get(key)) and _finite(r.get(other))]
    return bool(pairs) and all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in pairs)


# A self-critical run's own loss is a policy-gradient surrogate (reward minus baseline times log
# probability) whose value says nothing about progress: its panel shows the VAL cross-entropy and
# the reward panel shows training. The baseline is drawn only where it differs from the reward
# (with --scst-baseline mean their epoch means are equal by construction).


def run_series(folder):
    """The lines of one run's figure: {panel: [Line]} (the reward panel only for self-critical runs).
    Epoch series have one point per logged epoch (x = epochs trained), step series one per logged step."""
    epochs, steps = read_run(folder)
    panels = {key: [] for key in PANELS}
    scst_steps = any(_finite(r.get('reward')) for r in steps)   # see the note above
    for panel, key, label, color in STEP_SERIES:
        pts = [(x, r[key]) for x, r in step_positions(epochs, steps) if _finite(r.get(key))]
        if pts and not (scst_steps and key == 'loss'):
            panels[panel].append(Line(label, [p[0] for p in pts], [p[1] for p in pts], color, False, False, 1))
    scst = any(_finite(r.get('train_reward')) for r in epochs)
    for panel, key, label, color, dashed in EPOCH_SERIES:
        pts = [(r['epoch'] + 1, r[key]) for r in epochs if _finite(r.get(key))]
        if scst and key == 'train_loss' or key == 'train_baseline' and _same(epochs, key, 'train_reward'):
            continue
        if pts:
            panels[panel].append(Line(label, [p[0] for p in pts], [p[1] for p in pts], color, dashed))
    if not panels['reward']:
        del panels['reward']
    return panels


def best_epoch(epochs):
    """(x, panel, value) of the epoch the run selected (its --select-by metric's best), or None."""
    if not epochs:
        return None
    key = {'BLEU-4': 'bleu4', 'CIDEr': 'cider'}.get(epochs[-1].get('select_by'), 'bleu4')
    scored = [r for r in epochs if _finite(r.get(key))]
    if not scored:
        return None
    best = max(scored, key=lambda r: r[key])     # the first of equal scores, as 01_train.py keeps it
    return best['epoch'] + 1, key, best[key]


def overlay_series(folders, labels=None):
    """The lines of several runs in one figure: {panel: [Line]}, one colour per run; the loss panel
    draws train solid and VAL dashed. Per-step lines are left out (one line per run and metric)."""
    labels = labels or [run_label(f) for f in folders]
    panels = {key: [] for key in PANELS}
    for i, (folder, label) in enumerate(zip(folders, labels)):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        epochs, _ = read_run(folder)
        scst = any(_finite(r.get('train_reward')) for r in epochs)   # its train loss says nothing (run_series)
        for panel, key, what, dashed in (('loss', 'train_loss', 'train', False), ('loss', 'val_tf_loss', 'VAL', True),
                                         ('bleu4', 'bleu4', None, False), ('cider', 'cider', None, False),
                                         ('reward', 'train_reward', None, False)):
            pts = [(r['epoch'] + 1, r[key]) for r in epochs if _finite(r.get(key))]
            if pts and not (scst and key == 'train_loss'):
                panels[panel].append(Line(f'{label} {what}' if what else label, [p[0] for p in pts],
                                          [p[1] for p in pts], color, dashed))
    if not panels['reward']:
        del panels['reward']
    return panels


def run_label(folder):
    """A run's name in legends: its folder's name."""
    return os.path.basename(os.path.normpath(folder)) or folder


def run_summary(folder):
    """One line about a run for the figure's title: decoder, encoder, objective, epochs, best."""
    epochs, steps = read_run(folder)
    last = epochs[-1] if epochs else steps[-1]
    best = best_epoch(epochs)
    parts = [run_label(folder), f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''} logged",
             f"step {last.get('step', '?')}"]
    if best:
        parts.append(f"best VAL {'BLEU-4' if best[1] == 'bleu4' else 'CIDEr'} {best[2]:.4f} after {best[0]} "
                     f"epoch{'s' if best[0] != 1 else ''} (epoch {best[0] - 1} in the logs)")
    return ', '.join(parts)


# ----------------------------------------------------------------------------------------------
# Drawing (Pillow): panels in a grid, each with its own axes, ticks and legend; drawn at twice the
# size and scaled down, which smooths the lines

def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v, step):
    """A tick label with as many decimals as the tick step needs."""
    if not step > 0:
        return f'{v:g}'
    if step >= 1 and float(v).is_integer():
        return str(int(v))
    exponent = math.floor(math.log10(step))
    decimals = max(0, -exponent) + (1 if round(step / 10 ** exponent, 6) == 2.5 else 0)
    return f'{v:.{min(decimals, 8)}f}'


def _y_range(lines):
    """The y axis of a panel: its values with a margin, not below 0 when no value is (losses,
    scores); a (nearly) constant series gets a span of its own (a BLEU-4 of 1e-155 plots as 0)."""
    ys = [y for line in lines for y in line.ys]
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-6:
        mid = (lo + hi) / 2
        pad = abs(mid) * 0.05 if abs(mid) > 1e-6 else 0.05
    else:
        pad = (hi - lo) * 0.06
    return (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad


def _dashed(draw, points, fill, width, dash):
    """A polyline drawn in dashes of `dash` pixels."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < seg:
            run = min(left, seg - pos)
            if on:
                a, b = pos / seg, (pos + run) / seg
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=fill, width=width)
            pos += run
            left -= run
            if left <= 1e-9:
                on, left = not on, dash


def _draw_panel(draw, box, title, lines, x_max, font, small, s, mark=None):
    """One panel in box (x0, y0, x1, y1) of the (scaled by s) canvas."""
    x0, y0, x1, y1 = box
    legend_rows = math.ceil(len(lines) / 2)
    top = y0 + 30 * s + legend_rows * 18 * s
    left, right, bottom = x0 + 62 * s, x1 - 16 * s, y1 - 40 * s
    draw.text(((x0 + x1) / 2, y0 + 6 * s), title, fill='black', font=font, anchor='mt')
    for i, line in enumerate(lines):                                   # legend: two entries per row
        lx = x0 + 62 * s + (i % 2) * (x1 - x0 - 70 * s) / 2
        ly = y0 + 30 * s + (i // 2) * 18 * s + 8 * s
        if line.dashed:
            _dashed(draw, [(lx, ly), (lx + 24 * s, ly)], line.color, max(1, line.width) * s, 5 * s)
        else:
            draw.line([(lx, ly), (lx + 24 * s, ly)], fill=line.color, width=max(1, line.width) * s)
        draw.text((lx + 30 * s, ly), line.label, fill='black', font=small, anchor='lm')
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90), width=s)
    if not lines:
        draw.text(((left + right) / 2, (top + bottom) / 2), 'nothing logged yet', fill='gray', font=small, anchor='mm')
        return
    ylo, yhi = _y_range(lines)

    def px(x, y):
        return (left + (right - left) * x / x_max, bottom - (bottom - top) * (y - ylo) / (yhi - ylo))

    yt = nice_ticks(ylo, yhi)
    ystep = yt[1] - yt[0] if len(yt) > 1 else max(abs(yt[0]), 1)
    for t in yt:
        _, y = px(0, t)
        if top <= y <= bottom:
            draw.line([(left, y), (right, y)], fill=(228, 228, 228), width=s)
            draw.text((left - 6 * s, y), _fmt(t, ystep), fill='black', font=small, anchor='rm')
    xt = list(range(0, int(x_max) + 1)) if x_max <= 12 else nice_ticks(0, x_max, 7)
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1
    for t in xt:
        x, _ = px(t, ylo)
        draw.line([(x, bottom), (x, bottom + 5 * s)], fill=(90, 90, 90), width=s)
        draw.text((x, bottom + 8 * s), _fmt(t, xstep), fill='black', font=small, anchor='mt')
    draw.text(((left + right) / 2, y1 - 6 * s), 'epochs trained', fill='black', font=small, anchor='mb')
    for line in lines:
        pts = [px(x, y) for x, y in zip(line.xs, line.ys)]
        width = line.width * s
        if len(pts) > 1:
            if line.dashed:
                _dashed(draw, pts, line.color, width, 7 * s)
            else:
                draw.line(pts, fill=line.color, width=width, joint='curve')
        if line.markers or len(pts) == 1:
            r = 3.5 * s
            for x, y in pts:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=line.color)
    if mark is not None:                                               # the selected (BEST) epoch
        x, y = px(*mark)
        r = 8 * s
        draw.ellipse([x - r, y - r, x + r, y + r], outline='black', width=2 * s)
        draw.text((x - r - 3 * s, y), 'BEST', fill='black', font=small, anchor='rm')


def draw_figure(panels, title, mark=None, columns=None, panel_size=(560, 380)):
    """{panel: [Line]} -> a PIL image: one panel per key in PANELS order, `columns` per row (default:
    3 panels in a row, 4 in a square), a title line on top. `mark`: (panel, x, y) circled as the
    selected epoch."""
    from PIL import Image, ImageDraw, ImageFont
    s = 2                                                              # drawn at twice the size
    keys = [k for k in PANELS if k in panels]
    columns = columns or (2 if len(keys) == 4 else max(1, len(keys)))
    rows = math.ceil(len(keys) / columns)
    pw, ph = panel_size
    width, height = columns * pw, rows * ph + 34
    img = Image.new('RGB', (width * s, height * s), 'white')
    draw = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=15 * s), ImageFont.load_default(size=12 * s)
    draw.text((width * s / 2, 8 * s), title, fill='black', font=font, anchor='mt')
    xs = [x for lines in panels.values() for line in lines for x in line.xs]
    x_max = max([1.0] + xs)
    for i, key in enumerate(keys):
        bx, by = (i % columns) * pw * s, (34 + (i // columns) * ph) * s
        panel_mark = mark[1:] if mark and mark[0] == key else None
        _draw_panel(draw, (bx, by, bx + pw * s, by + ph * s), PANELS[key], panels[key], x_max, font, small, s,
                    panel_mark)
    return img.resize((width, height), Image.LANCZOS)


def save_png(img, path):
    """Write a PIL image as PNG atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        img.save(tmp, format='PNG')
    return path


def write_run_curves(folder, path=None):
    """Draw one run's curves.png (default: in the run folder). Returns (path, {panel: [Line]})."""
    panels = run_series(folder)
    epochs, _ = read_run(folder)
    best = best_epoch(epochs)
    mark = (best[1], best[0], best[2]) if best else None
    path = path or os.path.join(folder, CURVES_FILE)
    save_png(draw_figure(panels, run_summary(folder), mark), path)
    return path, panels


def write_overlay(folders, path, labels=None):
    """Draw several runs in one figure at `path`. Returns {panel: [Line]}."""
    panels = overlay_series(folders, labels)
    title = f"{len(folders)} runs: colour = run; loss panel: train solid, VAL dashed"
    save_png(draw_figure(panels, title), path)
    return panels


# ----------------------------------------------------------------------------------------------
# TensorBoard (optional package)

def tensorboard_missing():
    """None when torch.utils.tensorboard can write event files, else the one line that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return (f'--tensorboard needs the tensorboard package, which is not installed: pip install '
                f'{TENSORBOARD_PIN} (requirements-extras.txt), or leave --tensorboard off (curves.png is '
                'written either way)')
    return None


def write_tensorboard_epoch(folder):
    """Bring the run's TensorBoard event files (folder/tensorboard) up to its latest epoch: that
    epoch's metrics and the steps logged in it, at their global step numbers. Called once per epoch,
    it writes each record once without keeping any state of its own. The first epoch of a run, or
    the first one written (--tensorboard turned on when resuming), writes everything logged so far
    into a fresh folder (no events of a replaced run stay)."""
    from torch.utils.tensorboard import SummaryWriter
    epochs, steps = read_run(folder)
    if not epochs:
        return None
    out = os.path.join(folder, TENSORBOARD_DIR)
    fresh = len(epochs) == 1 or not os.path.isdir(out)
    if fresh and os.path.isdir(out):
        shutil.rmtree(out)
    new_epochs = epochs if fresh else epochs[-1:]
    before = -1 if fresh else epochs[-2]['step']
    end = epochs[-1].get('step', before)
    with SummaryWriter(out) as writer:
        for r in steps:
            if before < r['step'] <= end:
                for key, tag in (('loss', 'train/step_loss'), ('reward', 'train/step_reward'), ('lr', 'train/lr')):
                    if _finite(r.get(key)):
                        writer.add_scalar(tag, r[key], r['step'])
        for record in new_epochs:
            for key, tag in (('train_loss', 'train/loss'), ('val_tf_loss', 'val/loss_teacher_forced'),
                             ('bleu4', 'val/bleu4'), ('cider', 'val/cider'), ('train_reward', 'train/reward'),
                             ('train_baseline', 'train/baseline')):
                if _finite(record.get(key)) and isinstance(record.get('step'), int):
                    writer.add_scalar(tag, record[key], record['step'])
    return out


def after_epoch(folder, tensorboard=False, log=print):
    """What 01_train.py calls after writing an epoch's log line: redraw curves.png and, with
    --tensorboard, add the epoch to the event files. A failure here is one warning line through
    `log`, never the end of a training run. Returns curves.png's path (None when it failed)."""
    try:
        path, _ = write_run_curves(folder)
        if tensorboard:
            write_tensorboard_epoch(folder)
        return path
    except Exception as e:   # a figure must not cost the run: say it and go on
        log(f'warning: could not draw the training curves in {folder}: {type(e).__name__}: {e}')
        return None
