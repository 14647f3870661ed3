"""int8 reports: `reparam quantize`'s report and chart (`report`), and what the CPU can do for
low-precision inference (`hardware`). Standard library only; plots import matplotlib when called.
"""
