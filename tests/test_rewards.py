"""Table-driven tests for rewards.py: extraction, strict grading, penalties, adversarial inputs.

    python -m pytest tests/test_rewards.py -q
"""
import re
import threading
import time

import pytest

from rewards import extract_answer, extract_flexible, gsm8k_gold, is_correct, overlong_penalty, reward, truncation_penalty


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs), asserting that the call took well under a second of this thread's cpu time: a runaway
    parse burns it, while other processes on a loaded machine (the suite's torchrun ranks) only stretch the wall
    clock (1.08 s of wall time once, for a call that takes 2 ms alone)."""
    t = time.thread_time()
    out = fn(*args, **kwargs)
    assert time.thread_time() - t < 1.0, (fn.__name__, args[0][:40])
    return out


EXTRACT = [
    ('<think>2+2</think><answer>4</answer>', '4'),
    ('so 2+2 is four</think>\n<answer> 4 </answer>\n', '4'),  # the prompt opened <think>
    ('<think>reasoning <answer>4</answer>', None),  # never closed </think>: no answer
    ('<think><answer>4</answer></think>', None),  # an answer inside the reasoning never counts
    ('<think><answer>4</answer></think><answer>5</answer>', '5'),
    ('a</think>b</think><answer>7</answer>', '7'),  # after the last </think>
    ('</think><answer>7</answer></think>', None),
    ('</think><answer>1</answer><answer>2</answer>', '2'),  # the last complete pair
    ('</think><answer>1</answer><answer>2', '1'),
    ('</think><answer>  \n </answer>', None),
    ('</think>42', None),
    ('', None),
    ('</think><answer>\\boxed{3}</answer>', '\\boxed{3}'),
    ('</think><answer><answer>x</answer>', 'x'),
]


@pytest.mark.parametrize('completion,expected', EXTRACT)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


FLEXIBLE = [  # lm-evaluation-harness's flexible extract: the tag, else the last \\boxed{}, else the last number
    ('<think>2+2</think><answer>4</answer> 7', '4'), ('so 3 and then 4.', '4'), ('\\boxed{\\frac12} then 9', '\\frac12'),
    ('It costs $1,234, ok', '1,234'), ('a loss of -5', '-5'), ('no numbers', None), ('\\boxed{}', None),
    ('<think>7</think><answer>', '7'),
]


@pytest.mark.parametrize('completion,expected', FLEXIBLE)
def test_extract_flexible(completion, expected):
    assert extract_flexible(completion) == expected


VEC = '\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}'  # MATH500 golds
MAT = '\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}'
CORRECT = [
    # gsm8k: exact rationals, no tolerance
    ('18', '18', True), ('18.0', '18', True), ('18.00', '18', True), ('18.', '18', True), ('$18', '18', True),
    ('18 dollars', '18', True), ('18 cm', '18', True), ('\u22123', '-3', True), ('+18', '18', True),
    ('2125', '2,125', True), ('$2,125.00', '2,125', True), ('114200', '114,200', True),
    ('1,234,567', '1234567', True), ('1,23', '123', False), ('18.5', '18', False), ('180', '18', False),
    ('-18', '18', False), ('17.999999999', '18', False),
    # hedging: several candidates for one value
    ('17 or 18', '18', False), ('17, 18', '18', False), ('17 and 18', '18', False), ('17/18', '18', False),
    ('18; 17', '18', False), ('x = 1, x = -2', '1', False),
    # fractions and decimals: a decimal is exact as written
    ('\\frac{1}{2}', '0.5', True), ('1/2', '\\frac12', True), ('0.5', '\\frac{1}{2}', True),
    ('\\frac12', '\\dfrac{1}{2}', True), ('0.333', '\\frac{1}{3}', False),
    ('0.3333333333333333', '\\frac{1}{3}', False), ('\\frac{3}{20}', '0.15', True),
    ('\\tfrac{14}{3}', '\\frac{14}{3}', True), ('\\frac{43}{1}', '\\frac43', False),
    ('\\frac{5}{9}', '\\frac 59', True), ('\\frac{9}{19}', '\\frac9{19}', True),
    ('6.72 \\times 10^{-5}', '.0000672', True), ('18.9', '\\$18.90', True), ('\\frac{9}{5}', '1\\frac{4}{5}', True),
    ('\\frac{4}{5}', '1\\frac{4}{5}', False), ('137.5', '137 \\frac{1}{2}', True),
    # radicals, pi, complex: irrational values compare within 1e-9 relative
    ('2\\sqrt{3}', '\\sqrt{12}', True), ('\\sqrt{12}', '3\\sqrt{2}', False), ('\\sqrt{4}', '2', True),
    ('11\\sqrt{2}', '11\\sqrt2', True), ('\\frac{1}{\\sqrt{3}}', '\\frac{\\sqrt{3}}{3}', True),
    ('0.5773502691896258', '\\frac{\\sqrt{3}}{3}', False), ('\\pi/2', '\\frac{\\pi}{2}', True),
    ('-\\pi/6', '-\\frac{\\pi}{6}', True), ('3.14159', '\\pi', False), ('2\\pi', '\\pi', False),
    ('\\sqrt{117}', '3\\sqrt{13}', True), ('2 \\cdot 2^{2004}', '2^{2005}', True), ('-\\infty', '\\infty', False),
    ('\\sqrt[3]{-8}', '-2', True), ('\\log_2 8', '3', True), ('5!', '120', True), ('|-3|', '3', True),
    ('e^{i\\pi}', '-1', True), ('-5i+6', '6 - 5i', True), ('6+5i', '6 - 5i', False), ('1+274i', '1+274i', True),
    ('i^2', '-1', True),
    # percent, degrees, units, money, thousands separators
    ('20', '20\\%', True), ('0.2', '20\\%', False), ('10%', '10\\%', True), ('90', '90^\\circ', True),
    ('90^{\\circ}', '90^\\circ', True), ('90\u00b0', '90^\\circ', True), ('\\frac{\\pi}{2}', '90^\\circ', False),
    ('\\frac{270}{7}', '\\frac{270}7\\text{ degrees}', True), ('864', '864 \\mbox{ inches}^2', True),
    ('5.4', '5.4 \\text{ cents}', True), ('36', '\\$36', True), ('10080', '10,\\!080', True),
    ('10,080', '10,\\!080', True), ('11111111100', '11,\\! 111,\\! 111,\\! 100', True),
    ('32,348', '\\$32,\\!348', True), ('10{,}080', '10080', True), ('10\\,080', '10080', True),
    ('10 080', '800', False), ('18cm', '18', True), ('5 apples', '5', True), ('5 m', '5', False),
    # assignments and equations
    ('x = 5', '5', True), ('5', 'x=5', True), ('x=6', 'x=5', False), ('y = 3 + 2x', 'y = 2x + 3', True),
    ('2x+3', 'y = 2x + 3', True), ('y = 2x + 4', 'y = 2x + 3', False),
    ('-5x + 7y - 11z - 4 = 0', '5x - 7y + 11z + 4 = 0', True), ('5x - 7y + 11z = 4', '5x - 7y + 11z + 4 = 0', False),
    ('2x + y = 0', 'y = -2x', True), ('\\theta = \\frac{\\pi}{4}', '\\frac{\\pi}{4}', True),
    # intervals keep brackets, tuples keep order, unions are sets of intervals
    ('[-2, 7]', '[-2,7]', True), ('(-2,7)', '[-2,7]', False), ('[-2,7]', 'x \\in [-2,7]', True),
    ('(-\\infty, 3]', '(-\\infty,3]', True), ('(-\\infty, 3)', '(-\\infty,3]', False),
    ('(2, \u221e)', '(2,\\infty)', True), ('(6,31,-1)', '(6,31,-1)', True), ('(-1,6,31)', '(6,31,-1)', False),
    ('6,31,-1', '(6,31,-1)', False),
    ('\\left(3, \\frac{\\pi}{2}\\right)', '\\left( 3, \\frac{\\pi}{2} \\right)', True),
    ('(3, \\pi)', '\\left( 3, \\frac{\\pi}{2} \\right)', False),
    ('(\\frac35, \\frac83]', '\\left(\\frac{3}{5},\\frac{8}{3}\\right]', True),
    ('(9,36) \\cup (0,9)', '(0,9) \\cup (9,36)', True), ('(0,36)', '(0,9) \\cup (9,36)', False),
    # unordered solution lists, \pm
    ('-2, 1', '1,-2', True), ('x=1 or x=-2', '-2,1', True), ('1', '1,-2', False), ('1, -2, 3', '1,-2', False),
    ('3, 5, 7', '3, 5, 7', True), ('-2, 1+\\sqrt5, 1-\\sqrt5', '\\{1\\pm\\sqrt{5},-2\\}', True),
    ('1+\\sqrt{19}, 1-\\sqrt{19}', '1 \\pm \\sqrt{19}', True), ('1+\\sqrt{19}', '1 \\pm \\sqrt{19}', False),
    ('3, 5, and 7', '3, 5, 7', True), ('7, 5, 3', '3, 5, 7', True),
    # text answers and multiple choice
    ('evelyn', '\\text{Evelyn}', True), ('\\textbf{Evelyn}.', '\\text{Evelyn}', True),
    ('Navin', '\\text{Evelyn}', False), ('East', '\\text{east}', True), ('C', '\\text{(C)}', True),
    ('(c)', '\\text{(C)}', True), ('B', '\\text{(C)}', False), ('neve', '\\text{even}', False),
    # matrices element-wise, a column vector also as a tuple
    ('\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}', VEC, True),
    ('\\begin{pmatrix} 1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}', VEC, False),
    ('(-7, 16, 5)', '\\begin{pmatrix} -7 \\\\ 16 \\\\ 5 \\end{pmatrix}', True),
    ('\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}', MAT, True),
    ('\\begin{pmatrix} -1 & 0 \\\\ -1 & 0 \\end{pmatrix}', MAT, False),
    # expressions with free variables, compared at random points
    ('x^2 + 10 + 7x', 'x^2+7x+10', True), ('x^2 + 10 + 6x', 'x^2+7x+10', False), ('-q + p', 'p - q', True),
    ('q - p', 'p - q', False), ('(x-1)(x^4+x^2+1)', 'x^5 - x^4 + x^3 - x^2 + x - 1', True), ('2(k+1)', '2k+2', True),
    ('ab + 2a + 5b + 10', '(a+5)(b+2)', True), ('\\frac{9a+11}{20}', '\\frac{11+9a}{20}', True),
    ('3r^2', '3R^2', False), ('\\frac{\\cos x}{\\sin x}', '\\cot x', True), ('\\tan x', '\\cot x', False),
    ('0.5x', '\\frac{x}{2}', True), ('0.333x', '\\frac{x}{3}', False),
    # base-n numerals: the digits, never the decimal value
    ('52', '52_8', True), ('52_{8}', '52_8', True), ('42', '52_8', False), ('4210_5', '4210_{5}', True),
    # boxed, wrappers, junk
    ('\\boxed{\\frac{14}{3}}', '\\frac{14}{3}', True), ('so \\boxed{5} then \\boxed{6}', '6', False),  # two values
    ('$\\displaystyle \\frac{3}{56}$', '\\frac{3}{56}', True), (None, '5', False), ('', '5', False),
    ('five', '5', False), ('10^{10^{10}}', '1', False),
    # how models write answers: a sentence around one number, bold, an equation chain that ends in
    # the value, a parenthetical, degrees, e-notation, brace-less latex, a unicode root
    ('The answer is 5', '5', True), ('She makes $18 every day.', '18', True), ('The total is 1,234 dollars.', '1234', True),
    ('**18**', '18', True), ('The answer is **18**.', '18', True), ('5 * 3 + 3 = 18', '18', True),
    ('x = 15 + 3 = 18', '18', True), ('Total = $18', '18', True), ('18 (9 + 9)', '18', True),
    ('18 (dollars)', '18', True), ('90\u00b0', '90', True), ('90 \u00b0', '90', True), ('1.8e1', '18', True),
    ('2E3', '2000', True), ('1.5e-3', '0.0015', True), ('1.5e-3', '0.015', False), ('3\\sqrt13', '3\\sqrt{13}', True),
    ('3\u221a13', '3\\sqrt{13}', True), ('\u221a2/2', '\\frac{\\sqrt2}{2}', True), ('3\\sqrt13', '39', False),
    # ... but never a hedge, a wrong chain, or a sentence that echoes the question's numbers
    ('She has 17 or 18 apples', '18', False), ('18 (or 17)', '18', False), ('3 + 4 = 8', '8', False),
    ('x = 17 = 18', '18', False), ('x + 1 = 5', '5', False), ('Janet has 16 eggs and eats 3', '13', False),
    ('16 - 3 = 13 eggs, so 26', '26', False), ('**17** or **18**', '18', False), ('e5', '5', False),
    # digits never join across a space, and a parenthetical with letters is a factor, not a comment
    ('10 080', '10080', False), ('5 2', '52_8', False), ('2 (x+1)', '2', False), ('2 (x+1)', '2x+2', True),
]


@pytest.mark.parametrize('answer,gold,expected', CORRECT)
def test_is_correct(answer, gold, expected):
    assert timed(is_correct, answer, gold) is expected


# when the words around a number change its meaning the answer is wrong: RL optimises any false positive.
# Each answer holds the gold's number, and the words turn it into something else.
DISGUISED = {
    'negated': ['not 18', 'The answer is not 18', 'never 18', 'no 18', 'not quite 18', 'It is not 18.', '**not** 18',
                '\\text{not } 18', 'not \\boxed{18}', 'not 18 dollars', '\\neg 18', 'The answer is 18, not'],
    'signed in words': ['negative 18', 'minus 18', 'The answer is negative 18', 'neg 18', '18 below zero',
                        '18 degrees below zero', '18 in debt', '18 short'],
    'inequality': ['less than 18', 'at least 18', 'over 18', 'more than 18', 'under 18', '>= 18', '\u2265 18', '< 18',
                   '\\geq 18', '\\le 18', '\\approx 18', '\u2248 18', '\\sim 18', '~18', '~ 18', 'roughly 18',
                   'about 18', 'approximately 18', 'almost 18', 'nearly 18', 'around 18', 'up to 18', 'close to 18',
                   'fewer than 18', '18 or more', '18 or less', '18 at most', '18 at least', '18+', '18 or so', '18ish',
                   '18-ish', '18 tops', '18 max', '18 upwards', '18 and up', 'about 18 dollars', 'ca. 18'],
    'scaled': ['18 thousand', '18 dozen', '18 squared', 'half of 36', 'twice 9', '18 percent of 50', '18 million',
               '18 hundred', '18 cubed', 'a third of 54', 'double 9', '18 thousands', '18 tens', '18 times',
               '18 hundredths', '18 sixths', '18 halves', '18 grand', 'the square of 18', '18 score', '18 k',
               '18 billion dollars', '18 dozen eggs', '18-fold', '18 \\text{ thousand}', '18 feet squared',
               '18 square'],
    'split': ['1 8', '1,8', '1 8.0', '1. 8', '18 18', '1 8 dollars', 'The answer is 1 8.', '\\boxed{1}\\boxed{8}'],
    'disowned': ['12 (wrong)', '18 (wrong)', '18 (incorrect)', '18 (I think)', '18 (not sure)', '18? no, 17',
                 '18, not 18', '18 (or 17)', '18 (17)', '18 (maybe)', '18 (approx.)', '18?', '18 dollars (wrong)',
                 '18 \\quad \\text{(wrong)}', '\\boxed{18} (wrong)', '18 -- wrong', '18 (not 17)', 'maybe 18',
                 '18 perhaps', 'I think 18', 'probably 18', 'Janet has 18'],
    'hedged': ['17 or 18', '18 or 17', '18 or 18', '18, 18', '18 and 18', 'so \\boxed{17} then \\boxed{18}', '18; 17',
               '\\boxed{17} or \\boxed{18}', '18 \\pm 1', '17-18', '18 and a half'],
}


@pytest.mark.parametrize('kind', DISGUISED)
def test_disguised_number_is_wrong(kind):
    for answer in DISGUISED[kind]:
        nums = re.findall(r'\d+(?:\.\d+)?', answer)
        for gold in {nums[0], nums[-1], ''.join(nums)}:  # 12 (wrong) for 12, 18? no, 17 for both, 1 8.0 for 18.0
            assert timed(is_correct, answer, gold) is False, (answer, gold)


ACCEPTED = {  # words that cannot change the number, as models write them
    'framing': ['18', 'The answer is 18.', 'the answer is 18', 'So the answer is 18', 'so 18', 'Answer: 18',
                'The final answer is: 18', 'Thus, 18', 'Therefore, the answer is 18.', 'Total = $18', 'Total cost = 18',
                'The total is 18 dollars.', 'It costs $18.', 'She makes $18 every day.', 'There are 18 students left.',
                'A total of 18 cookies', 'He needs 18', 'x = 18', 'x = 15 + 3 = 18', '18 exactly'],
    'units': ['18 dollars', '$18', '$18.00', '18 apples', '18 cm', '18cm', '18 cm^2', '18 square feet', '18 sq ft',
              '18 cubic meters', '18 dollars per hour', '$18 a day', '18 each', '18 in total', '18 in all',
              '18 years old', '18 feet long', '18 people', '18 minutes', '18 pages', '18 \\text{ dollars}',
              '18~\\text{cm}'],
    'parenthetical': ['18 (dollars)', '18 (in total)', '18 (9 + 9)', '18 (2 \\cdot 9)', '18 (18)',
                      '18 dollars (9 + 9)'],
    'markup': ['**18**', 'The answer is **18**.', '\\boxed{18}', 'The answer is $\\boxed{18}$.', '\\(\\boxed{18}\\)',
               '\\[ 18 \\]', '\\text{The answer is } 18', '18.0', '1.8e1'],
    'percent is a unit': ['18%', '18\\%', '18 percent', '18 per cent'],
}


@pytest.mark.parametrize('kind', ACCEPTED)
def test_framed_number_is_right(kind):
    for answer in ACCEPTED[kind]:
        assert timed(is_correct, answer, '18') is True, answer


MEANING = ['not', 'no', 'never', 'negative', 'minus', 'about', 'around', 'roughly', 'approximately', 'approx', 'almost',
           'nearly', 'over', 'under', 'above', 'below', 'least', 'most', 'more', 'less', 'fewer', 'max', 'up to',
           'at least', 'at most', 'more than', 'less than', 'or more', 'or less', 'thousand', 'thousands', 'million',
           'billion', 'hundred', 'hundreds', 'dozen', 'dozens', 'score', 'grand', 'squared', 'cubed', 'times', 'twice',
           'double', 'triple', 'half', 'halves', 'third', 'thirds', 'quarter', 'tenths', 'ish', 'odd', 'tops', 'maybe',
           'perhaps', 'probably', 'possibly', 'wrong', 'incorrect', 'false', 'guess', 'estimate', 'circa', 'upwards',
           'short', 'off', 'square of', 'half of', 'ten', 'tens', 'ones', 'twenties', 'sixths', 'nope']
TEMPLATES = ['{w} 18', '18 {w}', 'The answer is {w} 18', 'The answer is 18 {w}.', '{w} 18 dollars', '18 dollars {w}',
             '18 ({w})', '\\boxed{{18}} {w}', '{w} \\boxed{{18}}', '**{w}** 18', '18 {w} apples', 'Total = {w} 18']


@pytest.mark.parametrize('word', MEANING)
def test_any_meaning_word_around_the_number_is_wrong(word):
    for template in TEMPLATES:
        answer = template.format(w=word)
        assert is_correct(answer, '18') is False, answer
        assert is_correct(answer.replace('18', '\\frac{3}{4}'), '\\frac34') is False, answer


@pytest.mark.parametrize('prefix', ['', 'The answer is ', 'So ', 'Answer: ', 'Thus, the final answer is ', 'Total = ',
                                    'She has ', 'It costs $', 'In total, there are '])
def test_every_allowed_framing_is_right(prefix):
    suffixes = ['', '.', ' dollars', ' apples', ' cm', ' in total', ' (dollars)', ' (9 + 9)', ' each', ' dollars per hour']
    for suffix in suffixes:
        for number in ('18', '**18**', '\\boxed{18}', '18.00'):
            assert is_correct(f'{prefix}{number}{suffix}', '18') is True, f'{prefix}{number}{suffix}'
            assert is_correct(f'{prefix}{number}{suffix}', '17') is False, f'{prefix}{number}{suffix}'


ADVERSARIAL = [
    'a' * 10_000_000, '<answer>' * 100_000, '<answer>' * 100_000 + '1' + '</answer>' * 100_000,
    '{' * 100_000 + '1' + '}' * 100_000, '{' * 400 + '1' + '}' * 400, '</think>' * 100_000 + '<answer>1</answer>',
    '\x00' * 1000 + '1', '\ud800 1 \udfff', '9^{9^{9^{9}}}', '2^{99999}', '(2^{60000})(2^{60000})', '1000!!',
    '-' * 999 + '1', '2^' * 300 + '2', '(' * 1000, '\\sqrt' * 190 + '{4}', '1,' * 400 + '1', '\\pm' * 300,
    '1\\pm 2' * 150, '\\boxed{' * 50_000, ' ab' * 30_000 + ' 5', '\\begin{pmatrix}' + '1 & ' * 200 + '\\end{pmatrix}',
    '(1,2) \\cup ' * 100, '\\text{' * 1000, '=' * 500, '.' * 100_000, '\u2212' * 1000 + '\u03c0' * 100, 'x^{100000}',
    '\\tan(\\pi/2)', '\\log 0', '\\infty - \\infty', '1/0', '|' * 1000, 'x_' * 400 + 'x', '\\sin' * 200 + 'x',
    '\\frac' * 200 + '12', '1+' * 499 + '1', 'x^x^x^x^x^x^x^x^x', 'the ' * 999 + '18', '18' + ' dollars' * 500,
    '18 (' + '9+' * 450 + '0)', '1' + 'a' * 3990, '18 (' + '{' * 1900 + '}' * 1900 + ')', '18' + ' a' * 1900,
]


@pytest.mark.parametrize('text', ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_is_bounded(text):
    for gold in ('1', 'x^2+7x+10', text[:2000]):
        assert timed(is_correct, text, gold) in (True, False) and timed(is_correct, gold, text) in (True, False)
        assert timed(reward, text, gold, format_reward=0.1) in (0.0, 0.1, 1.0)
        assert timed(reward, f'</think><answer>{text}</answer>', gold) in (0.0, 1.0)
        assert timed(truncation_penalty, text, True) in (0.0, -0.5)
        timed(extract_answer, text)


@pytest.mark.parametrize('answer,gold,expected', [
    ('*'.join(['(x/y)^{4000}(y/x)^{4000}'] * 40), '1', True),  # big exact rationals at every random point
    ('+'.join(['x^{3000}/y^{3000}'] * 55), '0', False),
    ('x^{2005} + 1', '1 + x^{2005}', True),
], ids=['big-product', 'big-sum', 'x^2005'])
def test_big_exact_arithmetic_is_bounded(answer, gold, expected):
    assert timed(is_correct, answer, gold) is expected


def test_deep_but_valid_input_still_grades():
    assert is_correct('1+' * 400 + '1', '401') and not is_correct('-' * 999 + '1', '1')


def test_is_correct_from_worker_thread():
    cases = CORRECT[::5] + [('1+' * 400 + '1', '401', True)]  # rewards may be computed off the main thread
    results = []
    worker = threading.Thread(target=lambda: results.extend(is_correct(a, g) for a, g, _ in cases))
    worker.start()
    worker.join(timeout=30)
    assert results == [expected for _, _, expected in cases] == [is_correct(a, g) for a, g, _ in cases]


REWARD = [
    ('<think>r</think><answer>4</answer>', '4', 0.0, 1.0),
    ('<think>r</think><answer>4</answer>', '4', 0.2, 1.0),  # the format bonus never stacks on a correct answer
    ('<think>r</think>\n<answer>5</answer>\n', '4', 0.2, 0.2),  # well formed but wrong
    ('<think>r</think><answer>5</answer>', '4', 0.0, 0.0),  # format reward is off by default
    ('<think>r</think><answer>5</answer> trailing', '4', 0.2, 0.0),
    ('<think>r</think>text<answer>5</answer>', '4', 0.2, 0.0),
    ('<think>r</think><answer>3</answer><answer>4</answer>', '4', 0.2, 1.0),  # correct, not well formed
    ('<think>r</think><answer>3</answer><answer>5</answer>', '4', 0.2, 0.0),
    ('r</think>x</think><answer>5</answer>', '4', 0.2, 0.0),  # two </think>
    ('<think>r<answer>4</answer>', '4', 0.2, 0.0),  # never closed the reasoning
    ('<think>r</think><answer> </answer>', '4', 0.2, 0.0),
]


@pytest.mark.parametrize('completion,gold,format_reward,expected', REWARD)
def test_reward(completion, gold, format_reward, expected):
    assert reward(completion, gold, format_reward=format_reward) == expected


@pytest.mark.parametrize('length,factor,expected', [
    (0, 1.0, 0.0), (80, 1.0, 0.0), (81, 1.0, -0.05), (90, 1.0, -0.5), (95, 2.0, -1.5), (99, 1.0, -0.95),
    (100, 1.0, -1.0), (130, 1.0, -1.0), (90, 0.5, -0.25), (130, 3.0, -3.0),
])
def test_overlong_penalty(length, factor, expected):
    assert overlong_penalty(length, 100, buffer=20, factor=factor) == pytest.approx(expected, abs=1e-12)


def test_overlong_penalty_off_and_default_factor():
    assert overlong_penalty(500, 100, buffer=0) == 0.0 and overlong_penalty(500, 100, buffer=-5) == 0.0
    assert overlong_penalty(90, 100, buffer=20) == -0.5


@pytest.mark.parametrize('completion,truncated,penalty,expected', [
    ('<think>long reasoning that never ends', True, 0.5, -0.5),
    ('<think>long reasoning that never ends', False, 0.5, 0.0),  # stopped on its own: other rewards handle it
    ('<think>r</think><answer>4</answer>', True, 0.5, 0.0),  # truncated after answering
    ('<think>r</think><answer>4', True, 0.3, -0.3),
    ('<think>r</think><answer></answer>', True, 1.0, -1.0),
])
def test_truncation_penalty(completion, truncated, penalty, expected):
    assert truncation_penalty(completion, truncated, penalty=penalty) == expected


@pytest.mark.parametrize('solution,expected', [
    ('Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72', '72'),
    ('The total is 2,125 dollars.\n#### 2,125', '2125'),
    ('x #### 1 then #### 114,200 ', '114200'),
    ('#### -3', '-3'),
])
def test_gsm8k_gold(solution, expected):
    assert gsm8k_gold(solution) == expected


def test_gsm8k_gold_without_marker():
    with pytest.raises(ValueError, match="no '####' in solution: 'The answer is 42'"):
        gsm8k_gold('The answer is 42')
