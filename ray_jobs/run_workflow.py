"""Entrypoint of `ray job submit`: `python -m ray_jobs.run_workflow workflow.yaml [--profile P] [--from S] ...`.

The same as `simplear run`; under a job, RAY_ADDRESS makes the engine attach to the job's cluster.
"""

import sys

from simplear.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
