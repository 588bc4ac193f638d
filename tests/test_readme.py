"""every command README.md and docs/*.md show runs as written: each is parsed against the files, config keys and
options that exist, and the cheap ones (CPU, seconds) run. commands that need a GPU, the network or minutes are
parsed only. also: links resolve, the file map lists every top-level program with its true line count, and the
planner output the docs quote is what bench.py prints."""
import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch.distributed.run as torchrun

import configurator
import train
from test_bench import bench_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md', 'docs/results.md', 'docs/design.md']
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
RL_MODES = train.MODES[1:]


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding='utf-8') as f:
        return f.read()


def blocks(doc: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each ``` block."""
    out, inside = [], False
    for n, line in enumerate(read(doc).splitlines(), 1):
        if line.startswith('```'):
            inside = not inside
            if inside:
                out.append((n + 1, []))
        elif inside:
            out[-1][1].append(line)
    return out


def commands(doc: str) -> list[tuple[str, int, list[str]]]:
    """(doc, line, argv) of each command in the doc's ``` blocks: comments cut, `&&` chains split, VAR=x dropped."""
    out = []
    for start, lines in blocks(doc):
        for i, line in enumerate(lines):
            words = line.split()
            while words and re.fullmatch(r'[A-Z_][A-Z0-9_]*=\S*', words[0]):
                words = words[1:]
            if not words or words[0] not in ('python', 'torchrun', 'bash', 'pip'):
                continue  # program output, not a command
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r'[A-Z_][A-Z0-9_]*=\S*', argv[0]):
                argv = argv[1:]
            cmd = []
            for a in argv + ['&&']:
                if a == '&&':
                    out.append((doc, start + i, cmd))
                    cmd = []
                else:
                    cmd.append(a)
    return out


ALL = [c for d in DOCS for c in commands(d)]


def options(script: str) -> dict[str, dict]:
    """--option -> {'choices', 'type', 'flag'} from the add_argument calls in a script's source (its parsers live
    under __main__ or in main(), so they are read, not run)."""
    opts = {}
    for node in ast.walk(ast.parse(read(script))):
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'add_argument':
            kw = {k.arg: k.value for k in node.keywords}
            spec = {'choices': None, 'type': None, 'flag': False}
            with contextlib.suppress(ValueError):
                spec['choices'] = ast.literal_eval(kw['choices']) if 'choices' in kw else None
            if isinstance(kw.get('type'), ast.Name):
                spec['type'] = {'int': int, 'float': float}.get(kw['type'].id)
            if isinstance(kw.get('action'), ast.Constant):
                spec['flag'] = kw['action'].value in ('store_true', 'store_false')
            if isinstance(kw.get('nargs'), ast.Attribute) and kw['nargs'].attr == 'REMAINDER':
                spec['remainder'] = True
            for a in node.args:
                if isinstance(a, ast.Constant) and str(a.value).startswith('--'):
                    opts[a.value] = spec
    return opts


def check_train_args(args: list[str], where: str):
    """config files exist and every --key=value is a train.py setting of the right type: configurator decides."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # config paths are written relative to the repo root
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            configurator.configure({k: getattr(train, k) for k in train.config_keys}, args)
    except SystemExit as e:
        pytest.fail(f"{where}: {e}")
    finally:
        os.chdir(cwd)


def check_options(script: str, args: list[str], where: str, positional: bool = False) -> list[str]:
    """every --option is one the script's parser accepts, with a valid value; returns what follows a REMAINDER option."""
    opts, i = options(script), 0
    while i < len(args):
        a = args[i]
        if not a.startswith('--'):
            assert positional, f"{where}: {script} takes no positional argument {a!r}"
            i += 1
            continue
        name, _, val = a.partition('=')
        assert name in opts, f"{where}: {script} has no option {name} (it has {', '.join(sorted(opts))})"
        spec = opts[name]
        if spec.get('remainder'):
            return args[i + 1:]
        if not spec['flag'] and not val:
            assert i + 1 < len(args), f"{where}: {name} needs a value"
            i, val = i + 1, args[i + 1]
        if spec['type'] is not None:
            spec['type'](val)
        if spec['choices'] is not None:
            assert val in spec['choices'], f"{where}: {name} {val!r} is not one of {spec['choices']}"
        if name in ('--modes', '--mode') and script == 'demo.py':
            assert set(val.split(',')) <= set(RL_MODES), f"{where}: {val!r} names an unknown mode"
        i += 1
    return []


def script_of(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """(script, launcher options, script args) of a python / torchrun / bash command."""
    if argv[0] == 'torchrun':
        i = next(i for i, a in enumerate(argv) if a.endswith('.py'))
        return argv[i], argv[1:i], argv[i + 1:]
    return argv[1], [], argv[2:]


def is_memory_plan(argv):
    return argv[:2] == ['python', 'bench.py'] and '--memory' in argv


def is_cheap_train(argv):
    """train.py on the tiny CPU config: seconds (an rl mode runs 2 steps)."""
    return argv[:3] == ['python', 'train.py', 'config/tiny.py'] and not any('cuda' in a for a in argv)


def cid(c):
    return f"{c[0]}:{c[1]}"


@pytest.mark.parametrize('doc,line,argv', ALL, ids=[cid(c) for c in ALL])
def test_command_parses(doc, line, argv):
    where = f"{doc}:{line}: {' '.join(argv)}"
    if argv[0] == 'pip':
        assert argv[1] == 'install', where
        for i, a in enumerate(argv):
            if a == '-r':
                assert os.path.isfile(os.path.join(ROOT, argv[i + 1])), where
        return
    if argv[:3] == ['python', '-m', 'pytest']:
        valued = {'-n', '--dist', '-k', '-m', '-p'}  # options whose value is the next word
        for i, a in enumerate(argv[3:], 3):
            if not a.startswith('-') and argv[i - 1] not in valued:
                path, _, name = a.partition('::')
                assert os.path.exists(os.path.join(ROOT, path)), f"{where}: no file {path}"
                assert not name or f'def {name}(' in read(path), f"{where}: {path} has no {name}"
        return
    script, launcher, args = script_of(argv)
    assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: no file {script}"
    if argv[0] == 'torchrun':
        torchrun.get_args_parser().parse_args(launcher + [script] + args)  # its own options, as torchrun reads them
    if script == 'train.py':
        check_train_args(args, where)
    elif script == 'bench.py':
        # --memory / --rl / --update / --overlap take a train.py config and overrides, among which bench's own options
        # may follow (--repeats 2): those bench has and train.py does not
        rest, own, keys, i = check_options(script, args, where), [], {f'--{k}' for k in train.config_keys}, 0
        bench_opts = options(script)
        while i < len(rest):
            name = rest[i].partition('=')[0]
            if name in bench_opts and name not in keys:
                n = 1 if '=' in rest[i] or bench_opts[name]['flag'] else 2
                own, rest = own + rest[i:i + n], rest[:i] + rest[i + n:]
            else:
                i += 1
        check_options(script, own, where)
        if rest:
            check_train_args(rest, where)
    elif script in ('eval.py', 'demo.py', 'plot.py'):
        check_options(script, args, where, positional=script == 'plot.py')
    elif script == 'profile.sh':
        check_train_args([a for a in args if a != '--ncu'], where)
    else:
        assert script == 'gpu_check.sh' and not args, f"{where}: a command this test does not know how to check"


def test_the_two_commands_are_on_the_first_screen():
    ci = read('.ci/run').strip().splitlines()[-1]
    lines = read('README.md').splitlines()
    assert ci in lines, f"the README must show CI's test command exactly: {ci}"
    assert lines.index(ci) < 40
    assert any(c[2][:2] == ['python', 'demo.py'] and c[1] < 40 for c in commands('README.md'))
    assert any(l.startswith('| `dapo` |') for l in lines), "the modes table"
    assert sum(f'`{m}`' in ''.join(lines[:80]) for m in RL_MODES) == 3


def test_links_resolve():
    for doc in DOCS:
        for target in re.findall(r'\]\(([^)\s]+)\)', read(doc)):
            if not re.match(r'[a-z]+://', target):
                path = os.path.join(ROOT, os.path.dirname(doc), target.split('#')[0])
                assert os.path.exists(path), f"{doc}: link {target} does not resolve"


def test_file_map_is_complete_and_its_line_counts_true():
    rows = re.findall(r'^\| `([^`]+)` \| (\d*) \|', read('README.md'), re.M)
    listed = {name.rstrip('/'): n for name, n in rows}
    for name, n in listed.items():
        path = os.path.join(ROOT, name)
        assert os.path.exists(path), f"file map: {name} does not exist"
        if n:
            real = sum(1 for _ in open(path, encoding='utf-8'))
            assert abs(real - int(n)) <= 0.1 * real, f"file map: {name} has {real} lines, the README says {n}"
    programs = {f for f in os.listdir(ROOT) if f.endswith(('.py', '.sh'))}
    assert programs <= set(listed), f"file map misses {sorted(programs - set(listed))}"


# -----------------------------------------------------------------------------
# the cheap ones run


def run(argv, timeout=120):
    p = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr[-2000:]}"
    return p.stdout


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    """the README's smoke run, as written but for a temporary out_dir."""
    cmd = ['python', 'train.py', 'config/tiny.py']
    assert cmd in [c[2] for c in commands('README.md')], "the README shows the smoke run"
    out = tmp_path_factory.mktemp('smoke')
    return out, run(cmd + [f'--out_dir={out}'])


def test_smoke_run(smoke):
    out, log = smoke
    losses = [float(m) for m in re.findall(r'^step \d+/60 \| loss (\S+)', log, re.M)]
    assert len(losses) == 60, log[-2000:]
    claim = re.search(r'loss (\d+\.\d+) -> (\d+\.\d+)', read('README.md'))  # the README's figure for this run
    assert abs(losses[0] - float(claim[1])) < 0.01 and abs(losses[-1] - float(claim[2])) < 0.03, losses
    assert os.path.isdir(out / 'ckpt')


def test_cheap_rl_commands_run(tmp_path):
    cmds = [c[2] for c in commands('README.md') if is_cheap_train(c[2]) and any(a.startswith('--mode=') for a in c[2])]
    assert cmds
    for cmd in cmds:
        out = tmp_path / str(len(os.listdir(tmp_path)))
        log = run(cmd + ['--max_iters=2', f'--out_dir={out}'])
        assert re.search(r'^step 2/2 \| loss \S+ \| reward \S+', log, re.M), log[-2000:]
        rows = [json.loads(l) for l in open(out / 'metrics.jsonl')]
        assert [r['step'] for r in rows] == [1, 2] and all('reward_mean' in r for r in rows)


def test_plot_commands_run(smoke):
    out, _ = smoke
    cmds = [c[2] for c in ALL if c[2][:2] == ['python', 'plot.py']]
    assert cmds
    pytest.importorskip('matplotlib')
    assert all(not a.startswith('--') for c in cmds for a in c[2:]), "a plot option: run it here too"
    run(['python', 'plot.py', str(out)])  # the run dirs they name need a finished run: the smoke run's stands in
    assert (out / 'curves.png').stat().st_size > 1000


def plan(argv) -> str:
    """bench.py's memory planner in this process (pure arithmetic; the imports are the cost)."""
    return bench_main(argv[2:])


@pytest.fixture(scope='module')
def plans():
    cmds = {tuple(c[2]) for c in ALL if is_memory_plan(c[2])}
    assert cmds
    return {c: plan(list(c)) for c in sorted(cmds)}


def test_memory_plans_run(plans):
    for cmd, out in plans.items():
        assert re.search(r'needs: .* -> this config (fits|does NOT fit) in \d+ GiB', out), (cmd, out)
        assert 'largest micro_batch_size that fits' in out, (cmd, out)


def test_the_planner_output_the_docs_quote_is_what_it_prints(plans):
    quoted = [lines for doc in DOCS for _, lines in blocks(doc)
              if any(l.lstrip().startswith(('needs:', "the seed's 2 x RTX 4090")) for l in lines)]
    assert quoted
    for lines in quoted:  # the header names the HF cache's state, which differs between machines
        body = [l for l in lines if l.strip() and not l.startswith('memory plan:')]
        outs = [o.splitlines() for o in plans.values()]
        assert any(all(l in o for l in body) for o in outs), \
            "no planner command prints this block:\n" + '\n'.join(l for l in body if not any(l in o for o in outs))


def test_modes_table_matches_the_code():
    rows = {m: l for l in read('README.md').splitlines() for m in RL_MODES if l.startswith(f'| `{m}` |')}
    assert set(rows) == set(RL_MODES)
    for m in RL_MODES:
        c = train.mode_defaults({**{k: getattr(train, k) for k in train.config_keys}, 'mode': m})
        assert f"| {c['eps_low']} / {c['eps_high']} |" in rows[m], (m, c['eps_low'], c['eps_high'])
        assert ('none' if m != 'dapo' else f"-{c['overlong_penalty']} when truncated") in rows[m].split('|')[-2]
    assert f"beta {train.beta}" in rows['grpo'] and "r - mean |" in rows['dr_grpo']
