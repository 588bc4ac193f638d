r"""Answer extraction and strict, bounded-time answer checking for R1-style RL rewards, standard library only.

    python -m pytest tests/test_rewards.py -q
    python -c "import rewards; print(rewards.is_correct('0.5', r'\frac12'), rewards.is_correct('17 or 18', '18'))"

When the words around a number can change what it means, the answer is wrong. Only words that cannot change it
are accepted, and only from fixed lists of what may surround it: framing before the value (`The answer is`, `so`,
`Total =`, `she makes`: _FRAME), units after it (a listed unit such as cm, or a plain plural noun such as dollars or
apples that is no number word such as thousands or thirds: _UNITS, _QUANTITY), `$`, `%`, bold, \boxed, a trailing
period, and a final parenthetical that names a unit or restates the value (`18 (9 + 9)`). Any other word stays in
the answer, which then fails to parse: `not 18`, `about 18`, `at least 18`, `18 thousand`, `half of 36`, `12 (wrong)`.
Percent is a unit, so 18% and 18 percent are 18, as 20\% is 20 and never 0.2. Digits never join across a space (1 8).

Equivalence is decided in this order: equal normalised strings; words as words (case-insensitive);
base-n numerals by their digits; equations up to a non-zero constant factor; otherwise both sides are
parsed by a small recursive-descent parser (never eval) and evaluated, exactly with Fraction while the
value is rational, else as complex floats within a relative 1e-9, and at 5 random rational points when
there are free variables. Unordered lists compare as multisets, tuples and intervals in order with their
brackets, and a list never matches a single value (hedging). Any internal error means "not correct".
"""
from __future__ import annotations

import cmath
import functools
import math
import operator
import random
import re
from fractions import Fraction

MAX_INPUT = 100_000  # chars: longer answers or golds are never correct and are not scanned at all
MAX_MATH = 1_000  # chars of a normalised answer we are willing to parse
MAX_DEPTH = 50  # bracket nesting: keeps the recursive parser far from python's recursion limit
MAX_ITEMS = 32  # elements of an unordered list, since matching them is quadratic
MAX_BITS = 50_000  # size of an exact numerator or denominator: 10^{10^{10}} fails at once, and big gcds stay cheap
REL_TOL = 1e-9  # relative tolerance once a value is irrational or complex; rationals compare exactly
POINTS = 5  # random rational points at which expressions with free variables are compared

Value = Fraction | complex

# -----------------------------------------------------------------------------
# tags, rewards and penalties

def extract_answer(completion: str) -> str | None:
    """The stripped content of the last complete <answer>...</answer> after the last </think>, or None."""
    # the prompt may open <think> itself; no </think> at all means the model never finished reasoning,
    # and an <answer> inside the reasoning never counts
    think = completion.rfind('</think>')
    end = completion.rfind('</answer>', think) if think >= 0 else -1
    start = completion.rfind('<answer>', think, end) if end >= 0 else -1
    if start < 0:
        return None
    return completion[start + len('<answer>'):end].strip() or None


def extract_flexible(completion: str) -> str | None:
    """lm-evaluation-harness's flexible GSM8K extract when there is no <answer> tag: the last \\boxed{}, else the last
    number of the completion. eval.py reports it next to the strict score; the RL reward stays strict."""
    if (ans := extract_answer(completion)) is not None:
        return ans
    if box := _last_box(completion):
        return completion[box[1] + 1:box[2]].strip() or None
    nums = re.findall(r'-?\d[\d,]*(?:\.\d+)?', completion)
    return nums[-1].rstrip(',') if nums else None


def _well_formed(completion: str) -> bool:
    """Exactly one </think>, then nothing but whitespace around exactly one non-empty <answer>...</answer>."""
    if completion.count('</think>') != 1:
        return False
    tail = completion[completion.find('</think>') + len('</think>'):].strip()
    return (tail.startswith('<answer>') and tail.endswith('</answer>') and tail.count('<answer>') == 1
            and tail.count('</answer>') == 1 and tail[len('<answer>'):-len('</answer>')].strip() != '')


def reward(completion: str, gold: str, *, format_reward: float = 0.0) -> float:
    """1.0 if the answer is correct, else format_reward if the completion is well formed, else 0.0.

    The format bonus never stacks on a correct answer, so 1.0 stays the maximum whatever format_reward is."""
    if is_correct(extract_answer(completion), gold):
        return 1.0
    return float(format_reward) if _well_formed(completion) else 0.0


def overlong_penalty(length: int, max_len: int, *, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13): a ramp to -factor over the last buffer tokens."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    return -float(factor) if length >= max_len else -factor * (length - (max_len - buffer)) / buffer


def truncation_penalty(completion: str, truncated: bool, *, penalty: float = 0.5) -> float:
    """-penalty for a completion cut off at max_new_tokens before it gave an answer, else 0.0."""
    return -float(penalty) if truncated and extract_answer(completion) is None else 0.0


def gsm8k_gold(solution: str) -> str:
    """The number after the final '####' of a GSM8K solution, commas removed."""
    k = solution.rfind('####')
    if k < 0:
        raise ValueError(f"no '####' in solution: {solution[:80]!r}")
    return solution[k + 4:].replace(',', '').strip()

# -----------------------------------------------------------------------------
# normalisation: one canonical spelling of an answer string

_UNICODE = str.maketrans({**{chr(c): ' ' for c in range(32)}, '\x7f': ' ', '\u00a0': ' ', '\u2212': '-',
                          '\u00d7': '*', '\u00b7': '*', '\u22c5': '*', '\u00f7': '/', '\u00b0': '',
                          '\u03c0': '\\pi ', '\u221e': '\\infty ', '\u221a': '\\sqrt'})
_WRAPPER = re.compile(r'\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}')
_MACROS = {'left': '', 'right': '', 'displaystyle': '', 'circ': '', 'degree': '', 'dfrac': '\\frac', 'tfrac': '\\frac',
           'cdot': '*', 'times': '*', 'div': '/', 'langle': '(', 'rangle': ')', 'quad': ' ', 'qquad': ' '}
_RULES = [(re.compile(p), r) for p, r in [
    (r'\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])', ''),  # 90^\circ, 90^{\circ}
    (r'\\(?:left|right)\.', ''),  # the invisible delimiter of \left. x \right|
    (r'\\([a-zA-Z]+)', lambda m: _MACROS.get(m[1], m[0])),
    (r'(?<=\d)(?:,\\!|\{,\}|\\,)\s*(?=\d{3}(?!\d))', ''),  # thousands: 10,\!080 (MATH), 10{,}080, 10\,080
    (r'\*\*(.+?)\*\*', r'\1'),  # markdown bold; a lone 2**3 stays a power
    (r'\\?[%$]', ''),  # 20\% is 20, never 0.2
    (r'\\[,;:! ()\[\]]|~(?=[A-Za-z\\])', ' '),  # spacing, \( \[ delimiters, the tie in 18~cm; ~18 is about 18: kept
    (r'\\frac\s*(\d)\s*(\d)', r'\\frac{\1}{\2}'),  # \frac43, \frac 59: tex reads one digit per argument
    (r'\\frac\s*(\d)', r'\\frac{\1}'),  # \frac9{19}
    (r'\\frac\s*(\{[^{}]*\})\s*(\d)', r'\\frac\1{\2}'),  # \frac{270}7
    (r'\\sqrt\s*(\d+)', r'\\sqrt{\1}'),  # 11\sqrt2; models write 3\sqrt13 (and 3√13) for 3\sqrt{13}, not tex's 3\sqrt{1}3
    (r'(?<![\w.])(\d+\.?\d*|\.\d+)[eE]([-+]?\d+)(?![\w.])', r'\1*10^{\2}'),  # e-notation: 1.5e-3, 2E6
    (r'\s+', ' '),
]]
_IN_SET = re.compile(r'[A-Za-z]\s*\\in(?![a-zA-Z])\s*')  # x \in [-2,7]
_THOUSANDS = re.compile(r'[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?')  # 1,234,567 but not 1,23 or (6,31,-1)
_HEDGE = re.compile(r',?\s+(?:or|and)\s+|\s*;\s*')  # "17 or 18" becomes a list, which never matches one value


def _last_box(s: str) -> tuple[int, int, int] | None:
    """Start, opening brace and closing brace of the last \\boxed{...} or \\fbox{...} with balanced braces, or None."""
    i = max(s.rfind('\\boxed'), s.rfind('\\fbox'))
    j = s.find('{', i)
    if i < 0 or j < 0 or s[i:j].strip() not in ('\\boxed', '\\fbox'):
        return None
    depth = 0
    for k in range(j, len(s)):
        depth += (s[k] == '{') - (s[k] == '}')
        if depth == 0:
            return i, j, k
    return None


def _normalise(s: str) -> str:
    """s with its last box opened, less \\left, \\text, $, %, degrees, spacing, framing, units and thousands commas."""
    s = s.translate(_UNICODE)
    if box := _last_box(s):  # the words around a box still count: not \boxed{18} is no 18
        s = f'{s[:box[0]]} {s[box[1] + 1:box[2]]} {s[box[2] + 1:]}'
    if len(s) > 4 * MAX_MATH:  # nothing this long normalises to under MAX_MATH: leave it for is_correct to reject
        return s
    s = s.replace('\\\\', '\x01')  # \x01 keeps matrix rows apart
    for _ in range(3):  # \text{\textbf{x}} unwraps from the inside out
        s = _WRAPPER.sub(r'\1', s)
    for pattern, repl in _RULES:
        s = pattern.sub(repl, s)
    s = s.strip().rstrip('.').strip()
    s = _unframe(s[m.end():] if (m := _IN_SET.match(s)) else s)
    return _HEDGE.sub(', ', s.replace(',', '') if _THOUSANDS.fullmatch(s) else s)

# -----------------------------------------------------------------------------
# framing: the only words an answer may put around its value; any other word stays, and the answer fails to parse

_FRAME = set("""the a an answer final result total sum value amount number count cost price is are was were be will
it this that so thus therefore hence then there which now still equals equal to comes makes made has have had needs
needed gets got earns earned costs pays paid spends spent saves saved sells sold buys bought scored ran she he they we
you her his their our my in all of altogether exactly correct""".split())
_UNITS = set("""dollar cent buck euro pound yen rupee percent degree radian second sec secs min mins minute hour hr hrs
day week month year inch in foot feet ft yard yd yds mile mi cm mm km meter metre kg kgs gram mg lb lbs oz ounce ton
ml liter litre gallon cup pint quart mph unit piece pcs point people person child children man men woman women fish
sheep deer mice geese am pm""".split())
_TAIL = {'each', 'total', 'left', 'remaining', 'altogether', 'overall', 'apiece', 'all', 'exactly', 'old', 'long',
         'tall', 'wide', 'deep'}
_LINKS = {'per', 'a', 'an', 'of', 'every', 'square', 'cubic', 'sq'}  # 18 a day, 18 square feet: never last
_QUANTITY = set("""zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion
trillion zillion dozen score gross grand lakh crore half third fourth quarter fifth eighth ninth twelfth time top odd
perhaps always sometimes besides thereabouts""".split())  # and their plurals and fractions: 18 tens, 18 sixths, 18 tops
_LEAD = re.compile(r'([A-Za-z]+)(?:\s*[:,=]\s*|\s+)(?=\S)')  # the answer is: 18, total = 18
_TRAIL = re.compile(r'(?:\s|(?<=\d))([A-Za-z]+)(\^\{?\d\}?)?$')  # 18 dollars, 864 inches^2, 18cm


def _is_unit(w: str) -> bool:
    """A listed unit, or a plain plural noun (apples, pages) that is no number word (thousands, tenths, twenties)."""
    plural = len(w) > 3 and w.endswith('s') and not w.endswith(('ss', 'us', 'is', 'wards'))  # less, minus, upwards
    stems = {w, w[:-1], w[:-2], w[:-3], w[:-3] + 'y', w[:-3] + 'f', w[:-5] + 'y'}  # tops sixes tenths halves twentieths
    return w in _UNITS or plural and not stems & _QUANTITY


def _strip_units(s: str) -> str:
    """s without the units and tail words after its last number: 18 dollars a day in total is 18."""
    after = ''  # the word stripped before, which follows this one: 18 a is 18a, and square needs a unit after it
    for _ in range(8):
        m = _TRAIL.search(s)
        w = m[1].lower() if m else ''
        link = w in _LINKS and after and (w not in ('square', 'cubic', 'sq') or _is_unit(after))
        if not (m and re.search(r'\d', s[:m.start()]) and (_is_unit(w) or not m[2] and (w in _TAIL or link))):
            break
        s, after = s[:m.start()].rstrip(), w
    return s


def _restates(a: str, b: str) -> bool:
    """b is a formula for the same constant as a: 18 (9 + 9)."""
    if len(b) > MAX_MATH or _depth(b)[0] > MAX_DEPTH:
        return False
    pa, pb = _parse(a), _parse(b)
    return bool(pa and pb) and not (pa[1] or pb[1]) and _agree(pa[0], pb[0], frozenset(), ('.' in a, '.' in b))


def _unframe(s: str) -> str:
    """s without the framing words before its value and the units or restating parenthetical after it."""
    while (m := _LEAD.match(s)) and m[1].lower() in _FRAME and (len(m[1]) > 1 or s[m.end()].isalpha()):
        s = s[m.end():]  # "a" leads only into a word: a total of 18, but a 18 is 18a
    k = s.rfind(' (')
    if s.endswith(')') and k > 0 and not re.search(r'[()]', s[k + 2:-1]):  # 18 (dollars), 18 (9 + 9); 2 (x+1) stays
        core, note = s[:k], s[k + 2:-1]
        if _strip_units(f'{core} {note}') == _strip_units(core) or _restates(_strip_units(core), note):
            s = core
    return _strip_units(s)

# -----------------------------------------------------------------------------
# parser: tokens -> expression tree of tuples, e.g. ('+', ('num', Fraction(1)), ('var', 'x'))

_FUNCS = {'sin': cmath.sin, 'cos': cmath.cos, 'tan': cmath.tan, 'cot': lambda z: 1 / cmath.tan(z),
          'sec': lambda z: 1 / cmath.cos(z), 'csc': lambda z: 1 / cmath.sin(z), 'arcsin': cmath.asin,
          'arccos': cmath.acos, 'arctan': cmath.atan, 'exp': cmath.exp, 'ln': cmath.log,
          'log': cmath.log10}  # a bare \log is base 10, as in the AMC problems MATH comes from
_CONSTS = {'pi': 'pi', 'infty': 'inf', 'inf': 'inf', 'infinity': 'inf'}
_CONST_VALUES = {'pi': complex(math.pi), 'e': complex(math.e), 'i': 1j, 'inf': complex(math.inf)}
_NAMES = set(_FUNCS) | set(_CONSTS) | {'sqrt'}  # words that may appear without a backslash
_GREEK = {'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'varepsilon', 'zeta', 'eta', 'theta', 'vartheta', 'kappa',
          'lambda', 'mu', 'nu', 'xi', 'rho', 'sigma', 'tau', 'phi', 'varphi', 'chi', 'psi', 'omega'}
_CLOSE = {'(': ')', '{': '}', '[': ']', '|': '|'}
_TOKEN = re.compile(r'\s*(?:(\d+\.?\d*|\.\d+)|\\([a-zA-Z]+)|\\?([{}|])|([a-zA-Z]+)|([-+*/^_()\[\]!]))')


def _tokens(s: str) -> list[tuple[str, str]]:
    """('num' | 'cmd' | 'var' | 'op', text); a run of 3+ letters that is no known name is prose, not maths."""
    out, pos, s = [], 0, s.strip()
    while pos < len(s):
        if (m := _TOKEN.match(s, pos)) is None:
            raise ValueError(f'cannot read {s[pos:pos + 10]!r}')
        num, cmd, brace, word, op = m.groups()
        if num or cmd:
            out.append(('num', num) if num else ('cmd', cmd))
        elif brace or op:
            out.append(('op', brace or op))
        elif word in _NAMES:
            out.append(('cmd', word))
        elif len(word) <= 2:  # 2xy is 2*x*y, but "and" must not become a*n*d
            out += [('var', c) for c in word]
        else:
            raise ValueError(f'word {word!r} in a formula')
        pos = m.end()
    return out


def _mixed(left: tuple, right: tuple) -> tuple:
    """2\\frac{1}{2} is the mixed number 5/2 when both are integer literals, any other juxtaposition multiplies."""
    whole = left[1] if left[0] == 'neg' else left
    if right[0] == '/' and all(n[0] == 'num' and n[1].denominator == 1 for n in (whole, right[1], right[2])):
        return ('neg', ('+', whole, right)) if left[0] == 'neg' else ('+', whole, right)
    return ('*', left, right)


class _Parser:
    """expr := term (+|- term)*; term := factor (*|/|juxtaposed factor)*; factor := (+|-)* atom !* [^ factor]."""

    def __init__(self, s: str):
        self.toks, self.i, self.vars = _tokens(s), 0, set()

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ('end', '')

    def skip(self, value: str) -> bool:
        """Consume the next token if it is value."""
        found = self.peek()[1] == value
        self.i += found
        return found

    def expect(self, value: str) -> None:
        if not self.skip(value):
            raise ValueError(f'expected {value!r}, got {self.peek()[1]!r}')

    def expr(self) -> tuple:
        node = self.term()
        while (op := self.peek()[1]) in ('+', '-'):
            self.i += 1
            node = (op, node, self.term())
        return node

    def term(self) -> tuple:
        node = self.factor()
        while True:
            kind, val = self.peek()
            if self.skip('*') or self.skip('/'):
                node = (val, node, self.factor())
            elif kind == 'num' and self.toks[self.i - 1][0] == 'num':
                raise ValueError('two numbers in a row')  # "10 080" or "17 18" is no product
            elif kind in ('num', 'var', 'cmd') or val in ('(', '{'):
                node = _mixed(node, self.factor()) if val == 'frac' else ('*', node, self.factor())
            else:
                return node

    def factor(self) -> tuple:
        negative = False
        while (sign := self.peek()[1]) in ('+', '-'):  # a loop, not recursion: ------1 must not hit the recursion limit
            negative ^= sign == '-'
            self.i += 1
        node = self.atom()
        while self.skip('!'):
            node = ('fn', 'fact', node)
        if self.skip('^'):
            node = ('^', node, self.factor())
        return ('neg', node) if negative else node

    def atom(self) -> tuple:
        kind, val = self.peek()
        self.i += 1
        if kind == 'num':
            return ('num', Fraction(val))
        if kind == 'var' and val in ('i', 'e'):
            return ('const', val)
        if kind == 'var' or (kind == 'cmd' and val in _GREEK):
            if self.skip('_'):  # x_1, a_{n}; a_{n+1} is beyond us, and a repr here would grow exponentially
                sub = self.atom()
                if sub[0] not in ('num', 'var'):
                    raise ValueError('compound subscript')
                val = f'{val}_{sub[1]}'
            self.vars.add(val)
            return ('var', val)
        if kind == 'op' and val in _CLOSE:  # (x), {x}, [x], |x|
            node = self.expr()
            self.expect(_CLOSE[val])
            return ('fn', 'abs', node) if val == '|' else node
        if val == 'frac':  # a tex argument is a braced group or a single token, which is what atom() reads
            return ('/', self.atom(), self.atom())
        if val == 'sqrt':
            index = ('num', Fraction(2))
            if self.skip('['):
                index = self.expr()
                self.expect(']')
            return ('^', self.atom(), ('/', ('num', Fraction(1)), index))
        if kind == 'cmd' and val in _CONSTS:
            return ('const', _CONSTS[val])
        if kind != 'cmd' or val not in _FUNCS:
            raise ValueError(f'unexpected {val!r}')
        base = self.atom() if val == 'log' and self.skip('_') else None
        power = self.atom() if self.skip('^') else None  # \sin^2 x
        if self.peek()[1] in ('(', '{'):
            arg = self.atom()
        else:  # \sin 2x is sin(2x); the product stops at the next function, as in \sin x \cos x
            arg = self.factor()
            while self.peek()[0] in ('num', 'var') or (self.peek()[0] == 'cmd' and self.peek()[1] not in _FUNCS):
                arg = ('*', arg, self.factor())
        node = ('/', ('fn', 'ln', arg), ('fn', 'ln', base)) if base else ('fn', val, arg)
        return ('^', node, power) if power else node


@functools.lru_cache(maxsize=1024)  # repeats within one list match; small, since trees of long answers are big
def _parse(s: str) -> tuple[tuple, frozenset[str]] | None:
    """Expression tree and free variable names of s, or None when s is not a formula we can read."""
    try:
        p = _Parser(s)
        tree = p.expr()
        return (tree, frozenset(p.vars)) if p.i == len(p.toks) else None
    except (ValueError, RecursionError):
        return None

# -----------------------------------------------------------------------------
# evaluation: Fraction while exact, complex otherwise

_OPS = {'+': operator.add, '-': operator.sub, '*': operator.mul, '/': operator.truediv}


def _root(x: Fraction, q: int) -> Fraction | None:
    """The exact rational q-th root of x (real, so odd q for negative x), or None."""
    n, d = abs(x.numerator), x.denominator
    if q > 64 or (x < 0 and q % 2 == 0) or max(n.bit_length(), d.bit_length()) > 1000:
        return None
    roots = []
    for v in (n, d):
        r = math.isqrt(v) if q == 2 else round(v ** (1 / q))
        roots.append(next((c for c in (r - 1, r, r + 1) if c >= 0 and c ** q == v), None))
    return None if None in roots else Fraction(roots[0], roots[1]) * (-1 if x < 0 else 1)


def _pow(a: Value, b: Value) -> Value:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if b.denominator == 1:
            if max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(b.numerator) > MAX_BITS:
                raise OverflowError('power too large')
            return a ** b.numerator
        if (r := _root(a, b.denominator)) is not None:
            return _pow(r, Fraction(b.numerator))
        if a < 0 and b.denominator % 2:  # the real odd root: (-8)^(1/3) is -2, not cmath's principal value
            return complex((-1) ** (b.numerator % 2) * float(-a) ** float(b))
    if abs(complex(b)) > 10_000:
        raise OverflowError('power too large')
    return complex(a) ** complex(b)


def _eval(node: tuple, env: dict[str, Fraction]) -> Value:
    op = node[0]
    if op in ('num', 'var', 'const'):
        return node[1] if op == 'num' else env[node[1]] if op == 'var' else _CONST_VALUES[node[1]]
    if op == 'neg':
        return -_eval(node[1], env)
    if op == 'fn':
        x = _eval(node[2], env)
        if node[1] == 'abs':
            return abs(x) if isinstance(x, Fraction) else complex(abs(x))
        if node[1] == 'fact':
            if not (isinstance(x, Fraction) and x.denominator == 1 and 0 <= x <= 1000):
                raise ValueError('factorial needs an integer in [0, 1000]')
            return Fraction(math.factorial(int(x)))
        return _FUNCS[node[1]](complex(x))
    x, y = _eval(node[1], env), _eval(node[2], env)
    v = _pow(x, y) if op == '^' else _OPS[op](x, y)
    if isinstance(v, Fraction) and max(v.numerator.bit_length(), v.denominator.bit_length()) > MAX_BITS:
        raise OverflowError('exact value too large')
    return v


def _close(x: Value, y: Value, dec_x: bool = False, dec_y: bool = False) -> bool:
    """Exact for two rationals; a decimal never equals an irrational; else within a relative REL_TOL."""
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    if (isinstance(x, Fraction) and dec_x) or (isinstance(y, Fraction) and dec_y):
        return False  # 1.41421356 is not \sqrt{2} and 3.14159 is not \pi, however many digits are written
    x, y = complex(x), complex(y)
    if x == y:
        return True
    return cmath.isfinite(x) and cmath.isfinite(y) and abs(x - y) <= REL_TOL * max(abs(x), abs(y), 1e-3)


@functools.lru_cache(maxsize=1024)
def _points(names: frozenset[str]) -> tuple[dict[str, Fraction], ...]:
    """Rational points, so polynomials still compare exactly; a fixed seed gives the same reward every time."""
    rng = random.Random(0)
    return tuple({n: Fraction(rng.randint(1, 200), rng.randint(1, 31)) for n in sorted(names)}
                 for _ in range(POINTS if names else 1))


def _agree(fa: tuple, fg: tuple, names: frozenset[str], decimals: tuple[bool, bool], scaled: bool = False) -> bool:
    """fa equals fg wherever both are defined, at 2+ random rational points when there are variables.

    With scaled, fa must be one non-zero constant times fg: that is when two equations lhs - rhs = 0 agree."""
    ratio, good = None, 0
    for env in _points(names):
        try:
            x, y = _eval(fa, env), _eval(fg, env)
            if scaled and (_close(x, Fraction(0)) or _close(y, Fraction(0))):
                if _close(x, Fraction(0)) != _close(y, Fraction(0)):
                    return False
                continue
            ratio = (x / y if ratio is None else ratio) if scaled else 1
            same = _close(x, ratio * y, *decimals)
        except (ArithmeticError, ValueError):  # outside a domain at this point (1/0, log 0): try the next
            continue
        if not same:
            return False
        good += 1
    return good >= (2 if names else 1)

# -----------------------------------------------------------------------------
# structure: lists, tuples, intervals, unions, matrices

_MATRIX = re.compile(r'\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}')
_ASSIGN = re.compile(r'(?:[A-Za-z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*=')
_BASE = re.compile(r'(\d[0-9A-Za-z]*)_\{?(\d+)\}?')
_WORDS = re.compile(r'\(([A-Za-z])\)|[A-Za-z]+(?: [A-Za-z]+)*')


def _split(s: str, sep: str = ',') -> list[str]:
    """Split at separators outside any (), [] or {}."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(s):
        depth += (ch in '([{') - (ch in ')]}')
        if ch == sep and depth == 0:
            parts.append(s[start:k].strip())
            start = k + 1
    return parts + [s[start:].strip()]


def _depth(s: str) -> tuple[int, int]:
    """Deepest and lowest bracket nesting seen while reading s left to right."""
    depth = deepest = lowest = 0
    for ch in s:
        depth += (ch in '([{') - (ch in ')]}')
        deepest, lowest = max(deepest, depth), min(lowest, depth)
    return deepest, lowest


def _expand(items: list[str]) -> list[str]:
    """1 \\pm \\sqrt{19} is the two solutions 1 + \\sqrt{19} and 1 - \\sqrt{19}."""
    out, todo = [], items[::-1]
    while todo and len(out) <= MAX_ITEMS:
        x = todo.pop()
        if (m := re.search(r'\\(pm|mp)(?![a-zA-Z])', x)) is None:
            out.append(x)
        else:
            todo += [x[:m.start()] + sign + x[m.end():] for sign in (('+', '-') if m[1] == 'pm' else ('-', '+'))]
    return out


def _structure(s: str) -> tuple:
    """('matrix', rows) | ('union', parts) | ('seq', brackets, items) | ('list', items), items as strings."""
    if m := _MATRIX.fullmatch(s):
        return ('matrix', [_split(row, '&') for row in _split(m[1], '\x01') if row])
    if '\\cup' in s:
        return ('union', [_structure(p.strip()) for p in s.split('\\cup')])
    if s.startswith('\\{') and s.endswith('\\}'):
        return ('list', _expand(_split(s[2:-2])))
    # (1,2] is one interval, but (a+5)(b+2) is a product: the first bracket must close at the very end
    if s[:1] in ('(', '[') and s[-1:] in (')', ']') and _depth(s[1:-1])[1] >= 0 and len(items := _split(s[1:-1])) > 1:
        return ('seq', s[0] + s[-1], items)
    return ('list', _expand(_split(s)))


def _multiset(xs: list, ys: list, eq) -> bool:
    left = list(xs)
    if len(xs) != len(ys) or len(xs) > MAX_ITEMS:
        return False
    for y in ys:
        if (k := next((k for k, x in enumerate(left) if eq(x, y)), None)) is None:
            return False
        left.pop(k)
    return True


def _pairwise(xs: list[str], ys: list[str]) -> bool:
    return len(xs) == len(ys) and all(map(_item_equal, xs, ys))


def _vector(x: tuple) -> list[str] | None:
    """A parenthesised tuple, or a single-row or single-column matrix, as a flat list of entries."""
    if x[0] == 'seq' and x[1] == '()':
        return x[2]
    if x[0] == 'matrix' and (len(x[1]) == 1 or all(len(r) == 1 for r in x[1])):
        return [c for r in x[1] for c in r]
    return None


def _match(a: tuple, g: tuple) -> bool:
    """Answer structure against gold structure."""
    if a[0] == g[0] == 'list':
        return _multiset(a[1], g[1], _item_equal)
    if a[0] == g[0] == 'seq':  # tuples and intervals: same brackets, same order
        return a[1] == g[1] and _pairwise(a[2], g[2])
    if a[0] == g[0] == 'union':
        return all(p[0] == 'seq' for p in a[1] + g[1]) and _multiset(a[1], g[1], _match)
    if a[0] == g[0] == 'matrix':
        return len(a[1]) == len(g[1]) and all(map(_pairwise, a[1], g[1]))
    if {a[0], g[0]} == {'matrix', 'seq'}:  # a column vector may be written as (1, 2, 3)
        va, vg = _vector(a), _vector(g)
        return va is not None and vg is not None and _pairwise(va, vg)
    return False


def _is_text(s: str) -> bool:
    m = _WORDS.fullmatch(s)
    return m is not None and (m[1] is not None or any(len(w) > 2 and w.lower() not in _NAMES for w in s.split()))


def _chain_value(a: str) -> str:
    """The last side of an equation chain whose sides all agree, after an optional label (x =), else a.

    3 + 4 = 8 offers two values (7 and 8), and x + 1 = 5 says nothing about x: both stay as they are, and fail."""
    sides = [x.strip() for x in a.split('=')]
    if _ASSIGN.fullmatch(sides[0] + '='):
        sides = sides[1:]
    trees = [_parse(x) for x in sides]
    if any(t is None or t[1] for t in trees):
        return a
    last = trees[-1][0]
    return sides[-1] if all(_agree(t[0], last, frozenset(), (False, False)) for t in trees[:-1]) else a


def _squash(s: str) -> str:
    """s without spaces, except between two digits: 1 8 is no 18."""
    return re.sub(r'(?<!\d) | (?!\d)', '', s)


def _item_equal(a: str, g: str) -> bool:
    """One normalised answer element against one normalised gold element."""
    if _squash(a) == _squash(g):
        return True
    if _is_text(a) or _is_text(g):  # words compare as words, never as products of one-letter variables
        return ' '.join(a.strip('()').lower().split()) == ' '.join(g.strip('()').lower().split())
    if base := _BASE.fullmatch(_squash(g)):  # 52_8: accept 52 or 52_{8}, never the decimal value 42
        digits, _, sub = _squash(a).partition('_')
        return digits.lower() == base[1].lower() and sub.strip('{}') in ('', base[2])
    if a.count('=') == g.count('=') == 1:  # two equations: 2x - y + 3 = 0 is the line y = 2x + 3
        sides = [_parse(x) for x in a.split('=') + g.split('=')]
        if None not in sides and (names := frozenset().union(*(p[1] for p in sides))):
            if _agree(('-', sides[0][0], sides[1][0]), ('-', sides[2][0], sides[3][0]), names, (False, False), True):
                return True
    if '=' in a and '=' not in g:  # x = 15 + 3 = 18 and "total = 18" answer 18
        a = _chain_value(a)
    a, g = [s[m.end():].strip() if (m := _ASSIGN.match(s)) and s.count('=') == 1 else s for s in (a, g)]
    pa, pg = ('=' not in a + g and _parse(a)), ('=' not in a + g and _parse(g))
    return bool(pa and pg) and _agree(pa[0], pg[0], pa[1] | pg[1], ('.' in a, '.' in g))


def is_correct(answer: str | None, gold: str) -> bool:
    """Strict check of a final answer against a GSM8K number or a MATH LaTeX answer; never raises, bounded time."""
    if not isinstance(answer, str) or not isinstance(gold, str) or max(len(answer), len(gold)) > MAX_INPUT:
        return False
    try:
        a, g = _normalise(answer), _normalise(gold)
        if not a or not g or max(len(a), len(g)) > MAX_MATH or max(_depth(a)[0], _depth(g)[0]) > MAX_DEPTH:
            return False
        return a == g or _match(_structure(a), _structure(g))
    except Exception:  # hostile input that slips past the caps is a wrong answer, never a crashed training step
        return False
