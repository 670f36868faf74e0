"""Characters that render as nothing: Unicode's Default_Ignorable_Code_Point property.

Python's `unicodedata` has no lookup for it, so the ranges are listed here, from the
Unicode Character Database (DerivedCoreProperties.txt, stable since Unicode 5.x: the
standard reserves these ranges as ignorable). They are more than the format characters
(category Cf): also the combining grapheme joiner, variation selectors, Mongolian free
variation selectors and the Hangul fillers, each invisible and each usable to split a
word so that a filter misses it.
"""

from __future__ import annotations

import unicodedata

DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul choseong / jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors, vowel separator
    (0x200B, 0x200F),  # zero-width space, joiners, directional marks
    (0x202A, 0x202E),  # bidirectional embeddings and overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, isolates, deprecated formats
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # zero-width no-break space (byte order mark)
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xFFF0, 0xFFF8),  # unassigned, reserved as ignorable
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol formatting
    (0xE0000, 0xE0FFF),  # tags, variation selectors supplement
)


def is_ignorable(char: str) -> bool:
    """Whether `char` renders as nothing: a default-ignorable code point or any other
    format character (category Cf)."""
    point = ord(char)
    if any(low <= point <= high for low, high in DEFAULT_IGNORABLE):
        return True
    return unicodedata.category(char) == "Cf"


def without_ignorables(text: str) -> str:
    return "".join(char for char in text if not is_ignorable(char))
