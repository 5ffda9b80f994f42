"""Suite-wide settings.

Hypothesis runs derandomized: the same examples on every run, so a green
suite stays green in CI and a failure reproduces. Explore new examples
locally with `pytest --hypothesis-seed=random`... or HYPOTHESIS_PROFILE=explore.
"""

import os

from hypothesis import settings

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
