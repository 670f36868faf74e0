"""The deny-list prompt filter: words and patterns that must never reach the model.

Matching happens on a normalised prompt (NFKC, case folded, invisible format
characters such as zero-width spaces removed, whitespace runs collapsed), so
fullwidth `\\uff46\\uff4f\\uff4f`, `FOO` and `f\\u200boo` all match the word `foo`. Rules apply to everyone or
only to some roles (`roles`), and a role can be exempt (`exempt_roles`). A refusal names
the rule's id, never the list.

    [plugins.deny_list]
    enabled = true
    [[plugins.deny_list.rules]]
    id = "house-banned-words"
    words = ["foo", "two words"]        # whole words or phrases
    patterns = ['\\bbar\\d+\\b']          # Python regular expressions, on the normalised text
    exempt_roles = ["designer"]
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zimage_pipeline.errors import ConfigError
from zimage_pipeline.invisible import without_ignorables
from zimage_pipeline.messages import GenerationRequest
from zimage_pipeline.plugins.api import PromptRefusal, PromptSubject

_WHITESPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text a rule sees: compatibility forms folded (NFKC), case folded, every
    character that renders as nothing removed (invisible.py: zero-width spaces and
    joiners, soft hyphens, BOMs, bidi controls, the combining grapheme joiner, variation
    selectors, Hangul fillers), whitespace collapsed. NFKC runs again after case
    folding, which can produce characters NFKC would have composed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    visible = without_ignorables(folded)
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", visible)).strip()


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    words: list[str] = []
    patterns: list[str] = []
    roles: list[str] = []  # empty: the rule applies to every role
    exempt_roles: list[str] = []
    negative_prompt: bool = False  # also check the negative prompt

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"pattern {pattern!r} is not a regular expression: {exc}"
                ) from None
        return patterns


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(min_length=1)
    message: str = "the prompt contains text that is not allowed"


class _CompiledRule:
    def __init__(self, rule: Rule) -> None:
        self.id = rule.id
        self.roles = frozenset(rule.roles)
        self.exempt = frozenset(rule.exempt_roles)
        self.negative_prompt = rule.negative_prompt
        alternatives = [
            # Whole words: not preceded or followed by a word character.
            rf"(?<!\w){re.escape(normalise(word))}(?!\w)"
            for word in rule.words
            if normalise(word)
        ]
        alternatives += [f"(?:{pattern})" for pattern in rule.patterns]
        self.regex = re.compile("|".join(alternatives)) if alternatives else None

    def applies_to(self, roles: tuple[str, ...]) -> bool:
        if self.exempt.intersection(roles):
            return False
        return not self.roles or bool(self.roles.intersection(roles))

    def matches(self, texts: list[str]) -> bool:
        return self.regex is not None and any(self.regex.search(t) for t in texts)


class DenyListFilter:
    def __init__(self, config: FilterConfig) -> None:
        ids = [rule.id for rule in config.rules]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"rules: duplicate ids {duplicates}")
        self._rules = [_CompiledRule(rule) for rule in config.rules]
        self._message = config.message

    def check(self, request: GenerationRequest, who: PromptSubject) -> PromptRefusal | None:
        prompt = normalise(request.prompt)
        negative = normalise(request.negative_prompt or "")
        for rule in self._rules:
            if not rule.applies_to(who.roles):
                continue
            texts = [prompt, negative] if rule.negative_prompt else [prompt]
            if rule.matches(texts):
                return PromptRefusal(rule_id=rule.id, message=self._message)
        return None


def create(config: Mapping[str, Any]) -> DenyListFilter:
    try:
        parsed = FilterConfig.model_validate(dict(config))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_input=False)
        )
        raise ConfigError(problems) from None
    return DenyListFilter(parsed)
