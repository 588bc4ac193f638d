"""configurator.py, called directly: unknown names with a did-you-mean, type checks, bool and list parsing, config
files that are missing or raise, which rank prints the overrides; plus three end-to-end train.py errors."""
import pytest

from configurator import configure


def defaults():
    return {'learning_rate': 1e-5, 'max_iters': 1000, 'batch_size': 64, 'dataset': 'openai/gsm8k',
            'activation_checkpointing': True, 'stop_strings': ['</answer>'], 'anything': None}


def fail(cfg, argv) -> str:
    with pytest.raises(SystemExit) as e:
        configure(cfg, argv)
    assert isinstance(e.value.code, str), "errors exit with a message (non-zero status), not a bare code"
    return e.value.code


def write(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -----------------------------------------------------------------------------
# unknown keys


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, 'learnig_rate = 1e-3\n')
    cfg = defaults()
    msg = fail(cfg, [path])
    assert path in msg and "'learnig_rate'" in msg and "did you mean 'learning_rate'" in msg, msg
    assert cfg == defaults(), "nothing may be applied from a file with an unknown key"


def test_unknown_key_in_argv_names_argv_key_and_suggestion():
    msg = fail(defaults(), ['--max_itres=5'])
    assert 'argv' in msg and "'max_itres'" in msg and "did you mean 'max_iters'" in msg, msg


def test_unknown_key_message_names_the_value(tmp_path):
    # every error names source, key *and value*
    msg = fail(defaults(), ['--learnig_rate=0.123'])
    assert '0.123' in msg, msg
    msg = fail(defaults(), [write(tmp_path, 'learnig_rate = 0.456\n')])
    assert '0.456' in msg, msg


def test_unknown_key_without_close_match_has_no_suggestion():
    msg = fail(defaults(), ['--zzzzzz=1'])
    assert "'zzzzzz'" in msg and 'did you mean' not in msg, msg


# -----------------------------------------------------------------------------
# types


@pytest.mark.parametrize('raw', ['abc', '1.5', "'8'", 'True'])
def test_wrong_type_in_argv_names_key_value_and_type(raw):
    msg = fail(defaults(), [f'--max_iters={raw}'])
    assert 'argv' in msg and 'max_iters' in msg and raw.strip("'") in msg and 'int' in msg, msg


def test_wrong_type_in_file_names_file_key_value_and_type(tmp_path):
    path = write(tmp_path, "batch_size = '8'\n")
    msg = fail(defaults(), [path])
    assert path in msg and 'batch_size' in msg and "'8'" in msg and 'int' in msg and 'str' in msg, msg


def test_int_accepted_for_float_in_argv_and_file(tmp_path):
    cfg = defaults()
    configure(cfg, ['--learning_rate=1'])
    assert cfg['learning_rate'] == 1.0 and type(cfg['learning_rate']) is float
    configure(cfg, [write(tmp_path, 'learning_rate = 3\n')])
    assert cfg['learning_rate'] == 3.0 and type(cfg['learning_rate']) is float


def test_float_rejected_for_bool():
    msg = fail(defaults(), ['--learning_rate=True'])
    assert 'learning_rate' in msg and 'float' in msg, msg


@pytest.mark.parametrize('raw,want', [('true', True), ('false', False), ('True', True), ('False', False),
                                      ('1', True), ('0', False)])
def test_bools_parse(raw, want):
    cfg = defaults()
    configure(cfg, [f'--activation_checkpointing={not want}', f'--activation_checkpointing={raw}'])
    assert cfg['activation_checkpointing'] is want


@pytest.mark.parametrize('raw', ['yes', 'no', '2', 'TRUE', ''])
def test_bad_bool_errors(raw):
    msg = fail(defaults(), [f'--activation_checkpointing={raw}'])
    assert 'activation_checkpointing' in msg and repr(raw) in msg and 'bool' in msg, msg


@pytest.mark.parametrize('raw,want', [('3', 3), ('2.5', 2.5), ("['a']", ['a']), ('hello', 'hello'), ('None', None)])
def test_none_default_accepts_any_type(raw, want):
    cfg = defaults()
    configure(cfg, [f'--anything={raw}'])
    assert cfg['anything'] == want and type(cfg['anything']) is type(want)


# -----------------------------------------------------------------------------
# argv syntax


def test_value_splits_on_first_equals_only():
    cfg = defaults()
    configure(cfg, ['--dataset=a=b'])
    assert cfg['dataset'] == 'a=b'


def test_strings_need_no_quotes():
    cfg = defaults()
    configure(cfg, ['--dataset=data/my file.jsonl'])
    assert cfg['dataset'] == 'data/my file.jsonl'


def test_key_without_equals_errors():
    msg = fail(defaults(), ['--max_iters'])
    assert 'argv' in msg and '--max_iters' in msg and '--key=value' in msg, msg


def test_list_setting_parses():
    cfg = defaults()
    configure(cfg, ["--stop_strings=['</answer>','\\n\\n']"])
    assert cfg['stop_strings'] == ['</answer>', '\n\n']


def test_later_sources_override_earlier(tmp_path):
    cfg = defaults()
    changed = configure(cfg, [write(tmp_path, 'max_iters = 7\nbatch_size = 8\n'), '--max_iters=9'])
    assert cfg['max_iters'] == 9 and cfg['batch_size'] == 8
    assert changed == {'max_iters': 9, 'batch_size': 8}


# -----------------------------------------------------------------------------
# config files


def test_missing_config_file_errors(tmp_path):
    path = str(tmp_path / 'nope.py')
    msg = fail(defaults(), [path])
    assert path in msg and 'not found' in msg, msg


def test_config_file_that_raises_names_file_and_error(tmp_path):
    path = write(tmp_path, 'max_iters = 1 // 0\n')
    msg = fail(defaults(), [path])
    assert path in msg and 'ZeroDivisionError' in msg, msg


def test_config_file_may_import_and_define_private_names(tmp_path):
    path = write(tmp_path, 'import math\n_steps = 12\ndef _f(x):\n    return x\n'
                           'max_iters = int(math.sqrt(_steps * 12))\nlearning_rate = _f(2e-4)\n')
    cfg = defaults()
    changed = configure(cfg, [path])
    assert cfg['max_iters'] == 12 and cfg['learning_rate'] == 2e-4
    assert set(changed) == {'max_iters', 'learning_rate'}


# -----------------------------------------------------------------------------
# printing


def test_overrides_printed_on_rank0(capsys, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    configure(defaults(), ['--max_iters=5'])
    assert 'max_iters = 5' in capsys.readouterr().out


def test_overrides_silent_on_other_ranks(capsys, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    cfg = defaults()
    configure(cfg, ['--max_iters=5'])
    assert cfg['max_iters'] == 5 and capsys.readouterr().out == ''


# -----------------------------------------------------------------------------
# end to end: train.py exits non-zero with one line, no traceback


@pytest.mark.parametrize('args,needles', [
    (['--learnig_rate=1'], ['learnig_rate', 'learning_rate']),
    (['--mode=ppo'], ['mode', 'ppo']),
    (['--batch_size=10', '--micro_batch_size=4'], ['batch_size (10)', '4']),
    (['--arith_task=columns'], ['arith_task', "'columns'", "'column'"]),
    (['--R1_TAGS=hello'], ['unknown setting', 'R1_TAGS']),  # module globals are not settings
    (['--MODES=(1,)'], ['unknown setting', 'MODES']),
    (['--config_keys=[]'], ['unknown setting', 'config_keys']),
    (['--learning_rate=-1'], ['learning_rate = -1', '>= 0']),
    (['--beta2=1.5'], ['beta2 = 1.5', '[0, 1)']),
])
def test_train_py_rejects_bad_settings(run_train, tmp_path, args, needles):
    p = run_train(['config/tiny.py', f'--out_dir={tmp_path / "out"}'] + args, check=False)
    err = p.stderr.strip()
    assert p.returncode != 0
    assert 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not (tmp_path / 'out').exists(), "a rejected config must not create out_dir"


def test_train_py_rejects_more_tokens_than_the_model_has_positions(run_train, tmp_path):
    p = run_train(['config/tiny.py', '--mode=dapo', '--max_new_tokens=100000', f'--out_dir={tmp_path / "out"}'],
                  check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and 'Traceback' not in err and len(err.splitlines()) == 1, err
    assert 'max_new_tokens = 100000' in err and 'the model has 4096' in err, err
