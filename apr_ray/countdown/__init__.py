"""The Countdown domain: problems, strict checker, APR/SoS+ text protocol, symbolic solvers, tokenizer.

Pure Python. Must not import Ray, torch or anything else from apr_ray outside this package.
"""
