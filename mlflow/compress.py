"""MLflow Project entry point `compress`: the same job as `llmfeat compress`."""

import sys

from entry import project_argv

if __name__ == "__main__":
    argv = project_argv(sys.argv[1:])
    from llmfeat.spark_jobs.compress import main

    sys.exit(main(argv))
