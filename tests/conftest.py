import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import train`, `import configurator` from any cwd
# on 2-core CI machines two intra-op threads spin against each other: tiny matmuls run ~40x slower.
# set before torch is imported, so this process and every training subprocess use one thread.
os.environ.setdefault('OMP_NUM_THREADS', '1')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: multi-process (torchrun) tests; still run by default')


@pytest.fixture(scope='session')
def run_train():
    """run(args, nproc=1, check=True, torchrun=None) -> CompletedProcess of train.py (torchrun with gloo: nproc > 1 by default)."""
    def run(args, nproc=1, check=True, torchrun=None):
        torchrun = nproc > 1 if torchrun is None else torchrun
        launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                                     if torchrun else [])
        p = subprocess.run(launch + ['train.py'] + [str(a) for a in args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        if check and p.returncode != 0:
            pytest.fail(f"train.py {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr[-3000:]}")
        return p
    return run
