"""regressions for the six review findings (issue 15), one section each; every test here failed before its fix.

    python -m pytest tests/test_review.py -q
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import data
import eval as ev
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def run(args, nproc=1):
    launch = [sys.executable] + (['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                                 if nproc > 1 else [])
    p = subprocess.run(launch + ['train.py'] + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(args[-1].split('=', 1)[1], 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# 1. the rl statistics entered nccl collectives as host tensors


def test_group_sums_live_on_the_collective_device():
    groups = [{'rewards': [1.0, 0.0], 'comps': [[1, 2, 3], [4]], 'trunc': [False, True], 'correct': [True, False]},
              {'rewards': [0.5, 0.5], 'comps': [[5, 6], [7, 8, 9, 10]], 'trunc': [False, False], 'correct': [False, False]}]
    sums, mx = train.group_sums(groups, 'meta')  # the device is whatever the run's collectives use, never the host
    assert sums.device.type == 'meta' and mx.device.type == 'meta'
    sums, mx = train.group_sums(groups, 'cpu')
    # rewards 1, 0, .5, .5: sum 2, squares 1.5; 4 completions of 3+1+2+4 = 10 tokens; 1 truncated, 1 correct;
    # the second group is constant; 2 groups; longest completion 4
    assert sums.tolist() == [2.0, 1.5, 4, 10, 1, 1, 1, 2] and mx.tolist() == [4.0]


# -----------------------------------------------------------------------------
# 2. a resume turned bf16 adam moments into fp32


def adam_run(steps, path, resume_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 8, bias=False)
    w = model.weight
    opt = train.AdamW([w], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=torch.bfloat16)
    for s in range(steps):
        if s == resume_at:  # a new optimizer from the saved state, as --init_from=resume builds it
            sd = train.save_state(path, {'weight': w}, opt)
            opt = train.AdamW([w], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, state_dtype=torch.bfloat16)
            train.load_state(path, {'weight': w}, opt, sd)
        w.grad = torch.sin(w.detach() * (s + 1))
        opt.step()
    return w.detach(), opt


def test_adam_moments_keep_their_dtype_across_a_resume(tmp_path):
    w_a, opt_a = adam_run(4, str(tmp_path / 'a'))
    w_b, opt_b = adam_run(4, str(tmp_path / 'b'), resume_at=2)
    st = opt_b.state[opt_b.param_groups[0]['params'][0]]
    assert st['m'].dtype == torch.bfloat16 and st['v'].dtype == torch.bfloat16
    assert torch.equal(w_a, w_b), "the resumed run matches the uninterrupted one bit for bit"


@pytest.mark.slow
def test_bf16_moment_resume_equals_uninterrupted(tmp_path):
    args = ['config/tiny.py', '--optim_dtype=bf16', '--batch_size=8', '--max_iters=4']
    a = run(args + [f'--out_dir={tmp_path / "a"}'])
    run(args[:-1] + ['--max_iters=2', f'--out_dir={tmp_path / "b"}'])
    b = run(args + ['--init_from=resume', f'--out_dir={tmp_path / "b"}'])
    assert [m['loss'] for m in a] == [m['loss'] for m in b]  # exact: fp32 moments after a resume differed here


# -----------------------------------------------------------------------------
# 3. eval crashed when n_samples was below the largest k


def rows(n_samples, correct_per_problem):
    return [{'greedy': {'correct': c > 0, 'flex_correct': c > 0, 'truncated': False, 'answer': '1', 'length': 5},
             'samples': [{'correct': i < c, 'flex_correct': i < c} for i in range(n_samples)]} for c in correct_per_problem]


@pytest.mark.parametrize('n, ks, gap_k', [(4, [1, 8], 4), (8, [16], 8), (8, [1, 2, 16], 2), (1, [1, 8], 1)])
def test_eval_skips_k_above_n_samples(n, ks, gap_k):
    s = ev.summarize(rows(n, [0, 1, n]), ks, 0.7)
    assert s['skipped_k'] == [k for k in ks if k > n] and s['gap_k'] == gap_k
    want = s[f'pass@{gap_k}'] if gap_k > 1 else s['pass@1_sampled']
    assert s['gap'] == pytest.approx(want - 2 / 3)
    assert all(f'pass@{k}' not in s for k in ks if k > n)
    json.dumps(s)  # summary.json is written from this
    assert 'gap' in ev.table({'x': s})


# -----------------------------------------------------------------------------
# 4. prompts never got the tokenizer's bos


def hf_tokenizer(add_bos: bool):
    """a word-level fast tokenizer whose post-processor adds <s> (llama-style) or nothing (qwen-style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(['<unk>', '<s>', '</s>', 'what', 'is', '2', '+', '?', '<think>', '</think>',
                                         '<answer>', '</answer>', '4'])}
    t = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        t.post_processor = processors.TemplateProcessing(single='<s> $A </s>', special_tokens=[('<s>', 1), ('</s>', 2)])
    return data.Tokenizer(hf=PreTrainedTokenizerFast(tokenizer_object=t, bos_token='<s>', eos_token='</s>',
                                                      unk_token='<unk>'))


@pytest.mark.parametrize('add_bos', [True, False])
def test_prompt_starts_with_bos_exactly_when_the_tokenizer_adds_one(add_bos):
    tok = hf_tokenizer(add_bos)
    p = tok.encode_prompt('what is 2 + 2 ?')
    assert p == ([1] if add_bos else []) + [3, 4, 5, 6, 5, 7]  # bos only; the </s> the processor appends is not taken
    assert tok.encode_prompt('<s> what is 2') == [1, 3, 4, 5]  # a template that wrote bos is not doubled
    (ids, n_prompt), = data.tokenize_sft([{'question': 'what is 2 + 2 ?', 'reasoning': '2 + 2', 'answer': '4'}],
                                          tok, '{question}', '', 2, 64)[0]
    assert ids[:n_prompt] == p and 1 not in ids[n_prompt:]  # the completion never gets one
    assert data.Tokenizer.bytes_level().encode_prompt('hi') == list(b'hi')  # scratch tokenizer: no bos


# -----------------------------------------------------------------------------
# 5. single-gpu grpo: the reference computed in another precision than the policy, so kl != 0 at step 0


def test_reference_computes_as_the_policy_under_autocast():
    tok = data.Tokenizer.bytes_level()
    cfg = dict(init_from='scratch', n_embd=64, n_ff=128, n_layer=2, n_head=4, n_kv_head=2, seed=0)
    policy = train.build_model(dict(cfg, master_dtype='fp32'), tok).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)

    def lp(model):  # one gpu: fp32 master weights under bf16 autocast (cpu autocast stands in for cuda here)
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
            return train.token_logprobs(model, ids, attn, 12, vocab=tok.n_vocab)
    ref = train.build_model(dict(cfg, master_dtype=train.ref_dtype('fp32', cuda=True, ddp=False)), tok).eval()
    assert torch.equal(lp(ref), lp(policy))
    old = train.build_model(dict(cfg, master_dtype='bf16'), tok).eval()  # what the run loaded before the fix
    assert not torch.equal(lp(old), lp(policy))
    assert train.ref_dtype('fp32', cuda=True, ddp=True) == 'bf16'  # fsdp2's mixed precision casts both to bf16
    assert train.ref_dtype('fp32', cuda=False, ddp=True) == 'fp32'


@pytest.mark.slow
@pytest.mark.parametrize('nproc', [1, 2])
def test_grpo_kl_is_zero_at_step_one(nproc, tmp_path):
    ms = run(['config/tiny.py', '--mode=grpo', '--max_iters=1', '--batch_size=4', '--max_new_tokens=16',
              f'--out_dir={tmp_path}'], nproc=nproc)
    assert ms[0]['kl'] == 0.0


# -----------------------------------------------------------------------------
# 6. bench's qwen3b preset scored 261 vocabulary columns


def test_bench_qwen3b_preset_scores_the_real_vocabulary():
    model, tok = bench.build('qwen3b', 'meta')  # shapes only, no memory
    assert model.config.vocab_size == 151936 and tok.n_vocab == 151665  # qwen2.5's tokenizer, not the 261 bytes
