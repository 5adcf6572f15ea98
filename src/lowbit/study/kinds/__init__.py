"""Study kinds: one module each (``init``: step initializers of the learned-step methods)."""
