"""data.py: GSM8K conversion, arithmetic problems and their traces, JSONL rows (a reasoning field, rl rows without
one), data file errors, and the bos a prompt starts with.

    python -m pytest tests/test_data.py -q
"""
import json
import os

import pytest
import torch

import data

# -----------------------------------------------------------------------------
# gsm8k conversion (two real rows of openai/grade-school-math test.jsonl, lines 147 and 655)

GSM8K = [
    {"question": "Johnny is picking up the toys on the floor of his room.  He'd dumped a lego boxed set with 500 "
                 "pieces on the floor, and another one that had 3 times more pieces than the 500 piece one, and "
                 "another one that had 1/4 the number of pieces.  How many blocks does Johnny pick up if he picks up "
                 "all the legos?",
     "answer": "The first set had 500 pieces, and the second set had 3 times as many as the first set, so the second "
               "set has 500*3=<<500*3=1500>>1500 pieces\nThe third set had one-quarter of the 500 pieces, so that "
               "means it had 500*.25= <<500*.25=125>>125 pieces\nIn total, that means Johnny picked up 500 + 1500+ "
               "125= <<500+1500+125=2125>>2125 blocks\n#### 2,125"},
    {"question": "Lori needed 1 whole egg to make 2 deviled egg halves.  She anticipates that each of her guests will "
                 "eat 3 deviled egg halves.  If she is inviting 16 guests to her party, how many dozens of eggs will "
                 "she need?",
     "answer": "She is inviting 16 guests that will eat 3 deviled egg halves each so she needs 16*3 =<<16*3=48>>48 "
               "halves\n1 whole egg is needed to make 2 halves so 48 halves is 48/2 = <<48/2=24>>24 whole eggs\n"
               "1 dozen is equal to 12 and she needs 24 eggs so she needs 24/12 = <<24/12=2>>2 dozen eggs\n#### 2"},
]


def test_gsm8k_rows_convert():
    rows = data.to_rows(GSM8K, 'question', 'answer', '', 'gsm8k')
    assert [r['answer'] for r in rows] == ['2125', '2']
    assert rows[0]['question'] == GSM8K[0]['question']
    assert rows[1]['reasoning'] == ("She is inviting 16 guests that will eat 3 deviled egg halves each so she needs "
                                    "16*3 =48 halves\n1 whole egg is needed to make 2 halves so 48 halves is 48/2 = "
                                    "24 whole eggs\n1 dozen is equal to 12 and she needs 24 eggs so she needs 24/12 "
                                    "= 2 dozen eggs")
    for r in rows:
        assert '<<' not in r['reasoning'] and '>>' not in r['reasoning'] and '####' not in r['reasoning']
    assert data.completion_text(rows[1]).endswith('dozen eggs</think><answer>2</answer>')


@pytest.mark.parametrize('bad,field,needle', [
    ({'answer': 'x #### 1'}, 'question', 'missing'),
    ({'question': 'q', 'answer': '   '}, 'answer', 'empty'),
    ({'question': 'q', 'answer': 'no final answer here'}, 'answer', 'sft needs a worked solution'),
    ({'question': 'q', 'answer': 18}, 'answer', 'int 18, expected a non-empty string'),
    ({'question': ['q'], 'answer': 'x #### 1'}, 'question', "list ['q'], expected a non-empty string"),
])
def test_gsm8k_malformed_row_names_index_and_field(bad, field, needle):
    with pytest.raises(ValueError) as e:
        data.to_rows(GSM8K + [bad], 'question', 'answer', '', 'gsm8k.jsonl')
    msg = str(e.value)
    assert 'gsm8k.jsonl' in msg and 'row 2' in msg and f"'{field}'" in msg and needle in msg, msg


def test_real_gsm8k_file_converts(tmp_path):
    src = next((p for p in ('/work/shared/data/gsm8k_train.jsonl', '/work/shared/data/gsm8k_test.jsonl')
                if os.path.isfile(p)), None)
    if src is None:
        pytest.skip('no ../shared/data/gsm8k_*.jsonl here')
    with open(src) as f:
        head = [next(f) for _ in range(200)]
    path = tmp_path / 'gsm8k.jsonl'
    path.write_text(''.join(head))
    cfg = dict(dataset=str(path), question_field='question', answer_field='answer', reasoning_field='', mode='sft')
    rows = data.load_rows(cfg, 'train')
    assert len(rows) == 200
    for i, r in enumerate(rows):
        float(r['answer'])  # every final answer is a plain number (no commas, no units)
        assert '<<' not in r['reasoning'] and r['reasoning'] and r['question'], i


# -----------------------------------------------------------------------------
# arithmetic problems: traces worked by hand, true at every step, disjoint splits


def test_arith_column_trace_worked_by_hand():
    r = data.arith_problems(1, 'train', seed=1, terms=2, digits=3, task='column')[0]
    # 675 + 445: 5+5 = 10 (carry 1), 7+4+1 = 12 (carry 1), 6+4+1 = 11, so 1120
    assert r == {'question': '675 + 445 = ?', 'reasoning': '5+5=10\n7+4+1=12\n6+4+1=11', 'answer': '1120'}


@pytest.mark.parametrize('task,terms,digits', [('chain', 4, 1), ('chain', 3, 2), ('column', 2, 3), ('column', 3, 4)])
def test_arith_traces_add_up_and_splits_are_disjoint(task, terms, digits):
    train_rows = data.arith_problems(3000, 'train', 5, terms, digits, task=task)
    test_rows = data.arith_problems(300, 'test', 5, terms, digits, task=task)
    assert not {r['question'] for r in train_rows} & {r['question'] for r in test_rows}
    for r in train_rows + test_rows:
        assert int(r['answer']) == eval(r['question'].removesuffix(' = ?'))
        lines = r['reasoning'].split('\n')
        assert len(lines) == (terms - 1 if task == 'chain' else digits)
        for line in lines:  # every step is true arithmetic
            lhs, rhs = line.split('=')
            assert eval(lhs) == int(rhs), line
        if task == 'column':  # the answer is the last column's sum, then each earlier column's last digit
            sums = [line.split('=')[1] for line in lines]
            assert r['answer'] == sums[-1] + ''.join(s[-1] for s in reversed(sums[:-1]))
        else:
            assert lines[-1].split(' = ')[1] == r['answer']


def story_numbers(question: str) -> list[int]:
    return [int(w) for w in question.replace('.', ' ').split() if w.isdigit()]


def test_arith_words_tells_the_chain_as_a_story():
    rows = data.arith_problems(3000, 'train', 5, 3, 2, task='words')
    test_rows = data.arith_problems(300, 'test', 5, 3, 2, task='words')
    # held out by the numbers: no test story's arithmetic is trained on, under any names or things
    assert not {tuple(story_numbers(r['question'])) for r in rows} & {tuple(story_numbers(r['question'])) for r in test_rows}
    for r in rows + test_rows:
        q, lines = r['question'], r['reasoning'].split('\n')
        name, thing = q.split()[0], q.split()[3].rstrip('.')
        assert q.endswith(f'How many {thing} does {name} have now?'), q
        nums, total = story_numbers(q), story_numbers(q)[0]
        assert len(lines) == 2 and len(nums) == 3
        for line, x, sentence in zip(lines, nums[1:], q.split('. ')[1:3]):  # each step is the sentence it tells
            lhs, rhs = line.split(' = ')
            op = '+' if sentence.endswith('more') else '-'
            assert lhs == f'{total} {op} {x}', (q, line)
            total = total + x if op == '+' else total - x
            assert int(rhs) == total >= 0, (q, line)  # never below 0
        assert r['answer'] == str(total)
    assert sum(' - ' in r['reasoning'] for r in rows) > len(rows) / 3  # both kinds of step
    r = data.arith_problems(1, 'train', 1, 2, 2, task='words')[0]
    assert r == {'question': 'Zoe has 81 shells. Then she sells 53. How many shells does Zoe have now?',
                 'reasoning': '81 - 53 = 28', 'answer': '28'}  # the chain's first problem of the same seed, told
    assert data.arith_problems(1, 'train', 1, 2, 2, task='chain')[0]['question'] == '81 - 53 = ?'


def test_arith_trace_frac_skips_that_share_of_traces():
    rows = data.arith_problems(4000, 'train', 0, 2, 3, trace_frac=0.3, task='column')
    shown = sum(r['reasoning'] != '' for r in rows) / len(rows)
    assert abs(shown - 0.3) < 0.03, shown  # binomial sd is 0.007
    full = data.arith_problems(4000, 'train', 0, 2, 3, trace_frac=1.0, task='column')
    assert [r['question'] for r in rows] == [r['question'] for r in full], "skipping must not change the problems"


# -----------------------------------------------------------------------------
# jsonl rows: a reasoning field, rl rows without one, errors that name the file


def test_jsonl_with_reasoning_field(tmp_path):
    path = tmp_path / 'mine.jsonl'
    path.write_text(json.dumps({'q': 'one?', 'why': ' because ', 'a': ' 1 '}) + '\n\n'
                    + json.dumps({'q': 'two?', 'why': 'b', 'a': '2'}) + '\n')
    cfg = dict(dataset=str(path), question_field='q', answer_field='a', reasoning_field='why', mode='sft')
    assert data.load_rows(cfg, 'train') == [{'question': 'one?', 'reasoning': 'because', 'answer': '1'},
                                             {'question': 'two?', 'reasoning': 'b', 'answer': '2'}]


@pytest.mark.parametrize('reasoning_field', ['', 'why'])
def test_rl_rows_need_no_reasoning(tmp_path, reasoning_field):
    """rl reads a question and a final answer; sft on the same file asks for the reasoning by name."""
    path = tmp_path / 'qa.jsonl'
    path.write_text(json.dumps({'q': 'one?', 'a': ' 1 '}) + '\n' + json.dumps({'q': 'two?', 'a': 'x #### 2'}) + '\n')
    cfg = dict(dataset=str(path), question_field='q', answer_field='a', reasoning_field=reasoning_field, mode='dapo')
    second = ({'question': 'two?', 'reasoning': '', 'answer': 'x #### 2'} if reasoning_field else
              {'question': 'two?', 'reasoning': 'x', 'answer': '2'})  # a gsm8k solution still gives its final answer
    assert data.load_rows(cfg, 'train') == [{'question': 'one?', 'reasoning': '', 'answer': '1'}, second]
    with pytest.raises(ValueError, match="row 0: field 'why' is missing" if reasoning_field else
                       "row 0: sft needs a worked solution, but field 'a' has no '####'"):
        data.load_rows(dict(cfg, mode='sft'), 'train')


@pytest.mark.parametrize('content,needle', [(None, "dataset = '{p}': no such file"), ('', "{p}: no rows"),
                                            ('\n\n', "{p}: no rows")])
def test_data_file_errors_name_the_path(tmp_path, content, needle):
    path = tmp_path / 'data.jsonl'
    if content is not None:
        path.write_text(content)
    cfg = dict(dataset=str(path), question_field='question', answer_field='answer', reasoning_field='', mode='grpo')
    with pytest.raises(ValueError) as e:
        data.load_rows(cfg, 'train')
    assert needle.format(p=path) in str(e.value), str(e.value)


# -----------------------------------------------------------------------------
# prompts start with the tokenizer's bos exactly when its post-processor adds one


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


def test_collate_packed_by_hand():
    # two sequences end to end: positions restart, keep holds the positions whose logits predict each completion token
    ids, attn, cm, (pos, keep, cu, longest, cm2) = data.collate_packed([[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]])
    assert ids.tolist() == [[5, 6, 7, 10, 11, 12, 13, 8, 9, 14]] and attn.tolist() == [[1] * 10]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2]] and cu.tolist() == [0, 7, 10] and cu.dtype == torch.int32
    assert keep.tolist() == [2, 3, 4, 5, 8] and ids[0, keep + 1].tolist() == [10, 11, 12, 13, 14]
    assert cm.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]] and cm2 is cm and longest == 7
