"""tp-siglip's benchmarks, run as ``python benchmarks/bench.py`` (see that file for the options).

A package so that its modules import each other as ``benchmarks.<module>`` whether they are reached
from the command line (bench.py puts the repository root on ``sys.path``), from spawned rank processes
(which unpickle their commands by that qualified name) or from the tests.
"""
