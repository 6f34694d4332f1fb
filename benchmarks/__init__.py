"""kdtune performance benchmarks: ratios measured side by side in one run (not tests).

    python -m benchmarks                 # everything; prints every ratio of issue 7
    python -m benchmarks --write         # ... and rewrites benchmarks/RESULTS.md from this run
    python -m benchmarks --only steps    # one part: steps | accuracy | study
"""
