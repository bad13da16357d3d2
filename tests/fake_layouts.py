"""The fake data-set layouts live in the package (the recipe benchmark writes them at real image
sizes); tests import them from here as before."""

from fgvc.data.fake_layouts import *  # noqa: F401,F403
