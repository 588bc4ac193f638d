"""
data.py: the tokenizer and the data. every source (a hub dataset, a .jsonl, the built-in arithmetic) becomes rows
{'question', 'reasoning', 'answer'}; prompts follow a template (r1, the tokenizer's chat template, or your own); sft
examples and rl sequences are collated into padded batches whose masks come from lengths, never from token values.
"""
import json
import os
import random
import re
import zlib

import torch

import rewards

R1_TAGS = ("The reasoning and the answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
           "i.e., <think> reasoning here </think><answer> answer here </answer>.")
R1_TEMPLATE = ("A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
               "The Assistant first thinks about the reasoning process and then gives the answer. " + R1_TAGS +
               "\nUser: {question}\nAssistant: ")
R1_CHAT = "\n\nFirst think about the reasoning process, then give the answer. " + R1_TAGS  # after the question
SPECIALS = ['<|endoftext|>', '<think>', '</think>', '<answer>', '</answer>']

# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """one small interface over a HF tokenizer and the offline tiktoken byte tokenizer of 'scratch' models."""

    def __init__(self, hf=None, enc=None):
        self.hf, self.enc = hf, enc
        self.n_vocab = len(hf) if hf is not None else enc.n_vocab  # ids >= n_vocab are never sampled
        # the bos a prompt starts with: llama, mistral, gemma add it only through add_special_tokens; qwen has none
        b = hf.bos_token_id if hf is not None else None
        self.bos = b if b is not None and hf.encode('a', add_special_tokens=True)[:1] == [b] else None

    @staticmethod
    def bytes_level():
        import tiktoken
        ranks = {bytes([i]): i for i in range(256)}
        specials = {s: 256 + i for i, s in enumerate(SPECIALS)}
        return Tokenizer(enc=tiktoken.Encoding('reasoning-bytes', pat_str=r"\s+|\S+", mergeable_ranks=ranks,
                                               special_tokens=specials))

    @staticmethod
    def load(path: str):
        if os.path.isfile(os.path.join(path, 'tokenizer_tiktoken.json')):
            return Tokenizer.bytes_level()
        from transformers import AutoTokenizer
        return Tokenizer(hf=AutoTokenizer.from_pretrained(path))

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False)
        return self.enc.encode(text, allowed_special='all')

    def encode_prompt(self, text: str) -> list[int]:
        """a prompt starts with bos exactly when the tokenizer would add one; a bos the template already wrote (llama 3's
        chat template) is not doubled, an eos some tokenizers append is not taken; completions use encode."""
        ids = self.encode(text)
        return [self.bos] + ids if self.bos is not None and ids[:1] != [self.bos] else ids

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids)
        return self.enc.decode([i for i in ids if i < self.n_vocab])

    def token_id(self, token: str) -> int:
        ids = self.encode(token)
        if len(ids) != 1:
            raise ValueError(f"eos_token {token!r} is not a single token in this tokenizer (got ids {ids})")
        return ids[0]

    def default_eos(self, template: str) -> str:
        """the token a completion ends with: under 'chat' the one that ends an assistant turn in the tokenizer's own
        chat template (qwen <|im_end|>, llama 3 <|eot_id|>, gemma <end_of_turn>; a qwen base model's eos is
        <|endoftext|>, but its chat turns end with <|im_end|>), else the tokenizer's end of text."""
        if self.hf is None:
            return '<|endoftext|>'
        if template == 'chat':
            turn = [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'ANSWER'}]
            text = self.hf.apply_chat_template(turn, tokenize=False)
            after = self.encode(text[text.rindex('ANSWER') + len('ANSWER'):])
            special = {i for i, t in self.hf.added_tokens_decoder.items() if t.special} | set(self.hf.all_special_ids)
            for i in after:  # the first special token after the turn's text closes it
                if i in special:
                    return self.hf.convert_ids_to_tokens(i)
        if self.hf.eos_token is None:
            raise ValueError("the tokenizer has no eos token" + (" and its chat template closes no turn with a special "
                             "token" if template == 'chat' else '') + ": set eos_token")
        return self.hf.eos_token

    def save(self, path: str):
        if self.hf is not None:
            self.hf.save_pretrained(path)
        else:
            with open(os.path.join(path, 'tokenizer_tiktoken.json'), 'w') as f:
                json.dump({'kind': 'tiktoken byte-level', 'special_tokens': SPECIALS}, f)


def format_prompt(question: str, template: str, tok: Tokenizer, system: str) -> str:
    if template == 'r1':
        return R1_TEMPLATE.replace('{question}', question)
    if template == 'chat':
        # an instruct model answers in prose unless told the format: the user turn says it, as r1 does
        msgs = [{'role': 'system', 'content': system}, {'role': 'user', 'content': question + R1_CHAT}]
        return tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return template.replace('{question}', question)  # not .format: latex braces in a template stay as they are


# -----------------------------------------------------------------------------
# data: every source becomes rows {'question', 'reasoning', 'answer'}


def arith_problems(n: int, split: str, seed: int, terms: int, digits: int, trace_frac: float = 1.0,
                   task: str = 'chain') -> list[dict]:
    """synthetic multi-step arithmetic; train and test are disjoint by a hash of the problem text.

    'chain': `7 - 3 + 9 = ?`, the trace keeps a running total. 'column': `457 + 389 = ?`, the trace adds column by
    column from the right with carries (`7+9=16`, `5+8+1=14`, `4+3+1=8`), which a tiny model can follow but
    cannot shortcut. 'words': a chain told as a story (`Mia has 23 shells. Then she finds 15 more. ...`), never
    below 0, with chain's trace; the split goes by the numbers, so no arithmetic of a test story is trained on under
    other names. with trace_frac < 1 some traces skip the steps (`<think></think>` then the answer)."""
    rng = random.Random(f'{seed}-{split}')
    rows, seen, lo, hi = [], set(), 10 ** (digits - 1), 10 ** digits - 1
    for _ in range(100 * n):  # small settings have fewer distinct problems than asked for: stop, don't spin
        if len(rows) == n:
            break
        nums = [rng.randint(lo, hi) for _ in range(terms)]
        ops = [rng.choice('+-') if task != 'column' else '+' for _ in range(terms - 1)]
        if task == 'words':  # a story's count never goes below 0
            acc = nums[0]
            for i, x in enumerate(nums[1:]):
                ops[i] = '+' if x > acc else ops[i]
                acc += x if ops[i] == '+' else -x
        q = ' '.join([str(nums[0])] + [f'{o} {x}' for o, x in zip(ops, nums[1:])])
        if q in seen or (zlib.crc32(q.encode()) % 10 == 0) != (split == 'test'):  # 10% of problems are test
            continue
        seen.add(q)
        steps, acc = [], nums[0]
        if task != 'column':
            for o, x in zip(ops, nums[1:]):
                new = acc + x if o == '+' else acc - x
                steps.append(f'{acc} {o} {x} = {new}')
                acc = new
        else:
            carry, acc = 0, sum(nums)
            for i in range(digits):  # column i from the right; the last line's sum leads the answer
                col = [x // 10 ** i % 10 for x in nums] + ([carry] if carry else [])
                steps.append('+'.join(map(str, col)) + f'={sum(col)}')
                carry = sum(col) // 10
        shown = rng.random() < trace_frac
        question = story(nums, ops, rng) if task == 'words' else f'{q} = ?'
        rows.append({'question': question, 'reasoning': '\n'.join(steps) if shown else '', 'answer': str(acc)})
    return rows


STORY = {'names': (('Mia', 'she'), ('Leo', 'he'), ('Ava', 'she'), ('Sam', 'he'), ('Zoe', 'she'), ('Ben', 'he')),
         'things': ('apples', 'shells', 'marbles', 'stickers', 'coins', 'cards', 'books', 'stamps'),
         '+': ('finds {} more', 'buys {} more', 'is given {} more', 'picks up {} more'),
         '-': ('gives away {}', 'loses {}', 'sells {}', 'uses {}')}


def story(nums: list[int], ops: list[str], rng: random.Random) -> str:
    """arith's 'words' question: the chain nums[0] ops[0] nums[1] ... told as a story."""
    (name, pron), thing = rng.choice(STORY['names']), rng.choice(STORY['things'])
    steps = [f"Then {pron} {rng.choice(STORY[o]).format(x)}." for o, x in zip(ops, nums[1:])]
    return ' '.join([f"{name} has {nums[0]} {thing}."] + steps + [f"How many {thing} does {name} have now?"])


def to_rows(raw: list[dict], question_field: str, answer_field: str, reasoning_field: str, source: str,
            sft: bool = True) -> list[dict]:
    """rl needs a question and a final answer; sft also a worked solution (reasoning_field, or GSM8K's '####')."""
    if not raw:
        raise ValueError(f"{source}: no rows (expected rows with '{question_field}' and '{answer_field}' fields)")
    rows = []
    for i, r in enumerate(raw):
        for field in (question_field, answer_field) + ((reasoning_field,) if reasoning_field and sft else ()):
            v = r.get(field) if isinstance(r, dict) else None
            if not isinstance(v, str) or not v.strip():
                got = 'missing' if v is None else 'empty' if isinstance(v, str) else f'{type(v).__name__} {v!r:.40}'
                raise ValueError(f"{source} row {i}: field '{field}' is {got}, expected a non-empty string "
                                 f"(keys: {sorted(r) if isinstance(r, dict) else type(r).__name__})")
        sol = r[answer_field]
        if reasoning_field or ('####' not in sol and not sft):
            rows.append({'question': r[question_field], 'reasoning': r[reasoning_field].strip() if sft else '',
                         'answer': sol.strip()})
            continue
        if '####' not in sol:
            raise ValueError(f"{source} row {i}: sft needs a worked solution, but field '{answer_field}' has no '####' "
                             f"before the final answer (set reasoning_field if the reasoning is elsewhere; rl modes "
                             f"need only the final answer): {sol[:80]!r}")
        reasoning, final = sol.rsplit('####', 1)
        reasoning = re.sub(r'<<[^<>]*>>', '', reasoning).strip()  # gsm8k calculator annotations
        rows.append({'question': r[question_field], 'reasoning': reasoning, 'answer': rewards.gsm8k_gold(sol)})
    return rows


def load_rows(cfg: dict, split: str) -> list[dict]:
    name = cfg['dataset']
    if name == 'arith':
        return arith_problems(cfg['arith_size'], split, cfg['seed'], cfg['arith_terms'], cfg['arith_digits'],
                              cfg['arith_trace_frac'], cfg['arith_task'])
    if name.endswith('.jsonl'):
        if not os.path.isfile(name):
            raise ValueError(f"dataset = {name!r}: no such file (expected a .jsonl of {{question, answer}} rows)")
        with open(name) as f:
            raw = []
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{name} line {i + 1}: not valid JSON ({e})") from None
    else:
        import datasets
        try:
            raw = datasets.load_dataset(name, cfg['dataset_config'] or None, split=split).to_list()
        except (OSError, ConnectionError, ValueError) as e:  # the hub's own messages rarely say "offline"
            raise ValueError(f"dataset = {name!r}: not a local .jsonl, and the Hugging Face hub could not provide it "
                             f"(offline, only datasets already in the HF cache load): {str(e).splitlines()[0]}") from None
    return to_rows(raw, cfg['question_field'], cfg['answer_field'], cfg['reasoning_field'], name, cfg['mode'] == 'sft')


def completion_text(row: dict) -> str:
    return f"<think>{row['reasoning']}</think><answer>{row['answer']}</answer>"


def tokenize_sft(rows: list[dict], tok: Tokenizer, template: str, system: str, eos_id: int,
                 max_len: int) -> tuple[list[tuple[list[int], int]], int]:
    """-> ([(ids, n_prompt)], n_dropped): completion and eos carry the loss, the prompt does not."""
    out, dropped = [], 0
    for r in rows:
        p = tok.encode_prompt(format_prompt(r['question'], template, tok, system))
        ids = p + tok.encode(completion_text(r)) + [eos_id]
        if len(ids) > max_len:
            dropped += 1
            continue
        out.append((ids, len(p)))
    return out, dropped


def step_indices(n: int, count: int, start: int, seed: int) -> list[int]:
    """items start..start+count of an endless stream of seeded epoch permutations of range(n)."""
    out, perm, epoch = [], None, -1
    for pos in range(start, start + count):
        if pos // n != epoch:
            epoch = pos // n
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(perm[pos % n])
    return out


def collate_sft(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """right-padded -> ids (B, L), attn (B, L), loss mask (B, L-1) over the targets ids[:, 1:]."""
    L = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    attn = torch.zeros(len(batch), L, dtype=torch.long)
    mask = torch.zeros(len(batch), L - 1)
    for i, (x, n_prompt) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        attn[i, :len(x)] = 1
        mask[i, n_prompt - 1:len(x) - 1] = 1  # target j is ids[j + 1]: the completion and eos, never the prompt
    return ids, attn, mask


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """per-completion values (the engine's log-probs) -> (N, width), right-padded with 0 as collate_rl pads."""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def micro_batches(sizes: list[tuple[int, int]], rows: int, tokens: int = 0, at_least: int = 1,
                  packed: bool = False) -> list[list[int]]:
    """the sequences' indices in each micro-batch. sizes: (prompt, completion) lengths; collate_rl pads a micro-batch to
    its longest prompt plus its longest completion, collate_packed lays it end to end (its sum). tokens 0: data order,
    `rows` at a time. tokens > 0: longest first, each micro-batch at most `rows` rows and at most `tokens` tokens,
    padded or packed (a longer sequence goes alone). then the micro-batch with the most rows is halved until there are
    at_least (every rank must run as many: fsdp2's collectives run per micro-batch)."""
    if tokens <= 0:
        out = [list(range(s, min(s + rows, len(sizes)))) for s in range(0, len(sizes), rows)]
    else:
        out = []
        for i in sorted(range(len(sizes)), key=lambda i: -sum(sizes[i])):
            mb = out[-1] if out else []
            if packed:
                cost = sum(sum(sizes[j]) for j in mb + [i])
            else:
                cost = (len(mb) + 1) * (max(sizes[j][0] for j in mb + [i]) + max(sizes[j][1] for j in mb + [i]))
            if mb and len(mb) < rows and cost <= tokens:
                mb.append(i)
            else:
                out.append([i])
    while len(out) < at_least:
        k = max(range(len(out)), key=lambda j: len(out[j]))
        if len(out[k]) < 2:
            raise ValueError(f"{len(sizes)} sequences cannot fill {at_least} micro-batches")
        out[k:k + 1] = [out[k][:len(out[k]) // 2], out[k][len(out[k]) // 2:]]
    return out


def collate_packed(prompts: list[list[int]], completions: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """the sequences end to end in one row, no padding -> ids (1, T), attn (1, T) all ones, completion mask (N, C) as
    collate_rl's, and what the forward needs: position ids (1, T) restarting at 0 for each sequence (attention stays
    within a sequence), keep (K,) the positions whose logits predict the K completion tokens, in cm's row-major order,
    cu (N + 1,) int32 the sequences' boundaries and the longest's length (an int, so the kernel's argument costs no
    device read), for a variable-length attention kernel, and the mask again, for the log-probs' layout."""
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    C = max(max(map(len, completions)), 1)
    ids = torch.tensor([t for p, c in zip(prompts, completions) for t in p + c], dtype=torch.long)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    keep = torch.cat([torch.arange(len(c)) + s + len(p) - 1 for p, c, s in zip(prompts, completions, cu.tolist())])
    cm = torch.zeros(len(prompts), C)
    for i, c in enumerate(completions):
        cm[i, :len(c)] = 1
    return ids, torch.ones_like(ids), cm, (pos, keep, cu, max(lens), cm)


def collate_rl(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """left-padded prompts + right-padded completions -> ids (N, P+C), attn (N, P+C), completion mask (N, C)."""
    P, C = max(map(len, prompts)), max(max(map(len, completions)), 1)
    ids = torch.full((len(prompts), P + C), pad_id, dtype=torch.long)
    attn = torch.zeros(len(prompts), P + C, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p):P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p):P + len(c)] = 1
    return ids, attn, attn[:, P:].float()
