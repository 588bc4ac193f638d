"""fault tolerance: a non-finite step is skipped on every rank, SIGTERM checkpoints and exits 0 (one rank told is
enough), a run killed with SIGKILL at random moments always resumes and logs each step once.

    python -m pytest tests/test_faults.py -q
    SOAK_KILLS=40 python -m pytest tests/test_faults.py -q -k soak -s      # a longer soak by hand
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')
SFT = ['config/tiny.py', '--batch_size=16', '--micro_batch_size=4', '--ckpt_interval=1000']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def metrics(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def run(cmd, check=True):
    """cmd in a process of its own; `python train.py ...` runs in this one (conftest.in_process)"""
    p = (in_process(cmd[2:]) if cmd[:2] == [sys.executable, 'train.py'] else
         subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300))
    assert not check or p.returncode == 0, p.stderr[-3000:]
    return p


# -----------------------------------------------------------------------------
# non-finite guard

# train.main, with Tensor.backward patched: on rank RANK at the steps in STEPS, the first micro-batch's loss is
# multiplied by NaN before its backward (the logged loss is the unscaled one, so only the gradient shows it); after
# each optimizer step the rank's own shards of the weights, flattened, go to weights_rank{r}.safetensors in out_dir
NAN_WORKER = r'''
import os, sys, torch
sys.path.insert(0, os.getcwd())  # the repository
import train
from checkpoint import local
from safetensors.torch import save_file
RANK, STEPS = int(sys.argv[1]), {int(s) for s in sys.argv[2].split(',')}
calls, orig, weights = [0], torch.Tensor.backward, {}
def backward(self, *a, **k):
    calls[0] += 1
    step = (calls[0] - 1) // 2 + 1  # 16 = 2 ranks x 2 micro-batches of 4: 2 backward calls per step per rank
    if int(os.environ.get('RANK', 0)) == RANK and step in STEPS and (calls[0] - 1) % 2 == 0:
        return orig(self * float('nan'), *a, **k)
    return orig(self, *a, **k)
step = train.optimizer_step
def optimizer_step(r, m):
    step(r, m)
    weights[f'step{len(weights) + 1}'] = torch.cat([local(p).detach().flatten() for p in r.model.parameters()])
    save_file(weights, os.path.join(r.out_dir, f"weights_rank{os.environ.get('RANK', 0)}.safetensors"))
torch.Tensor.backward, train.optimizer_step = backward, optimizer_step
train.main(sys.argv[3:])
'''


@pytest.fixture(scope='module')
def nan_run(tmp_path_factory):
    """2 ranks, a NaN gradient on rank 1 at steps 2, 4, 5 and 6, max_skips = 2: step 3 trains between two skips, and
    the third skip in a row, step 6, stops the run."""
    d = tmp_path_factory.mktemp('nan')
    (d / 'nan_worker.py').write_text(NAN_WORKER)
    p = run(TORCHRUN + [str(d / 'nan_worker.py'), '1', '2,4,5,6'] + SFT +
            ['--max_iters=8', '--max_skips=2', f'--out_dir={d / "out"}'], check=False)
    return p, d / 'out'


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_both(nan_run):
    _, out = nan_run
    ms = metrics(out)
    assert [m.get('skipped', False) for m in ms] == [False, True, False, True, True, True]
    assert ms[1]['skip_reason'] == 'non-finite grad_norm', ms[1]
    # rank 0's own gradient was finite; the reduce-scatter and the global norm told it to skip too
    with open(out / 'metrics.jsonl') as f:
        assert 'NaN' in f.read().splitlines()[1]
    for rank in range(2):  # the weights after the skipped step 2 are those after step 1, and step 3 trained again
        w = load_file(out / f'weights_rank{rank}.safetensors')
        assert torch.equal(w['step2'], w['step1']) and not torch.equal(w['step3'], w['step2']), rank
        assert torch.equal(w['step5'], w['step3']), rank
    assert ms[2]['loss'] < ms[0]['loss']  # a step that trains again


@pytest.mark.slow
def test_consecutive_skips_stop_the_run(nan_run):
    p, out = nan_run
    assert p.returncode != 0 and 'step 6: 3 steps in a row with a non-finite grad_norm (max_skips = 2)' in p.stderr
    assert [m['step'] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert not os.path.exists(out / 'ckpt'), "no checkpoint at a skipped step of a run that stops"


# -----------------------------------------------------------------------------
# preemption


def wait_for_steps(out, n, proc, timeout=60):
    t = time.time()
    while time.time() - t < timeout and proc.poll() is None:
        if os.path.exists(out / 'metrics.jsonl') and len(open(out / 'metrics.jsonl').readlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps within {timeout} s")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tmp_path):
    args = SFT + ['--max_iters=60']
    run([sys.executable, 'train.py'] + args + [f'--out_dir={tmp_path / "a"}'])
    b = tmp_path / 'b'
    p = subprocess.Popen([sys.executable, 'train.py'] + args + [f'--out_dir={b}'], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(b, 5, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    k = len(metrics(b))
    assert 5 <= k < 60 and f"step {k}: stopped by a signal" in out
    assert json.load(open(b / 'ckpt' / 'train_state.json'))['step'] == k
    run([sys.executable, 'train.py'] + args + [f'--out_dir={b}', '--init_from=resume'])
    want, got = metrics(tmp_path / 'a'), metrics(b)
    assert [m['step'] for m in got] == list(range(1, 61))
    assert [m['loss'] for m in got] == [m['loss'] for m in want]  # exact: the same process count and data


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both(tmp_path):
    p = subprocess.Popen(TORCHRUN + ['train.py'] + SFT + ['--max_iters=400', f'--out_dir={tmp_path}'], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(tmp_path, 3, p)
    workers = subprocess.run(['pgrep', '-P', str(p.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [w for w in workers if 'RANK=1' in open(f'/proc/{w}/environ').read().split('\0')]
    assert len(rank1) == 1, workers
    os.kill(int(rank1[0]), signal.SIGTERM)  # rank 0 is not told: it learns through the rendezvous store
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    k = len(metrics(tmp_path))
    assert k < 400 and json.load(open(tmp_path / 'ckpt' / 'train_state.json'))['step'] == k


def test_a_run_in_process_leaves_the_process_as_it_found_it(tmp_path):
    """train.main(argv, signals=False), as the tests and bench.py run it in their own process: its signal handlers,
    wakeup fd, torch's thread count and its threads are as they were, after a finished overlapped run and after one
    that failed once its overlap had started (metrics.jsonl cannot be written)."""
    def now():
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd)
        return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), fd, torch.get_num_threads(), \
            sorted(t.name for t in threading.enumerate())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # an overlapped cpu run halves it while it runs
    before = now()
    rl = ['config/tiny.py', '--mode=dapo', '--overlap=True', '--batch_size=2', '--max_new_tokens=8']
    assert in_process(rl + ['--max_iters=2', f'--out_dir={tmp_path}']).returncode == 0
    assert now() == before
    os.makedirs(tmp_path / 'b' / 'metrics.jsonl.tmp')  # a directory where the run writes a file
    p = in_process(rl + ['--max_iters=2', f'--out_dir={tmp_path / "b"}'])
    after = now()
    torch.set_num_threads(threads)
    assert p.returncode != 0 and 'IsADirectoryError' in p.stderr and after == before, p.stderr[-2000:]


def test_the_stop_watcher_ends_before_the_interpreter(tmp_path):
    # a daemon thread still alive when python 3.11 shuts down is ended inside its next c++ call, which aborts the
    # process ("terminate called without an active exception", SIGABRT), even at the end of a finished run.
    # a hook registered before the Preemption runs after its close, and must find no watcher left; an error's exit too
    script = (f"import atexit, sys, threading; sys.path.insert(0, {ROOT!r})\n"
              "atexit.register(lambda: print('alive at exit:', [t.name for t in threading.enumerate() if t.daemon]))\n"
              "import checkpoint\n"
              "p = checkpoint.Preemption(lambda *a: None, False, 'cpu', print)\n"
              "assert p.watcher.is_alive()\n"
              "if sys.argv[1] == 'error': raise SystemExit('config error: x')\n")
    for how, code in (('finished', 0), ('error', 1)):
        p = subprocess.run([sys.executable, '-c', script, how], env=ENV, capture_output=True, text=True, timeout=60)
        assert p.returncode == code and 'alive at exit: []' in p.stdout, (how, p.returncode, p.stdout, p.stderr[-2000:])


# -----------------------------------------------------------------------------
# kill soak: SIGKILL at seeded random moments, checkpoints every step, resume until done


def steps_logged(out) -> int:
    return len(open(out / 'metrics.jsonl').readlines()) if os.path.exists(out / 'metrics.jsonl') else 0


def test_kill_soak(tmp_path):
    kills, rng, n_steps = int(os.environ.get('SOAK_KILLS', 5)), random.Random(0), 80
    args = [sys.executable, 'train.py'] + SFT + ['--ckpt_interval=1', f'--max_iters={n_steps}', f'--out_dir={tmp_path}']
    moments, last = [], 0
    for i in range(kills):
        resume = os.path.islink(tmp_path / 'ckpt')
        p = subprocess.Popen(args + (['--init_from=resume'] if resume else []), cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 3 == 0:  # a kill during setup, at a seeded moment of its ~5 s (imports, model, checkpoint read)
            time.sleep(rng.uniform(0.5, 5.0))
        else:  # a kill once it steps: at a seeded moment of the next ~20 steps (~55 ms each with its checkpoint)
            t0, logged = time.time(), steps_logged(tmp_path)
            while steps_logged(tmp_path) == logged and p.poll() is None and time.time() - t0 < 60:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        writing, before = os.path.exists(tmp_path / 'ckpt.tmp'), steps_logged(tmp_path)
        p.kill()
        p.wait()
        if os.path.islink(tmp_path / 'ckpt'):  # every time, the checkpoint the link names loads whole
            ck = os.path.realpath(tmp_path / 'ckpt')
            step = json.load(open(os.path.join(ck, 'train_state.json')))['step']
            load_file(os.path.join(ck, 'model.safetensors'))
            checkpoint.load_checkpoint_model(ck, torch.float32)
        else:
            step = 0
        where = ('during a checkpoint write' if writing else 'before its first step' if before <= last
                 else 'during a step')
        moments.append(f"kill {i + 1}: {where}, checkpoint at step {step}")
        last = step
        if step == n_steps:
            break
    print('\n'.join(moments))
    run(args + (['--init_from=resume'] if os.path.islink(tmp_path / 'ckpt') else []))
    assert [m['step'] for m in metrics(tmp_path)] == list(range(1, n_steps + 1)), moments  # each step exactly once
    ref = tmp_path / 'ref'
    run([sys.executable, 'train.py'] + SFT + [f'--max_iters={n_steps}', f'--out_dir={ref}'])
    assert [m['loss'] for m in metrics(tmp_path)] == [m['loss'] for m in metrics(ref)]


# -----------------------------------------------------------------------------
# a checkpoint from elsewhere is data: reading it never runs code


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('target', ['state/.metadata', 'state/__0_0.distcp'])
def test_a_checkpoint_that_carries_code_is_refused_not_run(tmp_path, target):
    import pickle
    out, marker = tmp_path / 'out', tmp_path / 'pwned'
    run([sys.executable, 'train.py'] + SFT + ['--max_iters=1', f'--out_dir={out}'])
    with open(out / 'ckpt' / target, 'wb') as f:
        pickle.dump(Payload(marker), f)
    p = run([sys.executable, 'train.py'] + SFT + ['--max_iters=2', f'--out_dir={out}', '--init_from=resume'], check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and not marker.exists(), p.stderr[-2000:]
    assert err.startswith(f"{os.path.realpath(out / 'ckpt')}/state: not a readable checkpoint"), err
    with pytest.raises(SystemExit, match='not a readable checkpoint'):
        checkpoint.load_checkpoint_model(str(out / 'ckpt'), torch.float32)
    assert not marker.exists()


def test_nothing_the_project_reads_is_unpickled():
    """the only unpickling left is torch.distributed.checkpoint's metadata, through checkpoint.MetadataUnpickler."""
    import re
    for name in ['train.py', 'eval.py', 'bench.py', 'demo.py', 'plot.py', 'rewards.py', 'configurator.py']:
        src = open(os.path.join(ROOT, name)).read()
        assert 'weights_only=False' not in src and not re.search(r'torch\.load\((?![^)]*weights_only=True)', src), name
        assert not re.search(r'pickle\.loads?\(', src), name


def test_an_entry_declared_as_bytes_is_refused_not_run(tmp_path):
    """torch.distributed.checkpoint reads an entry its metadata declares as bytes with torch.load(weights_only=False):
    a checkpoint whose 'model.x' is a pickled payload must be refused before anything is read."""
    import torch.distributed.checkpoint as dcp
    marker = tmp_path / 'pwned'
    with checkpoint.single_process_ok():
        dcp.save({'model.x': Payload(marker)}, checkpoint_id=str(tmp_path / 'state'), no_dist=True)
    with pytest.raises(SystemExit, match='BytesStorageMetadata, which a checkpoint never holds'):
        checkpoint.read_state(str(tmp_path / 'state'), {'model.x': torch.zeros(2)})
    assert not marker.exists()
