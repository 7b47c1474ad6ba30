"""How hard the property tests search: Hypothesis profiles chosen by the environment.

- `ci` (when `CI` is set): derandomized, so one run of the suite draws the same examples
  as the next; a mutant or a bug survives or dies for good, never by luck of one draw.
- `dev` (the default): a fresh random draw each run.
- `thorough` (`HYPOTHESIS_PROFILE=thorough`, before a release): random, ten times the
  examples (`examples(n)`).
"""

from __future__ import annotations

import os

from hypothesis import settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")
settings.register_profile("thorough", print_blob=True)
settings.load_profile(PROFILE)


def examples(count: int) -> int:
    """`count` examples, ten times as many in the thorough profile."""
    return count * 10 if PROFILE == "thorough" else count
