"""SERVER SIDE — PII scrub of everything the synthesis writes, against a configurable pattern list.

The DP guarantee bounds what the generator can have memorised, not what it can make up: a synthetic record may
still hold an email address or a phone number (invented or not). Matches are replaced by `[REDACTED:<name>]`
and counted, so the funnel shows how often it happened.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["PIIScrubber"]


class PIIScrubber:
    """Compiled patterns and the running count of redactions per pattern name.

    Args:
        patterns: name -> regular expression.
        (`DedupSection` has already checked that they compile.)
    """

    def __init__(self, patterns: dict[str, str]) -> None:
        self.patterns = {name: re.compile(pattern) for name, pattern in patterns.items()}
        self.counts: Counter[str] = Counter()

    def __call__(self, text: str) -> tuple[str, int]:
        """(text with every match redacted, number of redactions)."""
        total = 0
        for name, pattern in self.patterns.items():
            text, n = pattern.subn(f"[REDACTED:{name}]", text)
            self.counts[name] += n
            total += n
        return text, total
