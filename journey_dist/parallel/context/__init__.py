"""Context parallelism: every sequence split over cp ranks, attention the only layer that talks.

    layout.py       which tokens each rank holds: plain chunks or zigzag (load-balanced causal work)
    ring.py         ring attention: k/v blocks passed round the ring, online-softmax merge, own backward
    ulysses.py      Ulysses: all-to-all from sequence-sharded to head-sharded and back
    parallelize.py  a GPT (or pipeline stage) on cp ranks: global positions, the loss over all tokens
"""
