"""The fake data-set layouts live in fgvc/bench/fake_layouts.py (the recipe benchmark writes them at
real image sizes); tests import them from here."""

from fgvc.bench.fake_layouts import *  # noqa: F401,F403
