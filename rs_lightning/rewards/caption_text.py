"""Fast caption tokeniser for training rewards: a pure-Python stand-in for pycocoevalcap's PTB path.

The evaluation path (`caption_java.tokenize_ptb`) runs Stanford's PTBTokenizer in a JVM (about 0.2 s per call)
with `-lowerCase`, then drops the punctuation tokens in pycocoevalcap's `PUNCTUATIONS` list. Rewards are
computed on every training batch, so they use `tokenize` below instead. On plain English captions (words,
hyphenated words, numbers, contractions, ordinary punctuation) it gives the same tokens as the PTB path:

- lowercase; `. , : ; ? ! " `` ` and standalone `-`/`--`/`...` are removed;
- `.` stays between two letters/digits (`3.5`, `u.s`), `,` and `:` stay between two digits (`1,000`, `5:30`),
  `-` stays between two letters/digits (`grey-blue`, `t-shirt`);
- contractions are split the PTB way: `don't -> do n't`, `can't -> ca n't`, `man's -> man 's`,
  `they're -> they 're`; other apostrophes (quotes) are stripped from token ends;
- `$` and `%` become their own tokens (`50% -> 50 %`); every other symbol (`& / # @`) is kept as is.

Known differences from the PTB path (rare in captions; they change scores slightly, not the training signal):

- brackets `( ) [ ] { }` are dropped; the PTB path keeps them as the tokens `-lrb- -rrb- -lsb- ...` (its
  `PUNCTUATIONS` list holds `-LRB-` in upper case, but `-lowerCase` has already lowercased the token);
- an abbreviation's final period is dropped (`u.s.` -> `u.s`, `mr.` -> `mr`); PTB keeps `u.s.` and `mr.`;
- PTB's other special cases (URLs, emoticons, `cannot -> can not`, fractions, unicode quote forms) are not
  reproduced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Letters and digits in any script, without the underscore that \w adds.
_ALNUM = r"[^\W_]"
# Always removed: sentence punctuation, quotes and brackets.
_DROP_ALWAYS = re.compile(r"[;?!\"`()\[\]{}]")
# `.` and `-` removed unless between two letters/digits; `,` and `:` removed unless between two digits.
_DROP_DOT_DASH = re.compile(rf"(?<!{_ALNUM})[.\-]|[.\-](?!{_ALNUM})")
_DROP_COMMA_COLON = re.compile(r"(?<!\d)[,:]|[,:](?!\d)")
_SPLIT_SYMBOLS = re.compile(r"([$%])")
_CONTRACTION_NT = re.compile(rf"(?<={_ALNUM})n't\b")
_CONTRACTION = re.compile(rf"(?<={_ALNUM})'(s|re|ve|ll|d|m)\b")
_CONTRACTION_TOKENS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})


def tokenize(caption: str) -> str:
    """Tokenise one caption the fast way (see the module docstring for the rules).

    Args:
        caption: raw caption text.

    Returns:
        Lowercase tokens joined by single spaces; `""` for a caption with no tokens.
    """
    text = caption.lower()
    # Contractions first: their apostrophes must survive the quote stripping below.
    text = _CONTRACTION_NT.sub(" n't", text)
    text = _CONTRACTION.sub(r" '\1", text)
    text = _DROP_ALWAYS.sub(" ", text)
    # One pass is enough: lookarounds see the original text, and a kept `.`/`-` has letters/digits on both
    # sides, which no substitution removes.
    text = _DROP_DOT_DASH.sub(" ", text)
    text = _DROP_COMMA_COLON.sub(" ", text)
    text = _SPLIT_SYMBOLS.sub(r" \1 ", text)
    tokens = []
    for token in text.split():
        if token not in _CONTRACTION_TOKENS:
            token = token.strip("'")
        if token:
            tokens.append(token)
    return " ".join(tokens)


def tokenize_all(captions: Sequence[str]) -> list[str]:
    """Tokenise a list of captions with `tokenize`."""
    return [tokenize(caption) for caption in captions]


def tokenize_references(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Tokenise a list of reference lists with `tokenize`."""
    return [[tokenize(ref) for ref in refs] for refs in references]
