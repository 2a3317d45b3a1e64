"""Static checks of the tree: ruff, mypy, wheel, pdoc, the README's programs."""
