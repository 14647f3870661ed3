"""`reparam demo`'s helpers: how closely two runs of a model agree (`agreement`) and a model's
states written in every checkpoint format and read back (`checkpoint_set`).
"""
