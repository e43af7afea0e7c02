import time

START = time.monotonic()  # the budget counts from here: imports are part of the run

from loadgen.gpu_check.run import main  # noqa: E402

raise SystemExit(main(start=START))
