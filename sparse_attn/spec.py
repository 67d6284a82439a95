"""A small readable language for patterns, used by ``sparse-attn show``.

Grammar (spaces are ignored; ``+`` and ``|`` both mean union, ``&`` binds tighter than either)::

    expr   := term (("+" | "|") term)*
    term   := factor ("&" factor)*
    factor := "(" expr ")" | "per_head(" expr ("," expr)* ")" | atom
    atom   := NAME (":" ARG)*          ARG is an int, a comma list of ints (global positions) or key=int

Atoms (positional arguments in this order; any of them also as key=value):

    window:LEFT[:RIGHT]                  sliding_window(LEFT, RIGHT)
    dilated:LEFT[:DILATION[:RIGHT]]      dilated(LEFT, RIGHT, dilation=DILATION)
    global:N  or  global:0,17,99         global_tokens(N) or explicit positions
    causal                               causal()
    chunked:SIZE                         chunked(SIZE) (Llama 4: chunked:8192&causal)
    random:N[:BLOCK[:SEED]]              random_blocks(N, BLOCK, seed=SEED)
    longformer:WINDOW[:GLOBAL[:DILATION]]
    bigbird[:WINDOW[:GLOBAL[:RANDOM[:BLOCK[:SEED]]]]]
    doc:L0,L1,...                        documents(ids) of packed documents of these lengths (their sum is
                                         the sequence length)
    neighborhood:GRID:KERNEL[:DILATION[:STRIDE]]
                                         neighborhood(GRID, KERNEL, ...), e.g. neighborhood:16,48,80:3,11,11;
                                         causal=1 or causal=1,0,0 per dimension; prefix=N, suffix=N (alias na)
    sliding_tile:GRID:TILE:WINDOW        sliding_tile(GRID, TILE, WINDOW) (alias sta)

Examples: ``window:128+global:4``, ``dilated:64:2&causal``, ``(window:256|random:2:64)&causal``,
``per_head(window:64, dilated:32:2, dilated:16:4)``, ``doc:100,300,50,574&causal``,
``na:8,12,16:3,5,5:causal=1,0,0+global:4``.
"""

from __future__ import annotations

import re

from . import patterns as P

__all__ = ["SPEC_ATOMS", "SpecError", "parse_spec"]


class SpecError(ValueError):
    """A pattern spec that does not parse; the message says where and what was expected."""


def _window(left, right=None):
    return P.sliding_window(left, right)


def _dilated(left, dilation=2, right=None):
    return P.dilated(left, right, dilation=dilation)


def _global(n_or_positions):
    return P.global_tokens(n_or_positions)


def _random(num_blocks, block_size=64, seed=0):
    return P.random_blocks(num_blocks, block_size, seed=seed)


def _longformer(window, global_tokens=1, dilation=1):
    return P.longformer(window, global_tokens, dilation=dilation)


def _documents(lengths):
    import torch

    lengths = torch.as_tensor([lengths] if isinstance(lengths, int) else lengths)
    if bool((lengths < 1).any()):
        raise ValueError(f"document lengths must be >= 1, got {lengths.tolist()}")
    return P.documents(torch.repeat_interleave(torch.arange(len(lengths)), lengths))


def _bigbird(window=192, global_tokens=64, num_random_blocks=3, block_size=64, seed=0):
    return P.bigbird(window, global_tokens, num_random_blocks, block_size=block_size, seed=seed)


def _dims(value):
    return tuple(value) if isinstance(value, list) else value


def _neighborhood(grid, kernel_size, dilation=1, stride=1, causal=0, prefix=0, suffix=0):
    causal = tuple(bool(c) for c in causal) if isinstance(causal, list) else bool(causal)
    grid = tuple(grid) if isinstance(grid, list) else (grid,)
    return P.neighborhood(
        grid,
        _dims(kernel_size),
        dilation=_dims(dilation),
        stride=_dims(stride),
        causal=causal,
        prefix=prefix,
        suffix=suffix,
    )


def _sliding_tile(grid, tile, window, prefix=0, suffix=0):
    grid = tuple(grid) if isinstance(grid, list) else (grid,)
    return P.sliding_tile(grid, _dims(tile), _dims(window), prefix=prefix, suffix=suffix)


_NA_PARAMS = ("grid", "kernel_size", "dilation", "stride", "causal", "prefix", "suffix")
_STA_PARAMS = ("grid", "tile", "window", "prefix", "suffix")

#: atom name -> (builder, argument names in positional order, how many are required)
SPEC_ATOMS = {
    "window": (_window, ("left", "right"), 1),
    "sliding_window": (_window, ("left", "right"), 1),
    "dilated": (_dilated, ("left", "dilation", "right"), 1),
    "global": (_global, ("n_or_positions",), 1),
    "global_tokens": (_global, ("n_or_positions",), 1),
    "causal": (P.causal, (), 0),
    "chunked": (P.chunked, ("size",), 1),
    "random": (_random, ("num_blocks", "block_size", "seed"), 1),
    "random_blocks": (_random, ("num_blocks", "block_size", "seed"), 1),
    "longformer": (_longformer, ("window", "global_tokens", "dilation"), 1),
    "doc": (_documents, ("lengths",), 1),
    "documents": (_documents, ("lengths",), 1),
    "bigbird": (_bigbird, ("window", "global_tokens", "num_random_blocks", "block_size", "seed"), 0),
    "neighborhood": (_neighborhood, _NA_PARAMS, 2),
    "na": (_neighborhood, _NA_PARAMS, 2),
    "sliding_tile": (_sliding_tile, _STA_PARAMS, 3),
    "sta": (_sliding_tile, _STA_PARAMS, 3),
}
#: Atoms whose arguments may be comma lists (positions, lengths, per-dimension sizes).
_LIST_ATOMS = {"global", "global_tokens", "doc", "documents", "neighborhood", "na", "sliding_tile", "sta"}

_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z_0-9]*)|(?P<arg>:\s*(?:[A-Za-z_]+\s*=\s*)?-?\d+(?:\s*,\s*\d+)*)"
    r"|(?P<op>[+|&(),]))"
)


def _tokenize(spec: str):
    pos, tokens = 0, []
    while pos < len(spec):
        if spec[pos:].strip() == "":
            break
        m = _TOKEN.match(spec, pos)
        if m is None:
            rest = spec[pos:].lstrip()
            at = len(spec) - len(rest)
            raise SpecError(f"bad pattern spec {spec!r}: cannot read {rest.rstrip()[:20]!r} at position {at}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind).strip(), m.start(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, spec: str):
        self.spec = spec
        self.tokens = _tokenize(spec)
        self.i = 0

    def error(self, message: str, pos: int | None = None):
        where = f" at position {pos}" if pos is not None else ""
        raise SpecError(f"bad pattern spec {self.spec!r}: {message}{where}")

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None, len(self.spec))

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def parse(self):
        if not self.tokens:
            self.error("empty spec; expected a pattern such as 'window:128+global:4'")
        result = self.expr()
        kind, text, pos = self.peek()
        if kind is not None:
            self.error(f"unexpected {text!r}; expected '+', '|', '&' or the end", pos)
        return result

    def expr(self):
        result = self.term()
        while self.peek()[1] in ("+", "|"):
            self.take()
            result = result | self.term()
        return result

    def term(self):
        result = self.factor()
        while self.peek()[1] == "&":
            self.take()
            result = result & self.factor()
        return result

    def factor(self):
        kind, text, pos = self.take()
        if text == "(":
            inner = self.expr()
            self.expect(")", pos)
            return inner
        if kind == "name" and text == "per_head":
            return self.per_head(pos)
        if kind == "name":
            return self.atom(text, pos)
        found = "the end" if kind is None else repr(text)
        self.error(f"expected a pattern name or '(' but found {found}", pos)

    def expect(self, symbol: str, opened_at: int):
        kind, text, pos = self.take()
        if text != symbol:
            found = "the end" if kind is None else repr(text)
            self.error(f"expected {symbol!r} (opened at position {opened_at}) but found {found}", pos)

    def per_head(self, pos):
        self.expect("(", pos)
        items = [self.expr()]
        while self.peek()[1] == ",":
            self.take()
            items.append(self.expr())
        self.expect(")", pos)
        try:
            return P.per_head(items)
        except (TypeError, ValueError) as e:
            self.error(f"per_head: {e}", pos)

    def atom(self, name, pos):
        if name not in SPEC_ATOMS:
            self.error(f"unknown pattern {name!r}; expected one of {', '.join(SPEC_ATOMS)}", pos)
        builder, params, required = SPEC_ATOMS[name]
        positional, named = [], {}
        while self.peek()[0] == "arg":
            _, text, arg_pos = self.take()
            key, value = self.argument(text[1:].strip(), name, params, arg_pos)
            if key is None:
                if named:
                    self.error(f"{name}: positional argument after key=value", arg_pos)
                positional.append(value)
            else:
                named[key] = value
        if len(positional) > len(params):
            usage = ":".join([name, *(p.upper() for p in params)])
            self.error(f"{name} takes at most {len(params)} arguments ({usage})", pos)
        kwargs = dict(zip(params, positional, strict=False))
        for key, value in named.items():
            if key in kwargs:
                self.error(f"{name}: {key} given twice", pos)
            kwargs[key] = value
        missing = [p for p in params[:required] if p not in kwargs]
        if missing:
            usage = ":".join([name, *(p.upper() for p in params[:required])])
            self.error(f"{name} needs {', '.join(missing)} (e.g. {usage})", pos)
        try:
            return builder(**kwargs)
        except (TypeError, ValueError) as e:
            self.error(f"{name}: {e}", pos)

    def argument(self, text, name, params, pos):
        key = None
        if "=" in text:
            key, text = (part.strip() for part in text.split("=", 1))
            if key not in params:
                self.error(f"{name} has no argument {key!r}; it takes {', '.join(params) or 'none'}", pos)
        values = [int(v) for v in text.split(",")]
        if len(values) > 1 and name not in _LIST_ATOMS:
            self.error(
                f"{name}: a list of values is only allowed for global positions, document lengths and "
                "grid patterns' per-dimension sizes",
                pos,
            )
        return key, values if len(values) > 1 else values[0]


def parse_spec(spec: str) -> P.Pattern:
    """Parse a pattern spec such as ``window:128+global:4`` or ``dilated:64:2&causal`` (see module doc).

    Raises `SpecError` (a ValueError) naming the position and what was expected.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a pattern spec is a str, got {type(spec).__name__}")
    return _Parser(spec).parse()
