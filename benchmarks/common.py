"""What every benchmark reports besides its figures: machine, versions, peak memory; and printing."""
import json
import os
import resource

import torch

import utils


def setup(device_name='auto', threads=0):
    """-> torch.device, after setting the thread count (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    return utils.get_device(device_name)


def peak_rss_mb():
    """Peak resident memory of this process plus its largest child (DataLoader/pool workers), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) / 1024)


def environment(device):
    return {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'cpus': os.cpu_count(),
            'device': str(device),
            'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}


def report(result, as_json):
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f'{k:>24}: {v}')


def profile_table(fn, rows=12):
    """Run fn once under torch.profiler; the top operators by self CPU time, as a table string."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    key = 'self_cuda_time_total' if torch.cuda.is_available() else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=rows)
