"""Checks of the tree: ruff, mypy, layering, the wheel, pdoc, the README's programs, the
fuzz target's bounded run, and the test lanes themselves."""
