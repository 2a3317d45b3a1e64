"""Fast lane: no root, no namespaces (`pytest tests/unit`)."""
