"""The benchmark wing, installed as keras_perceiver.benchmarks: it stands on the library, and
nothing in the library imports it.

`devices` (the machine and its GEMM peaks), `flops` (analytic FLOPs), `subjects` (what is
measured: bench names, inputs, our models and their peers), `peers` (the PyTorch originals
timed), `cells` (timing cells of ours and of exported artefacts), `run` (`keras-perceiver
bench`: a process per backend), `report` (`bench-report`), `scaling` (`bench-scale`),
`bound` (`bench-bound`), `profile` (`bench-profile`). The pytest-benchmark suites, NOTES.md
and results/ sit beside them.
"""
