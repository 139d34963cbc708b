"""Imported last by the fork servers that start ranks (engine/launch.py; tests/conftest.py for the test suite's):
every object the imports before it made (about half a million for torch, transformers and the engine) moves into
Python's permanent generation, which no garbage collection walks.

Without it, a forked rank's first full collection walks them all, and writing each one's collector header copies
its memory page out of the server's: that collection, which a rank's first large allocation triggers (the
tokenizer's 3.4 MB JSON as its processor loads), took 0.4-0.7 s of each rank here. Python's documentation of
`gc.freeze` advises this for a fork without exec.
"""

import gc

gc.freeze()
