"""Study kinds: one module each (``init``: step initializers of the learned-step methods; ``adapt``: iterative
adaptation against PTQ, layer-wise correction and QAT)."""
