"""The largest values a command-line flag or a sweep spec field takes, in one place.

Past them a number is a typo, and torch, numpy or the OS would fail on it with a traceback (or
the command would run for years) instead of answering with one line. Leaf module.
"""

MAX_COUNT = 10**9                 # steps, batch, sequence length, ranks, workers
MAX_ITERATIONS = 1000             # simulated iterations (the steady state shows after two or three)
MAX_SIM_TASKS = 10**7             # tasks in one simulated task graph (a few GB of lists)
MAX_SEED = 2**32 - 1              # a 32-bit seed (each layer's generator is seeded from seed * 1_000_003 + i)
MAX_GIB = 2.0**20                 # a memory budget of a pebibyte
MAX_SECONDS = 7 * 24 * 3600.0     # a planner time limit of a week
MAX_LEARNING_RATE = 1e6
MAX_THREADS = 256                 # torch compute threads (libgomp aborts the process far past the cores)
SCALE_RANGE = (1e-6, 1e6)         # a what-if speed factor; past it replayed times overflow to inf
